"""A corpus with unknown labels through the whole command line, and today's figures without.

Two sources of real PETA images (``../shared/datasets/peta``) with partly different attribute
names are merged (``campar prepare merge``): 3DPeS with PETA's 105 attributes, and GRID with
five of them, three renamed, so the others are unknown on its images; a quarter of the
remaining labels is hidden too. That manifest trains (one tiny run), fits CFAR on Ray actors,
evaluates per data source, predicts and exports through ``campar``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from cli_checks import TINY_TRAIN, one_line, run_campar
from test_unknown_labels import hide, reference_par_metrics

from campar_ray.cfar.solver import fit_als
from campar_ray.config import AlsSettings
from campar_ray.data import labels_matrix, read_manifest
from campar_ray.data.converters import prepare
from campar_ray.data.manifest import UNKNOWN, ManifestInfo, write_manifest
from campar_ray.decision import cfar_logits, eval_columns, prediction_logits, probabilities
from campar_ray.evaluate.metrics_table import score_split
from campar_ray.metrics import SUMMARY_KEYS, par_metrics, summary
from campar_ray.run.logits import read_split_logits

CFAR = ("--set", "cfar.solver=ray", "--set", "cfar.actors=1", "--set", "cfar.keys=4",
        "--set", "cfar.factors=4", "--set", "cfar.fc2_epochs=20")  # fmt: skip


GRID_KEEPS = ("personalMale", "accessoryHat", "carryingBackpack", "carryingOther", "hairLong")
GRID_NAMES = {"personalMale": "male", "accessoryHat": "hat", "carryingBackpack": "backpack"}
"""GRID's source annotates five of PETA's attributes and names three of them its own way."""


def peta_source(
    peta: tuple[pa.Table, ManifestInfo],
    folder: Path,
    subset: str,
    per_split: dict[str, int],
    keep: tuple[str, ...] | None = None,
) -> str:
    """A manifest of ``per_split`` real images of PETA's ``subset`` per split, copied into
    ``folder`` (relative paths), with only the attributes in ``keep`` (renamed by
    :data:`GRID_NAMES`) when given."""
    table, info = peta
    sources, splits = table.column("source").to_pylist(), table.column("split").to_pylist()
    rows: list[int] = []
    for split, count in per_split.items():
        found = [r for r in range(table.num_rows) if (sources[r], splits[r]) == (subset, split)]
        rows += found[:count]
    table = table.take(rows)
    names = []
    for image in table.column("image").to_pylist():
        names.append(f"{len(names)}{Path(image).suffix}")
        shutil.copyfile(image, folder / names[-1])
    table = table.set_column(0, "image", pa.array(names))
    if keep is not None:
        labels = labels_matrix(table)[:, [info.attributes.index(name) for name in keep]]
        table = table.set_column(1, "labels", pa.array(labels.tolist(), pa.list_(pa.int8())))
        renamed = tuple(GRID_NAMES.get(name, name) for name in keep)
        info = ManifestInfo(subset, renamed, renamed)
    path = str(folder / f"{subset}.parquet")
    write_manifest(path, table, dataclasses.replace(info, dataset=subset))
    return path


@pytest.fixture(scope="module")
def partial(peta_root, tmp_path_factory) -> str:
    """The merged manifest with a quarter of its known labels hidden as well."""
    root = tmp_path_factory.mktemp("heterogeneous")
    peta = read_manifest(prepare("peta", str(peta_root), str(root / "peta.parquet")).path)
    for subset in ("3DPeS", "GRID"):
        (root / subset).mkdir()
    a = peta_source(peta, root / "3DPeS", "3DPeS", {"train": 16, "val": 8, "test": 8})
    b = peta_source(peta, root / "GRID", "GRID", {"train": 12, "val": 4, "test": 4}, GRID_KEEPS)
    mapping = ", ".join(f"{new}: {old}" for old, new in GRID_NAMES.items())
    (root / "map.yaml").write_text(f"datasets:\n  GRID: {{{mapping}}}\n")
    merged = prepare("merge", "", str(root / "merged.parquet"), manifests=f"{a},{b}",
                     attribute_map=str(root / "map.yaml")).path  # fmt: skip
    table, info = read_manifest(merged)
    labels = labels_matrix(table)
    labels = np.where(labels == UNKNOWN, UNKNOWN, hide(labels, 0.25, seed=2))
    path = str(root / "partial.parquet")
    write_manifest(
        path, table.set_column(1, "labels", pa.array(labels.tolist(), pa.list_(pa.int8()))), info
    )
    return path


@pytest.mark.ray
@pytest.mark.peta
def test_unknown_labels_train_fit_cfar_evaluate_predict_and_export(
    ray_cluster, partial, tmp_path, capsys
):
    run = str(tmp_path / "run")
    code, _, err = run_campar(capsys, "train", "--manifest", partial, "--run-dir", run,
                              *TINY_TRAIN, "--epochs", "1")  # fmt: skip
    assert code == 0, err
    train = read_split_logits(f"{run}/logits/train.parquet")
    assert (train.labels == UNKNOWN).any()  # the logits keep the unknowns for stage 2

    code, _, err = run_campar(capsys, "fit-cfar", "--run-dir", run, *CFAR)
    assert code == 0, err
    fitted = json.loads((tmp_path / "run" / "cfar" / "cfar.json").read_text())
    local = fit_als(  # the Ray actors read the mask with their rows: the local fit, exactly
        probabilities(cfar_logits(train)),
        AlsSettings.of(fitted["config"]),
        solver="local",
        seed=fitted["seed"],
        known=train.labels != UNKNOWN,
    )
    np.testing.assert_allclose(fitted["als"]["objectives"], local.objectives, rtol=1e-10)

    out = tmp_path / "report"
    code, _, err = run_campar(capsys, "evaluate", "--run-dir", run, "--out", str(out),
                              "--angle-images", "4", "--cam-images", "1")  # fmt: skip
    assert code == 0, err
    document = json.loads((out / "metrics.json").read_text())
    test = read_split_logits(f"{run}/logits/test.parquet")
    columns = eval_columns(test)
    probs = probabilities(prediction_logits(test, "shared"))
    shared = document["sources"]["stage1_shared"]
    expected = par_metrics(test.labels[:, columns], probs[:, columns], 0.5)
    assert {key: shared[key] for key in SUMMARY_KEYS} == summary(expected)
    assert set(shared["by_source"]) == {"3DPeS", "GRID"}
    assert "Metrics per data source" in (out / "report.md").read_text()

    code, stdout, err = run_campar(capsys, "predict", "--model", run, "--input", partial,
                                   "--out", str(tmp_path / "predictions.csv"))  # fmt: skip
    assert code == 0, err
    assert stdout.startswith(f"{read_manifest(partial)[0].num_rows} images (0 unreadable)")
    code, _, err = run_campar(capsys, "export", "--model", run, "--out", str(tmp_path / "m.pt"))
    assert code == 0, err


@pytest.mark.peta
def test_an_attribute_no_training_image_annotates_is_refused_in_one_line(partial, tmp_path, capsys):
    table, info = read_manifest(partial)
    labels = labels_matrix(table).copy()
    labels[np.array(table.column("split").to_pylist()) == "train", 2] = UNKNOWN
    path = str(tmp_path.parent / "no-hat.parquet")
    write_manifest(
        path, table.set_column(1, "labels", pa.array(labels.tolist(), pa.list_(pa.int8()))), info
    )
    run = str(tmp_path / "run")
    code, _, err = run_campar(capsys, "train", "--manifest", path, "--run-dir", run, *TINY_TRAIN)
    assert code == 2
    assert one_line(err) == (
        f"campar train: error: attribute {info.attributes[2]!r} has no known label in the training "
        "split (all -1): annotate some training images or leave the attribute out of the manifest"
    )


@pytest.mark.ray
def test_with_every_label_known_an_evaluation_scores_todays_figures_bit_for_bit(tiny_run):
    """The shared tiny run (every label known): each figure of every prediction source, and
    each per-source one, is the pre-unknown-labels reference code's, exactly."""
    scored, logits = score_split(
        str(tiny_run.run_dir), "test", "specific", None, "0.5", tiny_run.manifest
    )
    columns = eval_columns(logits)
    assert (logits.labels != UNKNOWN).all()
    for item in scored:
        probs = {"stage1_shared": logits.shared, "stage1_specific": logits.specific}[item.name]
        reference = reference_par_metrics(
            logits.labels[:, columns], probabilities(probs)[:, columns]
        )
        assert summary(item.metrics) == summary(reference)
        for key in ("attr_accuracy", "attr_precision", "attr_recall", "attr_f1"):
            assert np.array_equal(item.metrics[key], reference[key])
        assert item.by_source is None  # one synthetic source: nothing to break down
