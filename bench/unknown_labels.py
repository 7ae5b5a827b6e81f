"""Unknown labels on real PETA: what masking gains over writing them as negatives (issue 36).

Every setting trains stage 1 end to end (the recipe of :mod:`bench.peta_ablation`: CPU
ResNet-18 128x64 or GPU ResNet-50, CAM-PAR head without fusion) on a manifest derived from
PETA's, and is scored on the untouched, fully labelled test split at 0.5 and at one threshold
chosen on validation:

(a) ``hidden-<f>-masked``: a seeded share ``f`` (25, 50, 75 %) of the train and val labels
    written as unknown (-1); ``hidden-<f>-negatives``: the same labels written as 0, as a
    codebase without unknowns must; ``all``: every label.
(b) two sources: PETA's subsets dealt alternately into two groups, each keeping a seeded two
    thirds of the 35 evaluated attributes (the other third unknown on its images; a third of the
    attributes is shared). ``joint`` trains on both groups in one attribute space; ``alone-a``
    and ``alone-b`` on one group's images and attributes. Each alone model is compared with the
    joint one on its own attributes (``mA_a``, ``mA_b``).

The hidden labels and attribute groups are drawn from the run's seed, so a seed is a new draw
of the training data as well as of the network. Results (per seed, mean and std over seeds,
and paired differences) go to ``bench/results/unknown_labels.{json,md}``; each finished
(setting, seed) is kept, so an interrupted study resumes.

    python -m bench.unknown_labels                                    # every setting, seeds 0 1
    python -m bench.unknown_labels --settings all hidden-50-masked hidden-50-negatives \\
        --epochs 1 --limit-images 600 --seeds 0 --runs /tmp/ul/runs --out /tmp/ul  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from bench.common import RESULTS_DIR
from bench.peta_ablation import PETA_ROOT, base_config, ensure_stage1, limited_manifest
from campar_ray.data.converters import prepare
from campar_ray.data.manifest import UNKNOWN, ManifestInfo, labels_matrix, read_manifest
from campar_ray.data.manifest import write_manifest as save_manifest
from campar_ray.decision import eval_columns, prediction_logits, probabilities, validation_threshold
from campar_ray.metrics import par_metrics
from campar_ray.run.layout import RunDir
from campar_ray.run.logits import read_split_logits

NAME = "unknown_labels"
FRACTIONS = (0.25, 0.5, 0.75)
SETTINGS = (
    "all",
    *(f"hidden-{round(100 * f)}-{how}" for f in FRACTIONS for how in ("masked", "negatives")),
    "joint",
    "alone-a",
    "alone-b",
)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peta-root", default=str(PETA_ROOT), help="PETA folder (raw layout)")
    parser.add_argument("--manifest", default=None, help="PETA manifest (else <runs>/...)")
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--cpus-per-worker", type=float, default=2.0)
    parser.add_argument("--decode-tasks", type=int, default=0)
    parser.add_argument("--limit-images", type=int, default=0, help="0: every image")
    parser.add_argument("--runs", default="runs/unknown_labels", help="folder of run dirs")
    parser.add_argument("--out", default=str(RESULTS_DIR))
    parser.set_defaults(init="scratch", classifier="thesis")  # base_config's other choices
    return parser


def hidden_labels(table: pa.Table, fraction: float, seed: int, as_negatives: bool) -> np.ndarray:
    """The labels with a seeded ``fraction`` of every train and val entry hidden: -1, or 0 with
    ``as_negatives``; test labels stay as they are."""
    labels = labels_matrix(table).copy()
    scored = np.array(table.column("split").to_pylist()) == "test"
    hidden = (np.random.default_rng(seed).random(labels.shape) < fraction) & ~scored[:, None]
    labels[hidden] = 0 if as_negatives else UNKNOWN
    return labels


def attribute_groups(attributes: int, seed: int) -> tuple[list[int], list[int]]:
    """Two seeded groups of attribute columns, each two thirds of them (a third in both):
    what sources ``a`` and ``b`` annotate."""
    order = np.random.default_rng(seed).permutation(attributes)
    third = attributes // 3
    return sorted(order[: 2 * third].tolist()), sorted(order[third:].tolist())


def source_groups(table: pa.Table) -> np.ndarray:
    """``a`` or ``b`` per row: PETA's subsets (``source``) dealt alternately in sorted order."""
    sources = np.array(table.column("source").to_pylist())
    names = sorted(set(sources))
    group = {name: "ab"[i % 2] for i, name in enumerate(names)}
    return np.array([group[s] for s in sources])


