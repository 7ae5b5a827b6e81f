"""What fc2 (eq. 20) can learn on PETA, and from which logits: why CFAR adds little at 0.5.

fc2 combines CFAR's ``r_hat`` with the stage-1 logits. It is trained on the training split's
logits and its epoch chosen on validation (``cfar/head.py``), starting at the stage-1
prediction. When it keeps epoch 0, CFAR's prediction *is* stage 1's. Three sources of
training data are compared, from the logits each ablation run kept
(``bench/results/peta_evidence/<run>/{train,val,test}.parquet``); no network runs:

- ``train``: what ``campar fit-cfar`` does. Stage 1 fits its own training images far better
  than new ones (the train/val/test mA below), so fc2 learns from logits unlike those it
  meets later;
- ``val, folds by image``: fc2 trained on held-out (validation) logits, its epoch count chosen
  by 5-fold cross-validation over images, then refitted on all of val. PETA labels are per
  person and a person has several images, so these folds share persons;
- ``val, folds by person``: the same with folds split by PETA identity (the manifest's
  ``identity``), the honest estimate of what held-out logits can teach fc2.

The evidence keeps the evaluated attributes only (35 of PETA's 105), so ALS, the dictionary and
fc2 are fitted on those here, while the ablation's CFAR rows fit all the attributes of their
run's logits: the ``train`` figures can differ from those rows'. Stage 1's own mA at 0.5 on
each split, with its two halves (recall of positives, rejection
of negatives), shows how differently it scores the images it trained on. Every figure is mA
at the fixed threshold 0.5 on the 35 evaluated attributes; the test split
is scored once per source, with the epoch its own selection chose.

    python -m bench.fc2_heldout          # every kept run with train logits
    python -m bench.fc2_heldout --runs reference-campar_fusion-seed1
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import numpy as np

from bench.common import RESULTS_DIR, write_results
from bench.peta_ablation import EVIDENCE_DIR, PETA_ROOT
from campar_ray.cfar.head import Fc2Split, train_fc2
from campar_ray.cfar.model import fit_model
from campar_ray.config import CfarConfig
from campar_ray.data.converters import prepare
from campar_ray.data.manifest import read_manifest
from campar_ray.decision import cfar_logits, eval_columns, probabilities, reconstruction
from campar_ray.metrics import par_metrics
from campar_ray.run.logits import SplitLogits, read_split_logits

NAME = "fc2_heldout"
FOLDS = 5
PETA_IMAGES = "PETA dataset/"
"""Where a PETA image path becomes machine-independent (evidence and manifest may have been
written under different roots)."""


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=add_help)
    parser.add_argument(
        "--runs", nargs="*", help="evidence folders (default: every one with train logits)"
    )
    parser.add_argument("--evidence", default=str(RESULTS_DIR / EVIDENCE_DIR))
    parser.add_argument("--peta-root", default=str(PETA_ROOT))
    parser.add_argument(
        "--manifest",
        default="runs/peta_ablation/manifest.parquet",
        help="the ablation's PETA manifest (made from --peta-root when missing)",
    )
    return parser


def person_of(manifest: str, peta_root: str) -> dict[str, str]:
    """PETA identity of every image, keyed by its path below ``PETA dataset/``."""
    if not os.path.exists(manifest):
        prepare("peta", peta_root, manifest, seed=0)
    table, _ = read_manifest(manifest, with_bytes=False)
    images = table.column("image").to_pylist()
    return dict(zip(map(_key, images), table.column("identity").to_pylist(), strict=True))


def seed_of(run: str) -> int:
    """The seed an ablation folder was trained and fitted with (``<row>-seed<k>``)."""
    match = re.search(r"-seed(\d+)$", run)
    return int(match.group(1)) if match else 0


def _key(image: str) -> str:
    return image.split(PETA_IMAGES, 1)[-1]


def mA(labels: np.ndarray, probs: np.ndarray, columns: np.ndarray) -> float:
    return 100 * par_metrics(labels[:, columns], probs[:, columns], 0.5)["mA"]


def halves(split: SplitLogits, columns: np.ndarray) -> dict[str, float]:
    """mA at 0.5 split into its two halves (mean recall of positives, mean rejection of
    negatives), in percent: where the stage-1 decision moves between seen and new images.
    Each attribute's mA term is the mean of the two, so rejection = 2 * term - recall."""
    metrics = par_metrics(
        split.labels[:, columns], probabilities(cfar_logits(split)[:, columns]), 0.5
    )
    recall, term = metrics["attr_recall"], metrics["attr_accuracy"]
    return {"recall": 100 * float(recall.mean()), "tnr": 100 * float((2 * term - recall).mean())}


