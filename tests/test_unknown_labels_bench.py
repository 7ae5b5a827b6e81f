"""The unknown-labels benchmark's pieces on synthetic data: no PETA, no encoder, seconds of CPU.

The arms' labels are checked against what the benchmark promises (the masked and negatives
arms hide the same entries, shares are nested, test rows are never touched, the two sources
annotate two thirds each), the aggregation against known answers on a tiny runs folder, and
a tiny benchmark on the head study's synthetic cache trains every arm and resumes.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_head_study import _synthetic_cache

from bench import head_study
from bench import unknown_labels as ul


def _split(persons: int = 60, per_person: int = 2, attributes: int = 9) -> head_study.Split:
    rng = np.random.default_rng(0)
    count = persons * per_person
    labels = rng.integers(0, 2, (count, attributes)).astype(np.int8)
    identities = np.repeat([f"p{i}" for i in range(persons)], per_person)
    rows = np.arange(count)
    parts = {"train": rows[: count // 2], "val": rows[count // 2 : 3 * count // 4],
             "test": rows[3 * count // 4 :]}  # fmt: skip
    return head_study.Split(0, parts, labels, identities, np.arange(1, attributes))


def test_masked_and_negatives_arms_hide_the_same_nested_entries_and_never_test_rows():
    split = _split()
    sides = np.array(["a"] * len(split.labels))
    test = split.parts["test"]
    previous = np.zeros_like(split.labels, dtype=bool)
    for percent in ul.FRACTIONS:
        masked, columns = ul.arm_split(split, f"masked{percent}", 3, sides)
        negatives, _ = ul.arm_split(split, f"negatives{percent}", 3, sides)
        hidden = masked.labels == ul.UNKNOWN
        assert np.array_equal(hidden, ul.hidden_mask(split, 3, percent))
        assert np.array_equal(negatives.labels[hidden], np.zeros(hidden.sum()))
        assert np.array_equal(negatives.labels[~hidden], split.labels[~hidden])
        assert np.array_equal(masked.labels[~hidden], split.labels[~hidden])
        assert not hidden[test].any() and (previous <= hidden).all()
        assert abs(hidden[: len(test) * 3].mean() - percent / 100) < 0.08
        assert np.array_equal(columns, np.arange(len(split.eval_indices)))
        previous = hidden
    other_seed = ul.arm_split(split, "masked50", 4, sides)[0].labels == ul.UNKNOWN
    assert not np.array_equal(other_seed, ul.hidden_mask(split, 3, 50))


def test_two_sources_annotate_two_thirds_each_and_alone_arms_keep_their_own():
    split = _split()
    order = np.random.default_rng(2).permutation(120)
    sources = np.array(["big"] * 60 + ["s1"] * 30 + ["s2"] * 20 + ["s3"] * 10)[order]
    sides = ul.source_groups(sources)
    assert set(sides[sources == "big"]) == {"a"} and set(sides[sources != "big"]) == {"b"}
    a, b = ul.attribute_groups(8, 0, 1)
    assert len(a) == len(b) == 5 and len(np.union1d(a, b)) == 8
    joint, columns = ul.arm_split(split, "joint", 1, sides)
    evaluated = split.labels[:, split.eval_indices]
    test = split.parts["test"]
    assert np.array_equal(joint.labels[test], evaluated[test]) and len(columns) == 8
    train_a = split.parts["train"][sides[split.parts["train"]] == "a"]
    unknown = joint.labels[train_a] == ul.UNKNOWN
    assert np.array_equal(unknown.any(0), ~np.isin(np.arange(8), a)) and unknown.any(0).sum() == 3
    negatives, _ = ul.arm_split(split, "joint_negatives", 1, sides)
    assert np.array_equal(negatives.labels == 0, (joint.labels == 0) | (joint.labels == ul.UNKNOWN))
    alone, own = ul.arm_split(split, "alone_b", 1, sides)
    assert np.array_equal(own, b) and np.array_equal(alone.labels, evaluated[:, b])
    assert set(sides[alone.parts["train"]]) == {"b"}
    assert np.array_equal(alone.parts["test"], test)
    with pytest.raises(ValueError, match="unknown arm 'alone_c'"):
        ul.arm_split(split, "alone_c", 1, sides)
    with pytest.raises(ValueError, match="source b has no train or no val image"):
        ul.arm_split(split, "alone_b", 1, np.where(sides == "b", "a", sides))


def _write(root, name: str, logits: np.ndarray, columns: np.ndarray, val_labels: np.ndarray):
    for seed in range(3):
        result = {"val": logits, "test": logits, "best_epoch": 1, "history": [], "seconds": 0}
        extra = {"columns": columns, "val_labels": val_labels}
        head_study.save_run(head_study.run_path(root, 0, seed, name), result, columns, False, extra)


def test_aggregation_scores_each_comparison_on_the_references_attributes(tmp_path):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, (200, 4)).astype(np.int8)
    (tmp_path / "split0").mkdir()
    np.savez(tmp_path / "split0" / "split.npz", test_labels=labels,
             test_persons=np.repeat(np.arange(100), 2))  # fmt: skip
    perfect, noisy = 4.0 * (labels - 0.5), rng.normal(size=labels.shape)
    everything, first_two = np.arange(4), np.array([0, 1])
    _write(tmp_path, "masked50", perfect, everything, labels)
    _write(tmp_path, "negatives50", noisy, everything, labels)
    # joint is perfect on attributes 0-1 only; alone_a predicts just those two, noisily
    joint = np.where(np.isin(everything, first_two), perfect, noisy)
    _write(tmp_path, "joint", joint, everything, labels)
    _write(tmp_path, "alone_a", noisy[:, first_two], first_two, labels[:, first_two])
    figures = ul.aggregate(tmp_path, replicates=20, samples=50)
    by = {(e["arm"], e["reference"]): e for e in figures["comparisons"]}
    assert set(by) == {("masked50", "negatives50"), ("joint", "alone_a")}
    masked = by["masked50", "negatives50"]
    assert masked["pairs"] == 3 and masked["attributes"] == 4
    assert masked["mA_05"]["arm_mean"] == 1.0 and masked["auc"]["low"] > 0.3
    joint_entry = by["joint", "alone_a"]
    assert joint_entry["attributes"] == 2 and joint_entry["auc"]["arm_mean"] == 1.0
    assert figures["runs"] == {"masked50": 3, "negatives50": 3, "joint": 3, "alone_a": 3}
    assert "| 50 % hidden, masked (-1) | 50 % hidden, written as 0 | 4 | 3 |" in ul.markdown(
        figures, "recipe"
    )
    with pytest.raises(ValueError, match="among those both arms predict"):
        ul.scoped(head_study.load_run(head_study.run_path(tmp_path, 0, 0, "alone_a")), everything)


ARMS = ("masked75", "negatives75", "joint", "alone_a", "alone_b")
"""Every kind of arm once (the others differ only in the share): a cheap tiny benchmark."""


def test_a_tiny_benchmark_trains_each_kind_of_arm_and_resumes(tmp_path, capsys):
    cache = _synthetic_cache(tmp_path / "cache")
    sources = ["s0" if i < 60 else "s1" for i in range(cache.count)]
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"image": list(cache.images), "source": sources}), manifest)
    argv = [
        "--cache", str(tmp_path / "cache"), "--manifest", str(manifest),
        "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--splits", "1",
        "--seeds", "0", "--epochs", "1", "--batch", "16", "--replicates", "10", "--samples", "20",
        "--arms", *ARMS,
    ]  # fmt: skip
    figures = ul.main(argv)
    assert figures["runs"] == dict.fromkeys(ARMS, 1)
    assert [(e["arm"], e["reference"], e["attributes"]) for e in figures["comparisons"]] == [
        ("masked75", "negatives75", 5), ("joint", "alone_a", 3), ("joint", "alone_b", 3)
    ]  # fmt: skip
    masked = head_study.load_run(tmp_path / "runs" / "split0" / "seed0" / "masked75.npz")
    assert (masked["val_labels"] == ul.UNKNOWN).mean() > 0.5
    alone = head_study.load_run(tmp_path / "runs" / "split0" / "seed0" / "alone_b.npz")
    assert alone["test"].shape[1] == 3 and (alone["val_labels"] >= 0).all()
    written = json.loads((tmp_path / "out" / "unknown_labels.json").read_text())
    assert written["figures"]["comparisons"] == figures["comparisons"]
    capsys.readouterr()
    ul.main(argv)  # every run is there: nothing trains again
    assert "runs/min" not in capsys.readouterr().out
