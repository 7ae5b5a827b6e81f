"""Unknown labels on real PETA: what masking gains over writing them as negatives, and what
joint training over two partly annotated sources gains over each alone (issue 36).

Every arm trains the head study's ``baseline`` row (global average pooling of the deepest
level, a linear classifier, BatchNorm1d over its logits) on the cached frozen-encoder levels of
:mod:`bench.head_features`, with the head study's splits, recipe, training loop
(:func:`bench.head_study.train_row`: the library's weighted BCE, which leaves -1 out, and its
positive rates over known labels) and interval machinery. The arms differ only in the labels
(and, for one source alone, the images) they train and validate with; the test split is
always fully labelled and scored the same way. The baseline, not CAM-PAR: on these features
the head study finds the two equal on every endpoint (64.83 and 64.76 test mA at 0.5, 18
pairs), the baseline trains about four times faster, and the masking lives in the loss that
both heads share (CAM-PAR adds a second, equally masked term), so the time buys more pairs.

(a) **Hidden labels** (all 105 attributes): one uniform draw per entry of the train and val
    labels, fixed per (split, seed); the entries below ``f`` (25, 50, 75 %) are hidden, so the
    hidden sets are nested and ``masked<f>`` (hidden = -1, left out by loss, checkpoint rule
    and validation offset) and ``negatives<f>`` (hidden = 0, as a codebase without unknowns
    must write them) hide exactly the same entries. ``all``: every label.
(b) **Two sources** (the 35 evaluated attributes): PETA's subsets dealt into two groups of
    about equal size (largest subset first, each into the group with fewer images: TownCentre
    against the six others), and per (split, seed) two attribute groups of 23 (11 shared, the
    35 covered). ``joint`` trains on both groups' images, each knowing its own attributes
    (``joint_negatives``: the same, the other group's attributes written as 0);
    ``alone_a``/``alone_b`` train on one group's images and attributes only; ``pooled``
    on both groups with every label (the ceiling). A comparison is scored on the reference's
    attributes (``joint`` vs ``alone_a`` on group a's 23).

Each arm's paired difference (same split, seed, initialisation and batch order) is reported
on the head study's endpoints with its 95 % hierarchical bootstrap interval (splits, seeds,
test persons) and the Wilcoxon signed-rank p. Each run keeps its val/test logits, the val
labels it saw and the attributes it predicts, so :func:`aggregate` needs no training; a run
whose file exists is skipped, and work goes seed by seed, so a partial benchmark is paired.

    python -m bench.unknown_labels                        # train (resumable), then aggregate
    python -m bench.unknown_labels --aggregate            # only aggregate finished runs
    python -m bench.unknown_labels --limit-images 1500 --splits 1 --seeds 0 --epochs 2 \\
        --runs /tmp/ul/runs --out /tmp/ul                 # smoke check
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import head_study
from bench.common import RESULTS_DIR, publish_figures
from bench.head_features import DEFAULT_CACHE
from bench.head_study import ENDPOINTS, Split

NAME = "unknown_labels"
ROW = head_study.ROW_BY_NAME["baseline"]
FRACTIONS = (25, 50, 75)
UNKNOWN = -1
HIDE_STREAM, GROUP_STREAM = 1, 2
"""Extra words of the (split, seed) seed of the hidden draw and the attribute groups, so
neither repeats the head study's batch-order stream ``[split, seed]``."""
ARMS = {
    "all": "every label",
    **{f"masked{p}": f"{p} % hidden, masked (-1)" for p in FRACTIONS},
    **{f"negatives{p}": f"{p} % hidden, written as 0" for p in FRACTIONS},
    "pooled": "two sources, every label",
    "joint": "two sources jointly, masked",
    "joint_negatives": "two sources jointly, unknowns written as 0",
    "alone_a": "source a alone",
    "alone_b": "source b alone",
}
COMPARISONS = (
    *((f"masked{p}", f"negatives{p}") for p in FRACTIONS),
    *((f"masked{p}", "all") for p in FRACTIONS),
    *((f"negatives{p}", "all") for p in FRACTIONS),
    ("joint", "joint_negatives"),
    ("joint", "alone_a"),
    ("joint", "alone_b"),
    ("joint", "pooled"),
)
"""``(arm, reference)``, scored on the reference's attributes."""