def setting_manifest(
    manifest: str, setting: str, seed: int
) -> tuple[str, dict[str, list[str]] | None]:
    """The manifest of ``setting`` (written next to ``manifest``, so its image paths hold)
    and, for the two-source settings, the attributes each source annotates. Those settings
    keep the evaluated attributes only: an attribute neither source annotates could not train."""
    if setting == "all":
        return manifest, None
    table, info = read_manifest(manifest)
    groups = None
    if setting.startswith("hidden-"):
        _, percent, how = setting.split("-")
        labels = hidden_labels(table, int(percent) / 100, seed, how == "negatives")
    else:
        labels = labels_matrix(table)[:, info.eval_indices()]
        info = ManifestInfo(info.dataset, info.eval_attributes, info.eval_attributes)
        a, b = attribute_groups(len(info.attributes), seed)
        groups = {"a": [info.attributes[j] for j in a], "b": [info.attributes[j] for j in b]}
        side = source_groups(table)
        scored = np.array(table.column("split").to_pylist()) == "test"
        for name, keep in (("a", a), ("b", b)):
            unannotated = [j for j in range(labels.shape[1]) if j not in keep]
            labels[np.ix_((side == name) & ~scored, unannotated)] = UNKNOWN
        if setting.startswith("alone-"):  # one source's train and val images, its attributes
            keep = a if setting == "alone-a" else b
            rows = (side == setting[-1]) | scored
            table, labels = table.filter(pa.array(rows)), labels[rows][:, keep]
            names = tuple(info.attributes[j] for j in keep)
            info = ManifestInfo(info.dataset, names, names)
    path = os.path.join(os.path.dirname(manifest), f"{setting}-seed{seed}.parquet")
    if not os.path.exists(path):
        column = pa.array(labels.tolist(), pa.list_(pa.int8()))
        save_manifest(path, table.set_column(1, "labels", column), info)
    return path, groups


def figures(
    run_dir: str, predict_from: str, groups: dict[str, list[str]] | None
) -> dict[str, float]:
    """Test mA, F1 at 0.5 and at one validation threshold; with ``groups``, mA over each
    source's attributes too (named ``mA_a`` and ``mA_b``, at 0.5)."""
    test = read_split_logits(RunDir(run_dir).logits("test"))
    columns = eval_columns(test)
    probs = probabilities(prediction_logits(test, predict_from))
    threshold = validation_threshold(run_dir, predict_from, None).value
    result = {}
    for tag, value in (("05", 0.5), ("val", threshold)):
        metrics = par_metrics(test.labels[:, columns], probs[:, columns], value)
        result |= {f"mA_{tag}": metrics["mA"], f"f1_{tag}": metrics["f1"]}
    for name, attributes in (groups or {}).items():
        present = [test.attributes.index(a) for a in attributes if a in test.attributes]
        if len(present) == len(attributes):
            result[f"mA_{name}"] = par_metrics(test.labels[:, present], probs[:, present])["mA"]
    return result


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """Per setting and figure: the values over seeds (mean and std are written alongside)."""
    table: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        for key, value in row["figures"].items():
            table.setdefault(row["setting"], {}).setdefault(key, []).append(value)
    return table


def _cell(values: list[float]) -> str:
    mean = 100 * statistics.mean(values)
    spread = 100 * statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{mean:.2f} +- {spread:.2f} (n={len(values)})"


def markdown(rows: list[dict[str, Any]]) -> str:
    """Mean +- std over seeds for every setting, then the paired differences of the study."""
    table = summarise(rows)
    keys = ("mA_05", "mA_val", "f1_05", "mA_a", "mA_b")
    lines = ["| setting | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for setting in SETTINGS:
        if setting in table:
            cells = [_cell(table[setting][k]) if k in table[setting] else "" for k in keys]
            lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    lines += ["", "Paired differences (same seed), mean +- std over seeds:", ""]
    by = {(r["setting"], r["seed"]): r["figures"] for r in rows}
    pairs = [
        (f"hidden-{round(100 * f)}-masked", f"hidden-{round(100 * f)}-negatives", "mA_05")
        for f in FRACTIONS
    ] + [("joint", "alone-a", "mA_a"), ("joint", "alone-b", "mA_b")]
    for first, second, key in pairs:
        seeds = sorted(s for (name, s) in by if name == first and (second, s) in by)
        deltas = [by[first, s][key] - by[second, s][key] for s in seeds if key in by[second, s]]
        if deltas:
            lines.append(f"- {first} - {second}, {key}: {_cell(deltas)} points")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = get_args_parser().parse_args(argv)
    args.runs = os.path.abspath(args.runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / f"{NAME}.json"
    rows = json.loads(results.read_text())["rows"] if results.exists() else []
    manifest = args.manifest or os.path.join(args.runs, "manifest.parquet")
    if not os.path.exists(manifest):
        print(prepare("peta", args.peta_root, manifest, seed=0).summary(), flush=True)
    if args.limit_images:
        manifest = limited_manifest(manifest, args.limit_images)
    manifest = os.path.abspath(manifest)
    for seed in args.seeds:
        for setting in args.settings:
            if any(r["setting"] == setting and r["seed"] == seed for r in rows):
                continue
            path, groups = setting_manifest(manifest, setting, seed)
            config = base_config(args, path).override(
                {
                    "model.head": "campar",
                    "model.fusion": False,
                    "run.dir": os.path.join(args.runs, f"{setting}-seed{seed}"),
                    "seed": seed,
                }
            )
            best_epoch, seconds = ensure_stage1(config)
            row = {
                "setting": setting,
                "seed": seed,
                "best_epoch": best_epoch,
                "train_seconds": seconds,
                "figures": figures(config.run.dir, config.model.predict_from, groups),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            results.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
            (out / f"{NAME}.md").write_text(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
