"""The head study: each part of CAM-PAR + CFAR against the baseline on a frozen ImageNet
encoder, as paired runs with intervals.

Every row trains only what sits above the encoder (fusion, head; CFAR on the head's logits)
on the cached EfficientNet-Lite0 levels of :mod:`bench.head_features`, with the library's
own modules (:func:`campar_ray.model.build_top`, :func:`~campar_ray.model.stage1_loss`,
:func:`~campar_ray.train.loop.build_optimizer`, :func:`campar_ray.cfar.model.fit_model`), so
a run costs seconds of CPU instead of hours and the rows can be repeated enough to tell a
real difference from the spread between runs.

Design, fixed before any run:

- **Splits**: ``--splits`` person-disjoint splits of PETA's persons, 40/20/40 of the images
  (train/val/test; :func:`campar_ray.data.split.split_by_identity`, seed 100 + k), a larger
  validation share than the converter's 50/10/40 so per-attribute decisions have positives.
- **Pairs**: for each split, ``--seeds`` seeds; one (split, seed) fixes the head's
  initialisation, the batch order and each image's flip in each epoch for every row, so two
  rows of one (split, seed) differ only in the row.
- **Training**: the reference classifier (``bench.peta_ablation``'s ``reference``:
  ``Linear + BatchNorm1d`` over the logits, weighted BCE, no prior bias; min-max CAM for the
  CAM-PAR rows); Adam at ``--lr`` for ``--epochs`` epochs; augmentation is the mirror image
  view, drawn per image and epoch; the checkpoint is chosen by ``train.checkpoint_rule``
  (validation mean AUC) and the test split is scored once, with that checkpoint.
- **Endpoints** (test, the 35 evaluated attributes): mA at 0.5; mA at 0.5 after the
  per-attribute offset fitted on validation (``select_threshold("val-per-attribute")``,
  the calibration the model ships with); mean AUC.
- **CFAR** (dictionary and fold-in lookups, one fit) on the ``campar_own`` and
  ``campar_fusion`` rows, the two candidates for the best stage-1 row.

Every run keeps its validation and test logits of the evaluated attributes (fp16 ``.npz``,
plus all attributes' train/val/test logits for the rows CFAR builds on) and each split its
labels and person ids, so :func:`aggregate` re-computes everything without training. A run
whose file exists is skipped, so the study resumes where it stopped; work goes seed by seed
(all rows and splits of seed 0 first), so a partial study is still paired.

    python -m bench.head_study                            # train (resumable), then aggregate
    python -m bench.head_study --aggregate                # only aggregate finished runs
    python -m bench.head_study --limit-images 1500 --splits 1 --seeds 0 --epochs 2 \\
        --runs /tmp/hs/runs --out /tmp/hs                 # smoke check
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import README, RESULTS_DIR, publish_figures, update_marked_block
from bench.head_features import DEFAULT_CACHE, ENCODER, FeatureCache, decoded_pixels
from campar_ray.decision import probabilities

NAME = "head_study"
LAST_STAGE_ROWS = ("baseline", "campar_own", "campar_own_cfar_dictionary")
RATIOS = (0.4, 0.2, 0.4)
SPLIT_SEED = 100
ENDPOINTS = {
    "mA_05": "test mA at 0.5",
    "mA_offset": "test mA at 0.5 after the val-fitted per-attribute offset",
    "auc": "test mean AUC",
}
EPS = 1e-20
EPOCHS = 8
"""With batch 128 and Adam at 2e-3, 300 steps over the 40 % training share: a linear head on
frozen features is near its best by then (the rule keeps the best epoch anyway), and a run
stays within about a minute of one core (the fusion rows cost the most)."""
LAST_STAGE_BLOCKS = slice(5, 7)
"""EfficientNet-Lite0's stride-32 blocks: between the cached middle level (112 channels) and
the deepest (320)."""
LAST_STAGE_LR = 1e-4
"""Adam's rate for the ImageNet encoder's learning part (part 5: its last stage; on a GPU:
all of it): the reference recipe's rate for the whole network (``configs/reference.yaml``);
the head keeps ``--lr``."""


@dataclass(frozen=True)
class Study:
    """One study of the series: what of the ImageNet encoder learns, and where it goes."""

    encoder: str
    """``--encoder``: ``frozen`` (cached levels), ``last-stage`` (part 5: blocks 5-6 learn on
    the cached level below them) or ``whole`` (every layer, on decoded images: a GPU's job)."""
    name: str
    """Its figures: ``bench/results/<name>.json/.md`` and the RESULTS.md block."""
    runs: str
    """Its run files' folder under the cache (``--runs`` overrides)."""
    caption: str
    rows: tuple[str, ...] | None
    """Rows trained by default (None: every row)."""


STUDIES = {
    study.encoder: study
    for study in (
        Study("frozen", NAME, "runs", "a frozen ImageNet EfficientNet-Lite0", None),
        Study(
            "last-stage",
            "head_study_last_stage",
            "last_stage_runs",
            "an ImageNet EfficientNet-Lite0 whose last stage (blocks 5-6) learns",
            LAST_STAGE_ROWS,
        ),
        Study(
            "whole",
            "head_study_whole_network",
            "whole_network_runs",
            "an ImageNet EfficientNet-Lite0 that learns whole, from decoded images",
            LAST_STAGE_ROWS,
        ),
    )
}


@dataclass(frozen=True)
class Row:
    """One line of the study: a stage-1 head on the cached levels, or CFAR on one of them."""

    name: str
    label: str
    head: str = "baseline"
    fusion: bool = False
    logit_norm: str = "batchnorm"
    parent: str | None = None
    """For a CFAR row: the stage-1 row whose logits it builds on."""
    lookup: str | None = None


CFAR_PARENTS = ("baseline", "campar_own", "campar_fusion")
"""Stage-1 rows CFAR refines (their runs keep every attribute's logits for it)."""
STAGE1_ROWS = (
    Row("baseline", "baseline"),
    Row("fusion", "+ fusion", fusion=True),
    Row("campar_shared", "+ CAM-PAR (shared statistics)", head="campar"),
    Row("campar_own", "+ CAM-PAR (own statistics)", head="campar", logit_norm="batchnorm-own"),
    Row(
        "campar_own_affine",
        "+ CAM-PAR (own statistics and affine map)",
        head="campar",
        logit_norm="batchnorm-own-affine",
    ),
    Row(
        "campar_fusion",
        "+ CAM-PAR (own statistics) + fusion",
        head="campar",
        fusion=True,
        logit_norm="batchnorm-own",
    ),
)
CFAR_ROWS = tuple(
    Row(
        f"{parent.name}_cfar_{lookup.replace('-', '')}",
        f"{parent.label} + CFAR ({lookup})",
        parent=parent.name,
        lookup=lookup,
    )
    for parent in STAGE1_ROWS
    if parent.name in CFAR_PARENTS
    for lookup in ("dictionary", "fold-in")
)
ROWS = STAGE1_ROWS + CFAR_ROWS
ROW_BY_NAME = {row.name: row for row in ROWS}
COMPARISONS = tuple(
    dict.fromkeys(
        [
            *((row.name, "baseline") for row in ROWS[1:]),
            ("campar_own", "campar_shared"),
            ("campar_own_affine", "campar_shared"),
            ("campar_own_affine", "campar_own"),
            *((row.name, row.parent) for row in CFAR_ROWS),
            ("campar_own_cfar_dictionary", "baseline_cfar_dictionary"),
        ]
    )
)
"""``(row, reference)``: each paired difference the aggregation reports, once."""


# --- Splits ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """One person-disjoint split of the cached images: indices into the cache per part."""

    index: int
    parts: dict[str, np.ndarray]
    labels: np.ndarray
    """All attributes, every cached image (int8)."""
    identities: np.ndarray
    eval_indices: np.ndarray


def make_split(cache: FeatureCache, index: int, count: int) -> Split:
    from campar_ray.data.split import split_by_identity

    identities = cache.identities[:count]
    names = split_by_identity(identities, RATIOS, SPLIT_SEED + index)
    parts = {part: np.flatnonzero(names == part) for part in ("train", "val", "test")}
    return Split(index, parts, cache.labels[:count], identities, cache.eval_indices)


def save_split(split: Split, folder: Path) -> None:
    """The split's labels and person ids, all the aggregation needs besides the runs."""
    path = folder / "split.npz"
    if path.exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for part, rows in split.parts.items():
        arrays[f"{part}_index"] = rows
        arrays[f"{part}_labels"] = split.labels[rows][:, split.eval_indices]
        arrays[f"{part}_persons"] = split.identities[rows]
    np.savez_compressed(_partial(path), **arrays)
    os.replace(_partial(path), path)


def _partial(path: Path) -> Path:
    return path.with_name(path.stem + ".partial.npz")


# --- Training ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    epochs: int
    lr: float
    batch: int
    rule: str
    threads: int
    cfar_keys: int
    encoder: str = "frozen"
    """A :data:`STUDIES` key: what of the encoder learns (at ``LAST_STAGE_LR``) with the head."""
    device: str = "cpu"
    """Where a run trains (``cuda`` for the ``whole`` study on a lent GPU)."""


def row_config(row: Row):
    """The library config of a stage-1 row: the reference classifier of ``peta_ablation``
    on the cached encoder (which the ``whole`` study builds and trains)."""
    from bench.peta_ablation import CLASSIFIERS
    from campar_ray.config import Config

    shared, campar_only = CLASSIFIERS["reference"]
    return Config().override(
        {
            **shared,
            **(campar_only if row.head == "campar" else {}),
            "model.head": row.head,
            "model.fusion": row.fusion,
            "model.logit_norm": row.logit_norm,
            "model.backbone": ENCODER["backbone"],
            "model.weights": ENCODER["weights"],
        }
    )


class CachedLevels:
    """The encoder's levels of chosen images, gathered from the cache per batch (float32).

    With ``below_last_stage`` the deepest level is not read: the model computes it from the
    level below with its own (learning) last stage."""

    def __init__(self, cache: FeatureCache, fusion: bool, below_last_stage: bool = False):
        deepest = 1 if below_last_stage else 2
        self.needed = range(deepest + 1) if fusion else (deepest,)
        self.views = {view: cache.levels(view) for view in ("plain", "flip")}

    def gather(self, rows: np.ndarray, flips: np.ndarray | None = None) -> list:
        import torch

        order = np.argsort(rows)  # memory maps read fastest in file order
        rows, flips = rows[order], None if flips is None else flips[order]
        levels = []
        for level in self.needed:
            values = np.array(self.views["plain"][level][rows])
            if flips is not None and flips.any():
                values[flips] = self.views["flip"][level][rows[flips]]
            levels.append(torch.from_numpy(values).float())
        return levels, order


class DecodedImages:
    """The ``whole`` study's input: every image decoded once at the encoder's size
    (:func:`bench.head_features.decoded_pixels`), held where training runs (all of PETA is
    0.9 GB of uint8 on a GPU), each batch mirrored per image and normalised there."""

    def __init__(self, cache_folder: Path, device: str, workers: int):
        import torch

        pixels = decoded_pixels(cache_folder, workers)
        self.pixels = torch.from_numpy(np.array(pixels)).to(device)  # off the read-only map

    def gather(self, rows: np.ndarray, flips: np.ndarray | None = None) -> tuple:
        import torch

        from campar_ray.model.inputs import normalize

        device = self.pixels.device
        images = normalize(self.pixels[torch.from_numpy(rows).to(device)])
        if flips is not None and flips.any():
            mirrored = torch.from_numpy(flips).to(device)
            images[mirrored] = torch.flip(images[mirrored], dims=[3])
        return images, np.arange(len(rows))


@functools.cache
def _decoded_images(cache_folder: Path, device: str) -> DecodedImages:
    """One copy of the images per process and device, shared by every run (not 0.9 GB read
    and moved to the GPU again for each)."""
    return DecodedImages(cache_folder, device, os.cpu_count() or 1)


def build_head_model(row: Row, channels: tuple[int, ...], attributes: int, last_stage=None):
    """``ParModel`` whose encoder is the identity on cached levels (same head, same fusion).

    ``last_stage``: the encoder's last stage, applied to the cached level below it to give
    the deepest level, so that stage learns with the head (the study's part 5)."""
    import torch
    from torch import nn

    from campar_ray.model import ParModel, build_top

    class Levels(nn.Module):
        """Stands for the frozen encoder: the levels it would return are the model's input."""

        def __init__(self):
            super().__init__()
            self.last_stage = last_stage

        def forward(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
            if self.last_stage is None:
                return levels
            return [*levels, self.last_stage(levels[-1])]  # the deepest level comes last

    head, fusion = build_top(row_config(row).model, channels, attributes)
    return ParModel(Levels(), head, fusion)


def imagenet_last_stage(cache: FeatureCache):
    """The cached encoder's last stage (EfficientNet-Lite0 blocks 5-6, stride 32, 2.3 M
    parameters) with its ImageNet weights: the part the study's part 5 lets learn."""
    from torch import nn

    from campar_ray.model.backbone import build_backbone

    encoder = build_backbone(cache.meta["encoder"]["backbone"], cache.meta["encoder"]["weights"])
    return nn.Sequential(*encoder.body.blocks[LAST_STAGE_BLOCKS])


def predict(model, source, rows: np.ndarray, predict_from: str) -> np.ndarray:
    """Prediction logits (N x M, float32) of ``rows`` in eval mode, plain view, input order."""
    import torch

    from campar_ray.decision import prediction_logits

    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(rows), 512):
            levels, order = source.gather(rows[start : start + 512])
            logits = prediction_logits(model(levels), predict_from).float().cpu().numpy()
            restored = np.empty_like(logits)
            restored[order] = logits
            out.append(restored)
    return np.concatenate(out)


def train_row(
    row: Row, cache: FeatureCache, split: Split, seed: int, recipe: Recipe, full: bool
) -> dict[str, Any]:
    """One stage-1 run: train, keep the rule's epoch, score val and (once) test.

    ``full``: also return every attribute's train/val/test logits (CFAR builds on them)."""
    import torch

    from campar_ray.model import positive_ratio, stage1_loss
    from campar_ray.run.checkpoints import checkpoint_score
    from campar_ray.train.loop import build_optimizer, validation_metrics

    config = row_config(row)
    torch.manual_seed(seed)
    model, learning, source = _study_model(row, cache, recipe, split.labels.shape[1])
    if learning is None:
        optimizer = build_optimizer(model, lr=recipe.lr, weight_decay=config.train.weight_decay)
    else:  # the library's Adam, with the ImageNet layers at the reference recipe's rate
        in_encoder = {id(p) for p in learning.parameters()}
        groups = [
            {"params": [p for p in model.parameters() if id(p) not in in_encoder]},
            {"params": list(learning.parameters()), "lr": LAST_STAGE_LR},
        ]
        optimizer = torch.optim.Adam(groups, lr=recipe.lr, weight_decay=config.train.weight_decay)
    train_rows, val_rows = split.parts["train"], split.parts["val"]
    ratio = positive_ratio(split.labels[train_rows]).to(recipe.device)
    weighted = config.train.loss == "weighted_bce"
    order_rng = np.random.default_rng([split.index, seed])
    best: tuple[float, dict, np.ndarray] | None = None
    history = []
    started = time.perf_counter()
    for epoch in range(1, recipe.epochs + 1):
        model.train()
        permutation = order_rng.permutation(len(train_rows))
        flips = order_rng.random(len(train_rows)) < 0.5
        for start in range(0, len(permutation), recipe.batch):
            picked = permutation[start : start + recipe.batch]
            levels, order = source.gather(train_rows[picked], flips[picked])
            targets = torch.from_numpy(split.labels[train_rows[picked]][order])
            targets = targets.to(recipe.device).float()
            loss = stage1_loss(model(levels), targets, ratio if weighted else None)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        val = predict(model, source, val_rows, config.model.predict_from)
        labels = split.labels[val_rows]
        metrics = {
            "epoch": epoch,
            **validation_metrics(labels, probabilities(val), split.eval_indices),
        }
        history.append({key: round(float(value), 5) for key, value in metrics.items()})
        score = checkpoint_score(metrics, recipe.rule)
        if best is None or score > best[0]:  # ties keep the earlier epoch
            best = (score, {k: v.clone() for k, v in model.state_dict().items()}, val)
    model.load_state_dict(best[1])
    test = predict(model, source, split.parts["test"], config.model.predict_from)
    result = {
        "val": best[2],
        "test": test,
        "best_epoch": max(history, key=lambda m: (checkpoint_score(m, recipe.rule), -m["epoch"]))[
            "epoch"
        ],
        "history": history,
        "seconds": time.perf_counter() - started,
    }
    if full:
        result["train"] = predict(model, source, train_rows, config.model.predict_from)
    return result


def _study_model(row: Row, cache: FeatureCache, recipe: Recipe, attributes: int) -> tuple:
    """``(model on recipe.device, the encoder part that learns or None, its input)``."""
    if recipe.encoder == "whole":
        from campar_ray.model import build_model

        model = build_model(row_config(row).model, attributes).to(recipe.device)
        return model, model.backbone, _decoded_images(cache.root.parent, recipe.device)
    channels = tuple(shape[0] for shape in cache.meta["shapes"])
    stage = imagenet_last_stage(cache) if recipe.encoder == "last-stage" else None
    model = build_head_model(row, channels, attributes, stage)
    return model, stage, CachedLevels(cache, row.fusion, stage is not None)


def fit_cfar_rows(parent: dict[str, np.ndarray], split: Split, seed: int, keys: int) -> dict:
    """Both CFAR lookups (one ALS and dictionary) on a stage-1 run's stored logits: the
    library's :func:`~campar_ray.cfar.model.fit_model`, local solver."""
    from campar_ray.cfar.model import fit_model
    from campar_ray.config import CfarConfig
    from campar_ray.run.logits import SplitLogits

    names = tuple(str(i) for i in range(split.labels.shape[1]))
    evaluated = tuple(names[i] for i in split.eval_indices)

    def logits(part: str) -> SplitLogits:
        rows = split.parts[part]
        values = parent[f"{part}_all"].astype(np.float32)
        return SplitLogits([], split.labels[rows], values, values, names, evaluated)

    started = time.perf_counter()
    model = fit_model(
        logits("train"),
        logits("val"),
        CfarConfig(solver="local", keys=min(keys, len(split.parts["train"]))),
        seed=seed,
        compare_lookups=True,
    )
    seconds = time.perf_counter() - started
    out = {}
    for lookup, predictor in model.predictors.items():
        scored = {
            part: predictor.refined_logits(logits(part).specific)[:, split.eval_indices]
            for part in ("val", "test")
        }
        out[lookup] = {**scored, "seconds": seconds, "best_epoch": model.fc2[lookup].best_epoch}
    return out


# --- Run files ---------------------------------------------------------------------------


def run_path(runs: Path, split: int, seed: int, row: str) -> Path:
    return runs / f"split{split}" / f"seed{seed}" / f"{row}.npz"


def save_run(
    path: Path,
    result: dict[str, Any],
    eval_indices: np.ndarray,
    full: bool,
    extra: dict[str, np.ndarray] | None = None,
) -> None:
    """Val/test logits of the evaluated attributes (fp16), the epoch kept, the history; for
    a CFAR parent every attribute's train/val/test logits too; ``extra`` arrays as they are
    (another study's run facts, e.g. the labels it trained with). Written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        part: np.asarray(result[part])[:, eval_indices] if result[part].shape[1] > len(eval_indices)
        else result[part]
        for part in ("val", "test")
    }  # fmt: skip
    if full:
        arrays.update({f"{part}_all": result[part] for part in ("train", "val", "test")})
    meta = {key: result[key] for key in ("best_epoch", "history", "seconds") if key in result}
    np.savez_compressed(
        _partial(path),
        **{key: value.astype(np.float16) for key, value in arrays.items()},
        **(extra or {}),
        meta=np.array(json.dumps(meta)),
    )
    os.replace(_partial(path), path)


def write_evidence(runs: Path, evidence: Path) -> int:
    """Copy what the aggregation reads into ``evidence`` (kept in the repository, where a
    machine's cache folder is lost with the machine): each split's labels and person ids, and
    each run's val/test logits of the evaluated attributes and its meta, without the all-
    attribute logits CFAR trained on. ``--aggregate --runs EVIDENCE`` gives the same figures.
    The number of runs copied."""
    copied = 0
    for split in sorted(runs.glob("split*/split.npz")):
        (evidence / split.parent.name).mkdir(parents=True, exist_ok=True)
        (evidence / split.parent.name / split.name).write_bytes(split.read_bytes())
    for path in sorted(runs.glob("split*/seed*/*.npz")):
        target = evidence / path.relative_to(runs)
        target.parent.mkdir(parents=True, exist_ok=True)
        with np.load(path, allow_pickle=False) as data:
            kept = {key: data[key] for key in ("val", "test", "meta")}
        np.savez_compressed(_partial(target), **kept)
        os.replace(_partial(target), target)
        copied += 1
    return copied


def load_run(path: Path) -> dict[str, Any]:
    with np.load(path, allow_pickle=False) as data:
        run = {key: data[key] for key in data.files if key != "meta"}
        run["meta"] = json.loads(str(data["meta"]))
    return run


def open_study(
    args: argparse.Namespace, needs_levels: bool = True
) -> tuple[FeatureCache, list[Split]]:
    """The cache (its levels complete unless a smoke run limits the images, or the study
    reads images instead: ``needs_levels``) and the splits, each saved under ``args.runs``
    once; torch set to ``args.threads``."""
    import torch

    torch.set_num_threads(args.threads)
    cache = FeatureCache.open(args.cache)
    if needs_levels and not cache.complete() and not args.limit_images:
        raise SystemExit(f"the feature cache at {args.cache} is not complete; fill it first")
    count = args.limit_images or cache.count
    splits = [make_split(cache, k, count) for k in range(args.splits)]
    for split in splits:
        save_split(split, Path(args.runs) / f"split{split.index}")
    return cache, splits


def run_study(args: argparse.Namespace) -> None:
    """Train every missing run, seed-major, printing one line per run."""
    cache, splits = open_study(args, needs_levels=args.encoder != "whole")
    recipe = Recipe(
        args.epochs,
        args.lr,
        args.batch,
        args.rule,
        args.threads,
        args.cfar_keys,
        args.encoder,
        args.device,
    )
    runs = Path(args.runs)
    done_before = time.perf_counter()
    trained = 0
    for seed in args.seeds:
        for split in splits:
            for row in args.rows:
                path = run_path(runs, split.index, seed, row.name)
                if path.exists():
                    continue
                if row.parent is not None:
                    parent = load_run(run_path(runs, split.index, seed, row.parent))
                    for lookup, result in fit_cfar_rows(
                        parent, split, seed, recipe.cfar_keys
                    ).items():
                        cfar_row = next(
                            r for r in CFAR_ROWS if r.parent == row.parent and r.lookup == lookup
                        )
                        save_run(
                            run_path(runs, split.index, seed, cfar_row.name),
                            result,
                            split.eval_indices,
                            False,
                        )
                else:
                    full = row.name in CFAR_PARENTS
                    result = train_row(row, cache, split, seed, recipe, full)
                    save_run(path, result, split.eval_indices, full)
                trained += 1
                rate = trained / max((time.perf_counter() - done_before) / 60, 1e-9)
                print(
                    f"[{time.strftime('%H:%M:%S')}] split {split.index} seed {seed} {row.name}: "
                    f"{_summary_line(path)} ({rate:.2f} runs/min)",
                    flush=True,
                )  # fmt: skip


def _summary_line(path: Path) -> str:
    if not path.exists():
        return "done"
    meta = load_run(path)["meta"]
    return f"epoch {meta.get('best_epoch')}, {meta.get('seconds', 0):.1f} s"


# --- Aggregation -------------------------------------------------------------------------


def run_endpoints(run: dict, labels: dict[str, np.ndarray]) -> dict[str, Any]:
    """The three endpoints' point values and the binary predictions behind the two mA."""
    from campar_ray.metrics import mean_auc, par_metrics, select_threshold

    val, test = run["val"].astype(np.float64), run["test"].astype(np.float64)
    offset = select_threshold("val-per-attribute", labels["val"], probabilities(val))
    probs = probabilities(test)
    return {
        "mA_05": par_metrics(labels["test"], probs)["mA"],
        "mA_offset": par_metrics(labels["test"], probs, offset)["mA"],
        "auc": mean_auc(labels["test"], test),
        "predictions": {"mA_05": probs >= 0.5, "mA_offset": probs >= offset},
        "scores": test,
    }


def _epoch_kept(meta: dict[str, Any]) -> str | None:
    """``"kept/trained"`` for a stage-1 run (``"8/8"``: still improving when training
    stopped, so the budget, not the rule, chose it); None for a CFAR row."""
    if not meta.get("history"):
        return None
    return f"{int(meta['best_epoch'])}/{len(meta['history'])}"


def person_weights(persons: np.ndarray, replicates: int, rng: np.random.Generator) -> np.ndarray:
    """``replicates`` x N image weights: each test person drawn with replacement, every image
    of a drawn person counted as often as the person was drawn."""
    names, inverse = np.unique(persons, return_inverse=True)
    draws = rng.integers(0, len(names), (replicates, len(names)))
    counts = np.zeros((replicates, len(names)))
    np.add.at(counts, (np.arange(replicates)[:, None], draws), 1.0)
    return counts[:, inverse]


def weighted_ma(truth: np.ndarray, pred: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """mA of one prediction under each row of image ``weights`` (R values), as
    :func:`campar_ray.metrics.par_metrics` computes it."""
    truth = truth.astype(bool)
    tp = weights @ (truth & pred).astype(np.float64)
    tn = weights @ (~truth & ~pred).astype(np.float64)
    positives = weights @ truth.astype(np.float64)
    negatives = weights @ (~truth).astype(np.float64)
    return ((tp / (positives + EPS) + tn / (negatives + EPS)) / 2).mean(axis=1)


def weighted_auc(truth: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mean over attributes of the ROC AUC (ties half) under each row of image ``weights``
    (R values; attributes without both classes in a replicate are left out)."""
    truth = truth.astype(bool)
    values = []
    for j in range(truth.shape[1]):
        order = np.argsort(scores[:, j], kind="stable")
        ranked = scores[order, j]
        starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
        w = weights[:, order]
        positive = np.add.reduceat(w * truth[order, j], starts, axis=1)
        negative = np.add.reduceat(w * ~truth[order, j], starts, axis=1)
        below = np.cumsum(negative, axis=1) - negative
        pairs = positive.sum(1) * negative.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            values.append((positive * (below + negative / 2)).sum(1) / pairs)
    return np.nanmean(np.stack(values, axis=1), axis=1)


def replicate_endpoints(run: dict, labels: np.ndarray, weights: np.ndarray) -> dict:
    """Each endpoint of one run under each person-bootstrap replicate (R values)."""
    return {
        "mA_05": weighted_ma(labels, run["predictions"]["mA_05"], weights),
        "mA_offset": weighted_ma(labels, run["predictions"]["mA_offset"], weights),
        "auc": weighted_auc(labels, run["scores"], weights),
    }


def hierarchical_interval(
    differences: dict[int, np.ndarray], samples: int, rng: np.random.Generator
) -> tuple[float, float]:
    """95 % percentile interval of the mean difference, resampling splits, then seeds
    within each drawn split, then (through each pair's R person-bootstrap replicates) test
    persons. ``differences[split]`` is seeds x R."""
    keys = sorted(differences)
    means = np.empty(samples)
    for b in range(samples):
        drawn = []
        for k in rng.choice(keys, size=len(keys)):
            table = differences[k]
            seeds = rng.integers(0, table.shape[0], table.shape[0])
            drawn.append(table[seeds, rng.integers(0, table.shape[1], table.shape[0])])
        means[b] = np.concatenate(drawn).mean()
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def wilcoxon_p(differences: np.ndarray) -> float | None:
    from scipy.stats import wilcoxon

    if len(differences) < 2 or not np.any(differences):
        return None
    return float(wilcoxon(differences).pvalue)


def paired_difference(
    runs: dict[tuple[int, int], dict],
    references: dict[tuple[int, int], dict],
    pairs: list[tuple[int, int]],
    endpoint: str,
    samples: int,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """One endpoint's mean paired difference over ``pairs`` ((split, seed) keys of both
    scored-run tables, each run with its point value and person-bootstrap ``replicates``),
    its :func:`hierarchical_interval`, the wins and the Wilcoxon p."""
    point = np.array([runs[p][endpoint] - references[p][endpoint] for p in pairs])
    tables: dict[int, list[np.ndarray]] = {}
    for p in pairs:
        tables.setdefault(p[0], []).append(
            runs[p]["replicates"][endpoint] - references[p]["replicates"][endpoint]
        )
    low, high = hierarchical_interval({k: np.stack(v) for k, v in tables.items()}, samples, rng)
    return {
        "difference": float(point.mean()),
        "low": low,
        "high": high,
        "wins": int((point > 0).sum()),
        "wilcoxon_p": wilcoxon_p(point),
    }


def aggregate(
    runs: Path, *, replicates: int = 200, samples: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Per comparison and endpoint: mean paired difference, its hierarchical-bootstrap 95 %
    interval, the number of pairs and the Wilcoxon signed-rank p; plus each row's mean."""
    rng = np.random.default_rng(seed)
    per_row: dict[str, dict[tuple[int, int], dict]] = {row.name: {} for row in ROWS}
    weights: dict[int, np.ndarray] = {}
    for split_dir in sorted(runs.glob("split*")):
        if not (split_dir / "split.npz").exists():
            continue
        k = int(split_dir.name.removeprefix("split"))
        with np.load(split_dir / "split.npz", allow_pickle=False) as data:
            labels = {part: data[f"{part}_labels"] for part in ("val", "test")}
            weights[k] = person_weights(data["test_persons"], replicates, rng)
        for seed_dir in sorted(split_dir.glob("seed*")):
            seed_number = int(seed_dir.name.removeprefix("seed"))
            for row in ROWS:
                path = seed_dir / f"{row.name}.npz"
                if path.exists():
                    stored = load_run(path)
                    run = run_endpoints(stored, labels)
                    run["epoch_kept"] = _epoch_kept(stored["meta"])
                    run["replicates"] = replicate_endpoints(run, labels["test"], weights[k])
                    del run["predictions"], run["scores"]  # hundreds of runs: keep figures only
                    per_row[row.name][(k, seed_number)] = run
    rows = {
        name: {
            "runs": len(found),
            **{
                endpoint: float(np.mean([run[endpoint] for run in found.values()]))
                for endpoint in ENDPOINTS
            },
            "epochs_kept": [found[pair]["epoch_kept"] for pair in sorted(found)],
        }
        for name, found in per_row.items()
        if found
    }
    comparisons = []
    for name, reference in COMPARISONS:
        pairs = sorted(set(per_row[name]) & set(per_row[reference]))
        if not pairs:
            continue
        entry: dict[str, Any] = {"row": name, "reference": reference, "pairs": len(pairs)}
        for endpoint in ENDPOINTS:
            entry[endpoint] = paired_difference(
                per_row[name], per_row[reference], pairs, endpoint, samples, rng
            )
        comparisons.append(entry)
    return {
        "rows": rows,
        "comparisons": comparisons,
        "splits": sorted(weights),
        "bootstrap": {"person_replicates": replicates, "hierarchical_samples": samples},
    }


def difference_cell(figure: dict[str, Any]) -> str:
    """``+d [low, high] p=...`` in points: a :func:`paired_difference` in a table cell."""
    p = "-" if figure["wilcoxon_p"] is None else f"{figure['wilcoxon_p']:.2g}"
    interval = f"[{100 * figure['low']:+.2f}, {100 * figure['high']:+.2f}]"
    return f"{100 * figure['difference']:+.2f} {interval} p={p}"


def table_head(columns: list[str]) -> list[str]:
    """A Markdown table's header and rule: ``columns``, then one column per endpoint."""
    names = [*columns, *ENDPOINTS.values()]
    return ["| " + " | ".join(names) + " |", "|" + " --- |" * len(names)]


def markdown(figures: dict[str, Any], recipe: dict[str, Any]) -> str:
    """The study's table: each row's means and its paired differences with 95 % intervals."""
    encoder = STUDIES[recipe.get("encoder", "frozen")].caption
    lines = [
        f"Head study on {encoder} (224x112; PETA, 7 of its 10 subsets, 12,039 images): "
        f"{len(figures['splits'])} person-disjoint 40/20/40 splits x seeds; {recipe['text']}. "
        "Differences are paired (same split, seed, initialisation and batch order), in mA / "
        "AUC points, with a 95 % hierarchical bootstrap interval (splits, then "
        "seeds, then test persons) and the Wilcoxon signed-rank p over the pairs.",
        "",
        *table_head(["row", "vs", "pairs"]),
    ]
    for name, means in figures["rows"].items():
        cells = [f"{100 * means[e]:.2f}" for e in ENDPOINTS]
        lines.append(
            f"| {ROW_BY_NAME[name].label} | (mean) | {means['runs']} | " + " | ".join(cells) + " |"
        )
    for entry in figures["comparisons"]:
        cells = []
        for endpoint in ENDPOINTS:
            cells.append(difference_cell(entry[endpoint]))
        lines.append(
            f"| {ROW_BY_NAME[entry['row']].label} | {ROW_BY_NAME[entry['reference']].label} "
            f"| {entry['pairs']} | " + " | ".join(cells) + " |"
        )
    kept = [
        f"{ROW_BY_NAME[name].label} {_last_epoch_share(means['epochs_kept'])}"
        for name, means in figures["rows"].items()
        if any(means.get("epochs_kept") or ())
    ]
    if kept:
        lines += ["", "Runs whose checkpoint rule kept the last epoch: " + "; ".join(kept) + "."]
    return "\n".join(lines) + "\n"


def _last_epoch_share(kept: list[str]) -> str:
    """``"3 of 5 (mean epoch kept 7.6 of 8)"`` from ``kept/trained`` strings."""
    pairs = [tuple(int(part) for part in entry.split("/")) for entry in kept]
    last = sum(epoch == trained for epoch, trained in pairs)
    mean = np.mean([epoch for epoch, _ in pairs])
    return f"{last} of {len(pairs)} (mean epoch kept {mean:.1f} of {pairs[0][1]})"


def headline(figures: dict[str, Any]) -> str:
    """The README's table: each row's paired difference to the baseline (mean of the row, then
    the difference with its 95 % interval and Wilcoxon p), in mA / AUC points."""
    lines = table_head(["row (paired with the baseline)", "pairs"])
    means = figures["rows"]
    for entry in figures["comparisons"]:
        if entry["reference"] != "baseline":
            continue
        cells = [
            f"{100 * means[entry['row']][e]:.2f}: {difference_cell(entry[e])}" for e in ENDPOINTS
        ]
        lines.append(
            f"| {ROW_BY_NAME[entry['row']].label} | {entry['pairs']} | " + " | ".join(cells) + " |"
        )
    baseline = " / ".join(f"{100 * means['baseline'][e]:.2f}" for e in ENDPOINTS)
    return "\n".join(lines) + f"\n\nBaseline means: {baseline}.\n"


def recipe_text(args: argparse.Namespace, encoder: str = "frozen") -> str:
    """The training recipe in words, for a table's caption."""
    learning = {"last-stage": "last stage", "whole": "encoder"}.get(encoder)
    return (
        f"{args.epochs} epochs, Adam lr {args.lr:g}"
        + (f" ({learning} {LAST_STAGE_LR:g})" if learning else "")
        + f", batch {args.batch}, checkpoint rule {args.rule}"
        + (f", on {args.device}" if getattr(args, "device", "cpu") != "cpu" else "")
    )


def publish(args: argparse.Namespace) -> dict[str, Any]:
    figures = aggregate(Path(args.runs), replicates=args.replicates, samples=args.samples)
    recipe = {"text": recipe_text(args, args.encoder), "encoder": args.encoder}
    figures["recipe"] = recipe
    figures["runs_dir"] = os.path.abspath(args.runs)
    name = STUDIES[args.encoder].name
    out = Path(args.out)
    publish_figures(name, figures, markdown(figures, recipe), out, "python -m bench.head_study")
    if args.encoder == "frozen" and out.resolve() == RESULTS_DIR.resolve():
        update_marked_block(NAME, headline(figures), README)  # the README's headline table
    return figures


def add_study_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every study on the feature cache shares: cache, splits, recipe, the
    bootstrap's sizes and ``--aggregate``."""
    parser.add_argument(
        "--cache", default=DEFAULT_CACHE, help="feature cache (bench.head_features)"
    )
    parser.add_argument("--splits", type=int, default=3, help="person-disjoint splits")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rule", default="val_auc", help="train.checkpoint_rule of every run")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (1: on a shared 2-core machine, 2 threads made a step 15x slower)",
    )  # fmt: skip
    parser.add_argument(
        "--limit-images", type=int, default=0,
        help="use only the first N cached images (a smoke run on a partial cache; 0: all)",
    )  # fmt: skip
    parser.add_argument("--replicates", type=int, default=200, help="person-bootstrap draws")
    parser.add_argument("--samples", type=int, default=2000, help="hierarchical draws")
    parser.add_argument(
        "--aggregate", action="store_true", help="train nothing: aggregate the finished runs"
    )


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_study_arguments(parser)
    parser.add_argument(
        "--runs", help="run files (default, in the cache folder: runs/, last_stage_runs/ or "
        "whole_network_runs/ by --encoder)",
    )  # fmt: skip
    parser.add_argument("--out", default=str(RESULTS_DIR), help=f"folder of {NAME}.json/.md")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument(
        "--rows", nargs="+", choices=[row.name for row in ROWS if row.lookup != "fold-in"],
        help="rows to train (a CFAR dictionary row fits the fold-in row too; default: all, "
        f"or {', '.join(LAST_STAGE_ROWS)} when the encoder learns)",
    )  # fmt: skip
    parser.add_argument(
        "--encoder", choices=tuple(STUDIES), default="frozen",
        help="what of the ImageNet encoder learns with the head, at Adam "
        f"{LAST_STAGE_LR:g}: nothing (cached levels), its last stage (part 5; cached level "
        "below it) or all of it (decoded images; a GPU's job)",
    )  # fmt: skip
    parser.add_argument(
        "--last-stage", dest="encoder", action="store_const", const="last-stage",
        help="the same as --encoder last-stage",
    )  # fmt: skip
    parser.add_argument(
        "--device", default="cpu", help="where runs train (cuda: the whole encoder on a GPU)"
    )
    parser.add_argument("--cfar-keys", type=int, default=32, help="CFAR dictionary size")
    parser.add_argument(
        "--evidence", help="also copy what the aggregation reads (split labels, val/test "
        "logits) into this folder, e.g. bench/results/head_study_last_stage_runs",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    study = STUDIES[args.encoder]
    if args.runs is None:
        args.runs = os.path.join(args.cache, study.runs)
    if args.rows is None:
        args.rows = list(study.rows or (row.name for row in ROWS if row.lookup != "fold-in"))
    args.rows = [ROW_BY_NAME[name] for name in args.rows]
    if not args.aggregate:
        run_study(args)
    figures = publish(args)
    if args.evidence:
        copied = write_evidence(Path(args.runs), Path(args.evidence))
        print(f"{copied} runs' evaluation logits -> {args.evidence}", flush=True)
    print(markdown(figures, figures["recipe"]), flush=True)
    return figures


if __name__ == "__main__":
    main()