# --- The arms' labels ----------------------------------------------------------------------


def hidden_mask(split: Split, seed: int, percent: int) -> np.ndarray:
    """Which train and val entries (all attributes) are hidden at ``percent``: one uniform
    draw per entry and (split, seed), so the shares are nested and every arm of one
    (split, seed) and share hides the same entries. Test rows are never hidden."""
    draw = np.random.default_rng([split.index, seed, HIDE_STREAM]).random(split.labels.shape)
    annotated = np.zeros(len(split.labels), dtype=bool)
    annotated[np.concatenate([split.parts["train"], split.parts["val"]])] = True
    return (draw < percent / 100) & annotated[:, None]


def source_groups(sources: np.ndarray) -> np.ndarray:
    """``a`` or ``b`` per image: whole subsets, largest first, each into the group with fewer
    images so far (ties to ``a``), so the two sources are about the same size."""
    names, counts = np.unique(sources, return_counts=True)
    size = {"a": 0, "b": 0}
    group = {}
    for index in np.argsort(-counts, kind="stable"):
        side = min(size, key=size.get)
        group[names[index]] = side
        size[side] += counts[index]
    return np.array([group[s] for s in sources])


def attribute_groups(count: int, split: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two attribute groups (column indices, sorted) of about two thirds of ``count`` each,
    covering all of them, drawn per (split, seed): what sources a and b annotate."""
    order = np.random.default_rng([split, seed, GROUP_STREAM]).permutation(count)
    size = round(2 * count / 3)
    return np.sort(order[:size]), np.sort(order[count - size :])


def arm_split(split: Split, arm: str, seed: int, sides: np.ndarray) -> tuple[Split, np.ndarray]:
    """The split ``arm`` trains and validates on, and the evaluated attributes (indices into
    ``split.eval_indices``) its outputs stand for. Test rows keep their labels."""
    if arm == "all":
        return split, np.arange(len(split.eval_indices))
    if arm.startswith(("masked", "negatives")):
        masked = arm.startswith("masked")
        hidden = hidden_mask(
            split, seed, int(arm.removeprefix("masked" if masked else "negatives"))
        )
        labels = split.labels.copy()
        labels[hidden] = UNKNOWN if masked else 0
        return dataclasses.replace(split, labels=labels), np.arange(len(split.eval_indices))
    evaluated = split.labels[:, split.eval_indices]
    count = evaluated.shape[1]
    everything = np.arange(count)
    if arm == "pooled":
        return dataclasses.replace(split, labels=evaluated, eval_indices=everything), everything
    groups = dict(zip("ab", attribute_groups(count, split.index, seed), strict=True))
    if arm in ("joint", "joint_negatives"):
        labels = evaluated.copy()
        test = np.zeros(len(labels), dtype=bool)
        test[split.parts["test"]] = True
        for side, columns in groups.items():
            unannotated = np.setdiff1d(everything, columns)
            labels[np.ix_((sides == side) & ~test, unannotated)] = UNKNOWN if arm == "joint" else 0
        return dataclasses.replace(split, labels=labels, eval_indices=everything), everything
    if arm in ("alone_a", "alone_b"):
        side, columns = arm[-1], groups[arm[-1]]
        parts = {
            part: rows[sides[rows] == side] if part != "test" else rows
            for part, rows in split.parts.items()
        }
        if not all(len(parts[part]) for part in ("train", "val")):
            raise ValueError(f"source {side} has no train or no val image in split {split.index}")
        own = np.arange(len(columns))
        return (
            dataclasses.replace(split, parts=parts, labels=evaluated[:, columns], eval_indices=own),
            columns,
        )
    raise ValueError(f"unknown arm {arm!r}; valid: {', '.join(ARMS)}")


def image_sources(manifest: str | Path, images: np.ndarray) -> np.ndarray:
    """Each cached image's ``source`` (its PETA subset), looked up in the cache's manifest."""
    import pyarrow.parquet as pq

    table = pq.read_table(manifest, columns=["image", "source"])
    source = dict(
        zip(table.column("image").to_pylist(), table.column("source").to_pylist(), strict=True)
    )
    missing = [name for name in images if name not in source]
    if missing:
        raise SystemExit(f"{manifest} has no row for cached image {missing[0]!r}")
    return np.array([source[name] for name in images])


# --- Training ------------------------------------------------------------------------------


def run_benchmark(args: argparse.Namespace) -> None:
    """Train every missing run, seed-major, one line per run."""
    cache, splits = head_study.open_study(args)
    sides = source_groups(image_sources(args.manifest, cache.images[: len(splits[0].labels)]))
    recipe = head_study.Recipe(args.epochs, args.lr, args.batch, args.rule, args.threads, 0)
    runs = Path(args.runs)
    started, trained = time.perf_counter(), 0
    for seed in args.seeds:
        for split in splits:
            for arm in args.arms:
                path = head_study.run_path(runs, split.index, seed, arm)
                if path.exists():
                    continue
                trains_on, columns = arm_split(split, arm, seed, sides)
                result = head_study.train_row(ROW, cache, trains_on, seed, recipe, False)
                seen = trains_on.labels[trains_on.parts["val"]][:, trains_on.eval_indices]
                extra = {"columns": columns, "val_labels": seen.astype(np.int8)}
                head_study.save_run(path, result, trains_on.eval_indices, False, extra)
                trained += 1
                rate = trained / max((time.perf_counter() - started) / 60, 1e-9)
                print(
                    f"[{time.strftime('%H:%M:%S')}] split {split.index} seed {seed} {arm}: "
                    f"epoch {result['best_epoch']}, {result['seconds']:.1f} s "
                    f"({rate:.2f} runs/min)",
                    flush=True,
                )


# --- Aggregation ---------------------------------------------------------------------------


def scoped(run: dict, columns: np.ndarray) -> dict[str, np.ndarray]:
    """A run's val/test logits and val labels on ``columns`` (evaluated-attribute indices,
    all among those the run predicts)."""
    position = {int(c): i for i, c in enumerate(run["columns"])}
    if any(int(c) not in position for c in columns):
        raise ValueError("a comparison's attributes must be among those both arms predict")
    keep = [position[int(c)] for c in columns]
    return {
        "val": run["val"][:, keep],
        "test": run["test"][:, keep],
        "val_labels": run["val_labels"][:, keep],
    }


def aggregate(
    runs: Path, *, replicates: int = 200, samples: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Per comparison and endpoint, on the reference's attributes: both arms' means, the
    mean paired difference, its hierarchical-bootstrap 95 % interval, the pairs, the wins and
    the Wilcoxon signed-rank p."""
    rng = np.random.default_rng(seed)
    found: dict[str, dict[tuple[int, int], dict]] = {arm: {} for arm in ARMS}
    test_labels, weights = {}, {}
    for split_dir in sorted(runs.glob("split*")):
        if not (split_dir / "split.npz").exists():
            continue
        k = int(split_dir.name.removeprefix("split"))
        with np.load(split_dir / "split.npz", allow_pickle=False) as data:
            test_labels[k] = data["test_labels"]
            weights[k] = head_study.person_weights(data["test_persons"], replicates, rng)
        for seed_dir in sorted(split_dir.glob("seed*")):
            for arm in ARMS:
                path = seed_dir / f"{arm}.npz"
                if path.exists():
                    found[arm][(k, int(seed_dir.name.removeprefix("seed")))] = head_study.load_run(
                        path
                    )
    scored: dict[tuple[str, tuple[int, int], bytes], dict] = {}

    def score(name: str, pair: tuple[int, int], columns: np.ndarray) -> dict:
        """The endpoints (and their person-bootstrap replicates) of one run on ``columns``;
        each run is scored once per attribute set, however many comparisons it enters."""
        key = (name, pair, columns.tobytes())
        if key not in scored:
            run, truth = scoped(found[name][pair], columns), test_labels[pair[0]][:, columns]
            point = head_study.run_endpoints(run, {"val": run["val_labels"], "test": truth})
            point["replicates"] = head_study.replicate_endpoints(point, truth, weights[pair[0]])
            del point["predictions"], point["scores"]
            scored[key] = point
        return scored[key]

    comparisons = []
    for arm, reference in COMPARISONS:
        pairs = sorted(set(found[arm]) & set(found[reference]))
        if not pairs:
            continue
        scores = {
            name: {p: score(name, p, found[reference][p]["columns"]) for p in pairs}
            for name in (arm, reference)
        }
        entry: dict[str, Any] = {
            "arm": arm,
            "reference": reference,
            "pairs": len(pairs),
            "attributes": len(found[reference][pairs[0]]["columns"]),
        }
        for endpoint in ENDPOINTS:
            entry[endpoint] = {
                "arm_mean": float(np.mean([scores[arm][p][endpoint] for p in pairs])),
                "reference_mean": float(np.mean([scores[reference][p][endpoint] for p in pairs])),
                **head_study.paired_difference(
                    scores[arm], scores[reference], pairs, endpoint, samples, rng
                ),
            }
        comparisons.append(entry)
    return {
        "comparisons": comparisons,
        "runs": {arm: len(done) for arm, done in found.items() if done},
        "splits": sorted(weights),
        "seeds": sorted({seed for done in found.values() for _, seed in done}),
        "bootstrap": {"person_replicates": replicates, "hierarchical_samples": samples},
    }