def study(splits: dict[str, SplitLogits], persons: dict[str, str], seed: int = 0) -> dict:
    """Every figure of one run (module doc); ``seed`` seeds ALS and k-means as the run's own
    CFAR fit did (its ``seed``), so the ``train`` figures are that fit's."""
    train, val, test = splits["train"], splits["val"], splits["test"]
    columns = eval_columns(train)
    # the settings its recorded figures were measured under (fc2 kept and scored by mA at 0.5)
    cfg = CfarConfig(solver="local", fc2_rule="val_mA", fc2_loss="bce")
    model = fit_model(train, val, cfg, seed=seed)
    estimator = model.predictor.estimator

    def fc2_split(split: SplitLogits, rows: np.ndarray | slice = slice(None)) -> Fc2Split:
        logits = cfar_logits(split)[rows]
        return Fc2Split(reconstruction(logits, estimator), logits, split.labels[rows])

    def fc2_curve(fit_on: Fc2Split, score_on: Fc2Split) -> np.ndarray:
        """mA on ``score_on`` after each of ``cfg.fc2_epochs`` epochs on ``fit_on``."""
        fit = train_fc2(
            fit_on, score_on, lr=cfg.fc2_lr, epochs=cfg.fc2_epochs, columns=columns,
            patience=cfg.fc2_epochs, rule=cfg.fc2_rule, loss=cfg.fc2_loss,
        )  # fmt: skip
        return 100 * np.array(fit.curve)

    fitted = model.fc2[cfg.lookup]
    figures = {
        "stage1": {
            name: mA(split.labels, probabilities(cfar_logits(split)), columns)
            for name, split in splits.items()
        },
        "stage1_at_half": {name: halves(split, columns) for name, split in splits.items()},
        "train": {
            "epoch": fitted.best_epoch,
            "val_mA": 100 * fitted.val_score,
            "test_mA": fc2_curve(fc2_split(train), fc2_split(test))[fitted.best_epoch],
        },
    }
    test_curve = fc2_curve(fc2_split(val), fc2_split(test))
    ids = np.array([persons[_key(image)] for image in val.images])
    rng = np.random.default_rng(0)
    groups = {"images": np.arange(len(ids)), "persons": np.unique(ids)}
    for kind, units in groups.items():
        folds = np.array_split(rng.permutation(units), FOLDS)
        curves = []
        for fold in folds:
            held = np.isin(ids, fold) if kind == "persons" else np.isin(np.arange(len(ids)), fold)
            curves.append(fc2_curve(fc2_split(val, ~held), fc2_split(val, held)))
        cv = np.mean(curves, axis=0)
        epoch = int(np.argmax(cv))
        figures[f"val_folds_by_{kind}"] = {
            "epoch": epoch,
            "cv_mA": float(cv[epoch]),
            "cv_mA_epoch0": float(cv[0]),
            "test_mA": float(test_curve[epoch]),
        }
    figures["val_persons"] = len(groups["persons"])
    figures["val_images"] = len(ids)
    return figures


def table(results: dict[str, dict]) -> str:
    lines = [
        "| run | stage 1 train / val / test | fc2 on train: epoch, test | by image: epoch, CV, "
        "test | by person: epoch, CV, test |",
        "| --- | --- | --- | --- | --- |",
    ]
    for run, f in results.items():
        s, t, i, p = f["stage1"], f["train"], f["val_folds_by_images"], f["val_folds_by_persons"]
        lines.append(
            f"| {run} | {s['train']:.2f} / {s['val']:.2f} / {s['test']:.2f} "
            f"| {t['epoch']}, {t['test_mA']:.2f} "
            f"| {i['epoch']}, {i['cv_mA']:.2f}, {i['test_mA']:.2f} "
            f"| {p['epoch']}, {p['cv_mA']:.2f}, {p['test_mA']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    args = get_args_parser().parse_args(argv)
    evidence = Path(args.evidence)
    runs = args.runs or sorted(
        folder.name for folder in evidence.iterdir() if (folder / "train.parquet").exists()
    )
    persons = person_of(args.manifest, args.peta_root)
    results = {}
    for run in runs:
        splits = {
            name: read_split_logits(str(evidence / run / f"{name}.parquet"))
            for name in ("train", "val", "test")
        }
        results[run] = study(splits, persons, seed_of(run))
        print(table({run: results[run]}).splitlines()[-1], flush=True)
    print(table(results))
    write_results(NAME, {"runs": results, "folds": FOLDS, "threshold": 0.5})
    return results


if __name__ == "__main__":
    main()