def markdown(figures: dict[str, Any], recipe: str) -> str:
    """One line per comparison: both means and the paired difference with its interval."""
    pairs = max((entry["pairs"] for entry in figures["comparisons"]), default=0)
    lines = [
        f"Unknown labels on PETA (cached frozen EfficientNet-Lite0 levels, 12,039 images; the "
        f"head study's baseline head, {recipe}): {len(figures['splits'])} person-disjoint "
        f"40/20/40 splits x seeds {figures['seeds']}, up to {pairs} pairs per comparison. "
        "Hidden labels are drawn per (split, seed) over the train and val entries of all 105 "
        "attributes and are the same entries in the masked and the negatives arm; the two "
        "sources are TownCentre and PETA's six other subsets, each annotating 23 of the 35 "
        "evaluated attributes (11 shared, drawn per split and seed). The test split is fully "
        "labelled; a comparison is scored on its reference's attributes. Cells: arm mean / "
        "reference mean, paired difference in points with its 95 % hierarchical bootstrap "
        "interval (splits, seeds, test persons) and the Wilcoxon p.",
        "",
        *head_study.table_head(["arm", "vs", "attributes", "pairs"]),
    ]
    for entry in figures["comparisons"]:
        cells = []
        for endpoint in ENDPOINTS:
            e = entry[endpoint]
            cells.append(
                f"{100 * e['arm_mean']:.2f} / {100 * e['reference_mean']:.2f}: "
                + head_study.difference_cell(e)
            )
        lines.append(
            f"| {ARMS[entry['arm']]} | {ARMS[entry['reference']]} | {entry['attributes']} "
            f"| {entry['pairs']} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def publish(args: argparse.Namespace) -> dict[str, Any]:
    figures = aggregate(Path(args.runs), replicates=args.replicates, samples=args.samples)
    recipe = head_study.recipe_text(args)
    figures["recipe"] = recipe
    figures["runs_dir"] = os.path.abspath(args.runs)
    publish_figures(NAME, figures, markdown(figures, recipe), Path(args.out))
    return figures


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    head_study.add_study_arguments(parser)
    parser.add_argument(
        "--manifest", default=os.path.join(DEFAULT_CACHE, "manifest.parquet"),
        help="the cache's manifest (each image's PETA subset)",
    )  # fmt: skip
    parser.add_argument("--runs", default="/work/cache/unknown_labels/runs", help="run files")
    parser.add_argument("--out", default=str(RESULTS_DIR), help=f"folder of {NAME}.json/.md")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(5)))
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    if not args.aggregate:
        run_benchmark(args)
    figures = publish(args)
    print(markdown(figures, figures["recipe"]), flush=True)
    return figures


if __name__ == "__main__":
    main()
