"""Evaluation report, ablation table and the run-directory side of bundles, on tiny real runs.

The runs are trained here without Ray (the plain loops of ``campar_ray.train.loop``, two
epochs of a ResNet-18 on 32 x 16 synthetic images), checkpointed in stage 1's format and
layout, with logits written by the best checkpoint: the artefacts ``train_stage1`` leaves, in
seconds instead of minutes.
"""

from __future__ import annotations

import csv
import functools
import html.parser
import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from bench.threshold_protocol import score_run
from campar_ray.bundle import load_model, save_bundle
from campar_ray.cfar.fit import fit_cfar, load_cfar_if_fitted
from campar_ray.cli import main
from campar_ray.config import CfarConfig, Config
from campar_ray.data.manifest import labels_matrix, read_manifest
from campar_ray.data.ray_pipeline import decode_batch
from campar_ray.data.synthetic import generate_synthetic
from campar_ray.decision import (
    CALIBRATED,
    eval_columns,
    prediction_logits,
    probabilities,
    source_probabilities,
)
from campar_ray.evaluate import compare_runs, evaluate
from campar_ray.evaluate.plots import image_caption
from campar_ray.export import export_model
from campar_ray.metrics import THRESHOLD_PROTOCOLS, choose_threshold, par_metrics, summary
from campar_ray.model import build_model, stage1_loss
from campar_ray.model.inputs import normalize
from campar_ray.predict import predict
from campar_ray.run.checkpoints import best_checkpoint, load_stage1_checkpoint, save_checkpoint
from campar_ray.run.layout import RunDir
from campar_ray.run.logits import SplitLogits, read_split_logits, write_split_logits
from campar_ray.train.loop import (
    build_optimizer,
    build_scheduler,
    make_grad_scaler,
    train_one_epoch,
    validation_metrics,
)
from campar_ray.train.loop import evaluate as evaluate_epoch

SIZE = (32, 16)
CPU = torch.device("cpu")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHROMIUM = "/usr/bin/chromium"


def split_rows(table: pa.Table, split: str) -> pa.Table:
    """One split's rows with their manifest row number, as the decode tasks receive them."""
    indexed = table.append_column("row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    return indexed.filter(pc.equal(indexed.column("split"), split))


def _batches(manifest: str, split: str, batch_size: int = 32) -> list[dict[str, torch.Tensor]]:
    """Decoded batches of one split, through the training pipeline's own decode function."""
    table, info = read_manifest(manifest)
    rows = split_rows(table, split)
    decoded = decode_batch(
        {
            "row": rows.column("row").to_numpy().copy(),
            "image": np.asarray(rows.column("image").to_pylist(), dtype=object),
            "labels": labels_matrix(rows),
        },
        root=info.root,
        size=SIZE,
    )
    return [
        {key: torch.from_numpy(value[start : start + batch_size]) for key, value in decoded.items()}
        for start in range(0, len(decoded["row"]), batch_size)
    ]


def train_tiny_run(run_dir: Path, manifest: str, head: str, epochs: int = 2) -> Path:
    """A stage-1 run directory as ``train_stage1`` lays it out, trained without Ray."""
    torch.manual_seed(0)
    config = Config().override(
        {
            "data.manifest": manifest,
            "data.image_size": list(SIZE),
            "model.backbone": "resnet18",
            "model.head": head,
            "model.fusion": False,
            "train.epochs": epochs,
            "run.dir": str(run_dir),
        }
    )
    _, info = read_manifest(manifest)
    model = build_model(config.model, len(info.attributes))
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.0)
    scheduler = build_scheduler(optimizer, name="plateau", epochs=epochs)
    logits_fn = functools.partial(prediction_logits, predict_from=config.model.predict_from)
    train, val = _batches(manifest, "train"), _batches(manifest, "val")
    history = []
    for epoch in range(1, epochs + 1):
        stats = train_one_epoch(model, train, optimizer, stage1_loss, device=CPU)
        predictions = evaluate_epoch(model, val, logits_fn, device=CPU, loss_fn=stage1_loss)
        metrics = {
            "epoch": epoch,
            "train_loss": stats.loss,
            "val_loss": predictions.loss_sum / len(predictions.probs),
            **validation_metrics(predictions.labels, predictions.probs, info.eval_indices()),
            "lr": optimizer.param_groups[0]["lr"],
        }
        history.append(metrics)
        folder = run_dir / "ray" / "stage1" / f"checkpoint_{epoch:06d}"
        folder.mkdir(parents=True)
        meta = {
            "epoch": epoch,
            "attributes": list(info.attributes),
            "eval_attributes": list(info.eval_attributes),
            "config": config.to_dict(),
            "metrics": metrics,
            "history": history,
        }
        save_checkpoint(
            str(folder), model, optimizer, scheduler, make_grad_scaler(CPU, False), meta
        )
    config.save(run_dir / "config.yaml")
    best, _ = load_stage1_checkpoint(best_checkpoint(str(run_dir)))
    table, _ = read_manifest(manifest)
    for split in ("train", "val", "test"):
        batches = _batches(manifest, split)
        with torch.no_grad():
            outputs = [best(normalize(batch["image"])) for batch in batches]
        rows = split_rows(table, split)
        write_split_logits(
            RunDir(str(run_dir)).logits(split),
            SplitLogits(
                images=rows.column("image").to_pylist(),
                labels=labels_matrix(rows),
                shared=torch.cat([o.shared for o in outputs]).numpy(),
                specific=None
                if head == "baseline"
                else torch.cat([o.specific for o in outputs]).numpy(),
                attributes=info.attributes,
                eval_attributes=info.eval_attributes,
            ),
        )
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A CAM-PAR run, the same run with CFAR, and a baseline-head run."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("evaluate")
    manifest = generate_synthetic(str(root / "data"), n=80, size=SIZE, seed=0)
    campar = train_tiny_run(root / "campar", manifest, "campar")
    baseline = train_tiny_run(root / "baseline", manifest, "baseline")
    with_cfar = root / "campar_cfar"
    shutil.copytree(campar, with_cfar)
    fit_cfar(str(with_cfar), CfarConfig(solver="local", factors=4, keys=6, fc2_epochs=30))
    return {"campar": campar, "baseline": baseline, "cfar": with_cfar, "manifest": Path(manifest)}


@pytest.fixture(scope="module")
def report(runs) -> dict:
    return evaluate(str(runs["cfar"]), "test", baseline_run=str(runs["baseline"]), angle_images=48)


@pytest.fixture(scope="module")
def protocol_reports(runs, tmp_path_factory) -> dict[tuple[str, str], dict]:
    """``campar evaluate`` of the CFAR run under every threshold protocol, on val and test:
    (split, protocol) -> metrics.json, with the Markdown and HTML reports' text added."""
    reports = {}
    for split in ("val", "test"):
        for protocol in THRESHOLD_PROTOCOLS:
            out = tmp_path_factory.mktemp(f"report-{split}")
            flags = ["--split", split, "--out", str(out), "--threshold", protocol]
            images = ["--angle-images", "0", "--cam-images", "0"]
            assert main(["evaluate", "--run-dir", str(runs["cfar"]), *flags, *images]) == 0
            metrics = json.loads((out / "metrics.json").read_text())
            metrics["markdown"] = (out / "report.md").read_text()
            metrics["html"] = (out / "report.html").read_text()
            reports[split, protocol] = metrics
    return reports


def test_every_figure_is_a_valid_png(report):
    figures = [path for name, path in report["files"].items() if name.endswith(".png")]
    assert sorted(os.path.basename(p) for p in figures) == [
        "angles.png", "cams.png", "per_attribute.png", "training.png",
    ]  # fmt: skip
    for path in figures:
        data = Path(path).read_bytes()
        assert data.startswith(PNG_SIGNATURE), path
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 100


class _Links(html.parser.HTMLParser):
    """Collects every src/href and counts images; fails on malformed nesting of tables."""

    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.images = 0
        self.open_tables = 0

    def handle_starttag(self, tag, attrs):
        self.links += [value for name, value in attrs if name in ("src", "href")]
        self.images += tag == "img"
        self.open_tables += tag == "table"

    def handle_endtag(self, tag):
        self.open_tables -= tag == "table"


def test_html_is_one_self_contained_page(report):
    page = Path(report["files"]["html"]).read_text()
    parser = _Links()
    parser.feed(page)
    parser.close()
    assert parser.images == 4 and parser.open_tables == 0
    assert parser.links and all(link.startswith("data:image/png;base64,") for link in parser.links)
    assert "<link" not in page and "@import" not in page and "url(" not in page


@pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason=f"headless Chromium not installed at {CHROMIUM}"
)
def test_html_renders_in_headless_chromium(report, tmp_path):
    shot = tmp_path / "page.png"
    subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
         "file://" + report["files"]["html"]],
        check=True, timeout=60, capture_output=True,
    )  # fmt: skip
    assert shot.read_bytes().startswith(PNG_SIGNATURE)


def _table_rows(markdown: str, heading: str) -> list[list[str]]:
    """Body rows of the first table after ``## heading``."""
    section = markdown.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[2:]]


def test_cam_overlays_show_distinct_persons(report, runs):
    """The test split lists each person's images together (3 of p00001 first): the overlays
    take one image of each of four persons instead of the first four images."""
    markdown = Path(report["files"]["markdown"]).read_text()
    names = [row[0] for row in _table_rows(markdown, "Class activation maps")]
    table, _ = read_manifest(str(runs["manifest"]))
    images, identities = table.column("image").to_pylist(), table.column("identity").to_pylist()
    person = dict(zip(images, identities, strict=True))
    assert len(names) == 4 and len({person[name] for name in names}) == 4


def test_cam_captions_keep_the_whole_file_name():
    name = "/data/PETA/PETA dataset/TownCentre/archive/0123_FRAME_2011_RGB_of_a_person.png"
    caption = image_caption(name)
    assert caption.replace("\n", "") == "TownCentre/archive/0123_FRAME_2011_RGB_of_a_person.png"
    assert max(map(len, caption.splitlines())) <= 24


def test_report_numbers_equal_metrics_json(report):
    metrics = json.loads(Path(report["files"]["metrics"]).read_text())
    markdown = Path(report["files"]["markdown"]).read_text()
    overall = _table_rows(markdown, "Overall metrics")
    assert len(overall) == len(metrics["sources"]) == 3
    for row, source in zip(overall, metrics["sources"].values(), strict=True):
        assert row[0].startswith(source["label"])
        assert float(row[1]) == pytest.approx(source["threshold"], abs=0.005)
        expected = [source[k] for k in ("mA", "accuracy", "precision", "recall", "f1")]
        assert [float(cell) for cell in row[3:]] == pytest.approx(
            [100 * value for value in expected], abs=0.005
        )
    final = metrics["sources"][metrics["final"]]
    attribute_rows = _table_rows(markdown, "Per attribute")
    assert [row[0] for row in attribute_rows] == sorted(
        final["attributes"], key=lambda name: final["attributes"][name]["accuracy"]
    )
    for row in attribute_rows:
        values = final["attributes"][row[0]]
        assert float(row[1]) == pytest.approx(100 * values["accuracy"], abs=0.005)
        assert float(row[6]) == pytest.approx(100 * values["f1"], abs=0.005)
    page = Path(report["files"]["html"]).read_text()
    assert all(f"<td>{cell}</td>" in page for row in overall for cell in row[3:])


def test_report_shows_raw_and_calibrated_side_by_side(report):
    markdown = Path(report["files"]["markdown"]).read_text()
    rows = _table_rows(markdown, "Every threshold protocol and calibration")
    calibration = report["calibration"]
    assert [row[1] for row in rows] == [*THRESHOLD_PROTOCOLS, CALIBRATED]
    for row in rows:
        assert row[2] == f"{100 * report['protocols'][row[1]]['mA']:.2f}"
    assert {p: calibration[p] for p in ("0.5", CALIBRATED)} == {
        p: report["protocols"][p] for p in ("0.5", CALIBRATED)
    }
    assert set(calibration["offsets"]) == set(report["eval_attributes"])
    assert calibration["how"].startswith("calibrated: per-attribute offsets on stage1_cfar")


def test_sources_thresholds_and_cfar(report):
    metrics = report
    assert list(metrics["sources"]) == ["stage1_shared", "stage1_specific", "stage1_cfar"]
    assert metrics["final"] == "stage1_cfar" and metrics["cfar"] is True
    assert metrics["threshold_protocol"] == "0.5"
    assert all(s["threshold"] == 0.5 for s in metrics["sources"].values())
    assert len(metrics["eval_attributes"]) == 15 and metrics["images"] > 0


def test_every_report_states_its_threshold_protocol(protocol_reports):
    for (split, protocol), metrics in protocol_reports.items():
        assert metrics["threshold_protocol"] == protocol
        title = f"# Evaluation of {metrics['run_dir']} ({split}, threshold {protocol})"
        assert metrics["markdown"].startswith(title)
        assert f"Threshold protocol {protocol}: " in metrics["markdown"]
        assert f"Threshold protocol {protocol}: " in metrics["html"]
    assert "the fixed value PAR papers report at" in protocol_reports["test", "0.5"]["markdown"]


def _val_probabilities(run_dir: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Val labels and each source's val probabilities, over the evaluated attributes."""
    val = read_split_logits(RunDir(str(run_dir)).logits("val"))
    columns = eval_columns(val)
    probs = source_probabilities(val, "specific", load_cfar_if_fitted(str(run_dir)))
    return val.labels[:, columns], {name: p[:, columns] for name, p in probs.items()}


def test_each_protocol_takes_its_thresholds_from_val(protocol_reports, runs):
    labels, probs = _val_probabilities(runs["cfar"])
    cfar_json = json.loads((runs["cfar"] / "cfar" / "cfar.json").read_text())
    for split in ("val", "test"):
        fixed = protocol_reports[split, "0.5"]["sources"]
        assert {(s["threshold"], s["threshold_source"]) for s in fixed.values()} == {
            (0.5, "fixed (0.5)")
        }
        val = protocol_reports[split, "val"]["sources"]
        assert val["stage1_cfar"]["threshold"] == cfar_json["threshold"]
        assert val["stage1_specific"]["threshold"] == choose_threshold(
            labels, probs["stage1_specific"]
        )
        assert all(s["threshold_source"].startswith("val (") for s in val.values())
        per_attribute = protocol_reports[split, "val-per-attribute"]["sources"]
        for name, source in per_attribute.items():
            expected = choose_threshold(labels, probs[name], per_attribute=True)
            np.testing.assert_allclose(source["threshold"], expected)
            by_attribute = [values["threshold"] for values in source["attributes"].values()]
            np.testing.assert_allclose(by_attribute, expected)


def test_on_val_per_attribute_beats_val_beats_half(protocol_reports):
    """On the split the thresholds are chosen on, each protocol can only gain: 0.5 is one of the
    global grid's values, and each attribute's own best is at least one value for all."""
    by_protocol = {p: protocol_reports["val", p]["sources"] for p in THRESHOLD_PROTOCOLS}
    for name in by_protocol["0.5"]:
        fixed, val, per_attribute = (by_protocol[p][name]["mA"] for p in THRESHOLD_PROTOCOLS)
        assert fixed <= val + 1e-12 and val <= per_attribute + 1e-12, name
    assert any(
        by_protocol["val-per-attribute"][name]["mA"] > by_protocol["val"][name]["mA"]
        for name in by_protocol["val"]
    )
    per_attribute_table = _table_rows(
        protocol_reports["val", "val-per-attribute"]["markdown"], "Overall metrics"
    )
    assert all(row[1].startswith("per attribute, ") for row in per_attribute_table)


def test_fit_cfar_and_evaluate_give_one_protocol_one_figure(runs, protocol_reports):
    """fit-cfar's metrics.json and evaluate's, on the same run: every source they share, on
    both splits, has the same five figures under the same protocol, computed once."""
    fitted = json.loads((runs["cfar"] / "cfar" / "metrics.json").read_text())
    columns = {"stage1_shared": "stage1_shared", "stage1_specific": "stage1_specific"}
    columns["stage1_cfar"] = fitted["selected"]
    for split in ("val", "test"):
        for protocol, key in (("val", split), ("0.5", f"{split}_at_0.5")):
            report = protocol_reports[split, protocol]
            for source, column in columns.items():
                ours = {k: report["sources"][source][k] for k in fitted[key][column]}
                assert ours == fitted[key][column], (split, protocol, source)
            final = {k: report["protocols"][protocol][k] for k in fitted[key][column]}
            assert final == fitted[key][fitted["selected"]]


def test_default_protocol_metrics_are_par_metrics_at_half(runs, tmp_path):
    flags = ["--split", "val", "--out", str(tmp_path), "--angle-images", "8"]
    assert main(["evaluate", "--run-dir", str(runs["campar"]), *flags]) == 0
    result = json.loads((tmp_path / "metrics.json").read_text())
    logits = read_split_logits(RunDir(str(runs["campar"])).logits("val"))
    columns = [logits.attributes.index(name) for name in logits.eval_attributes]
    probs = 1 / (1 + np.exp(-logits.specific.astype(np.float64)))
    expected = par_metrics(logits.labels[:, columns], probs[:, columns], 0.5)
    specific = result["sources"]["stage1_specific"]
    assert result["threshold_protocol"] == "0.5" and result["final"] == "stage1_specific"
    assert specific["threshold"] == 0.5
    for key in ("mA", "accuracy", "precision", "recall", "f1"):
        assert specific[key] == pytest.approx(expected[key], abs=1e-6)
    assert "stage1_cfar" not in result["sources"]


def test_unknown_protocol_is_refused(runs, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"unknown threshold protocol '0\.3'; valid: 0\.5, val"):
        evaluate(str(runs["campar"]), "test", str(tmp_path), threshold="0.3")
    with pytest.raises(SystemExit):
        main(["evaluate", "--run-dir", str(runs["campar"]), "--threshold", "0.3"])
    assert "invalid choice: '0.3'" in capsys.readouterr().err


def test_fig7_angles_baseline_next_to_campar(report, runs):
    assert len(report["angles"]) == 2
    labels = list(report["angles"])
    assert labels[0].startswith("CAM-PAR") and labels[1].startswith("baseline")
    table, info = read_manifest(str(runs["manifest"]))
    test_labels = labels_matrix(split_rows(table, "test"))[:48]
    positives = int(test_labels[:, info.eval_indices()].sum())
    for stats in report["angles"].values():
        assert stats["count"] == positives
        assert 0 <= stats["q1"] <= stats["median"] <= stats["q3"] <= 180


def test_predictor_of_a_run_reproduces_its_logits(runs, tmp_path):
    logits = read_split_logits(RunDir(str(runs["campar"])).logits("test"))
    images = [str(runs["manifest"].parent / name) for name in logits.images[:6]]
    predictor = load_model(str(runs["campar"]))
    expected = probabilities(prediction_logits(logits, "specific"))[:6]
    np.testing.assert_allclose(predictor.predict_proba(images), expected, atol=1e-5)
    folder = save_bundle(str(runs["campar"]), str(tmp_path / "bundle"))
    bundle = load_model(folder)
    np.testing.assert_allclose(bundle.predict_proba(images), expected, atol=1e-5)
    assert bundle.threshold == predictor.threshold == 0.5
    assert bundle.attributes == logits.attributes
    for protocol in ("val", "val-per-attribute"):
        from_bundle = load_model(folder, protocol)
        assert from_bundle.decision == load_model(str(runs["campar"]), protocol).decision
        assert from_bundle.decision.protocol == protocol
    thresholds = from_bundle.threshold
    assert len(thresholds) == len(logits.attributes) and len(set(thresholds)) > 1
    probs = from_bundle.predict_proba(images)
    assert from_bundle.predict(images) == [
        [a for a, p, t in zip(logits.attributes, row, thresholds, strict=True) if p >= t]
        for row in probs
    ]


def test_compare_runs_writes_the_ablation_table(runs, tmp_path):
    rows = compare_runs([str(runs["baseline"]), str(runs["cfar"])], str(tmp_path), angle_images=16)
    assert [(r["head"], r["CFAR"]) for r in rows] == [
        ("baseline", False), ("campar", False), ("campar", True),
    ]  # fmt: skip
    cfar_metrics = json.loads((runs["cfar"] / "cfar" / "metrics.json").read_text())
    assert rows[2]["mA"] == pytest.approx(cfar_metrics["test_at_0.5"]["cfar_dictionary"]["mA"])
    with open(tmp_path / "compare.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [float(r["mA"]) for r in table] == pytest.approx([100 * r["mA"] for r in rows], abs=1e-3)
    markdown = (tmp_path / "compare.md").read_text()
    assert re.search(r"\| campar_cfar \| campar \| no \| yes \| \d+\.\d\d \|", markdown)
    assert markdown.startswith("# Ablation (test split, threshold 0.5)")
    assert (tmp_path / "angles.png").read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.parametrize("protocol", ["val", "val-per-attribute"])
def test_compare_cli_follows_the_protocol(runs, protocol_reports, tmp_path, capsys, protocol):
    flags = ["--split", "val", "--threshold", protocol, "--angle-images", "0"]
    assert main(["compare", str(runs["cfar"]), "--out", str(tmp_path), *flags]) == 0
    assert capsys.readouterr().out.startswith(f"Threshold protocol {protocol}: ")
    markdown = (tmp_path / "compare.md").read_text()
    assert markdown.startswith(f"# Ablation (val split, threshold {protocol})")
    assert f"Threshold protocol {protocol}: " in markdown
    with open(tmp_path / "compare.csv") as handle:
        table = list(csv.DictReader(handle))
    sources = protocol_reports["val", protocol]["sources"]
    expected = [sources["stage1_specific"]["mA"], sources["stage1_cfar"]["mA"]]
    assert [float(row["mA"]) for row in table] == pytest.approx(
        [100 * value for value in expected], abs=1e-3
    )


def test_report_without_images_still_has_the_numbers(runs, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(runs["campar"], moved)
    config = yaml.safe_load((moved / "config.yaml").read_text())
    config["data"]["manifest"] = str(tmp_path / "gone" / "manifest.parquet")
    (moved / "config.yaml").write_text(yaml.safe_dump(config))
    result = evaluate(str(moved), "test")
    markdown = Path(result["files"]["markdown"]).read_text()
    assert markdown.count("Skipped: the run's images cannot be read") == 2
    assert "angles" not in result and Path(result["files"]["training.png"]).exists()


def test_unknown_split_is_refused_with_the_valid_ones(runs):
    with pytest.raises(ValueError, match="'train'; valid: val, test"):
        evaluate(str(runs["campar"]), "train")


def test_threshold_study_scores_the_val_protocol_as_the_report_does(runs, protocol_reports):
    """bench.threshold_protocol's ``val`` protocol must be the report's: same thresholds and mA."""
    reported = protocol_reports["test", "val"]["sources"]
    scores = score_run(str(runs["cfar"]))
    assert sorted(scores) == ["stage1_cfar", "stage1_specific"]
    for source, by_protocol in scores.items():
        assert by_protocol["val"]["threshold"] == pytest.approx(reported[source]["threshold"])
        assert by_protocol["val"]["mA"] == pytest.approx(reported[source]["mA"])
        assert by_protocol["fixed"]["threshold"] == 0.5
    assert sorted(score_run(str(runs["baseline"]))) == ["stage1_shared"]


@pytest.mark.ray
@pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("onnx", "onnxruntime")),
    reason="the ONNX leg needs the optional extra campar-ray[onnx]",
)
def test_calibrated_predict_bundle_and_onnx_agree_with_evaluate(
    runs, report, ray_cluster, tmp_path
):
    """One calibration, four readers: evaluate's calibrated figures (stored logits), the
    bundle's predictor, batch prediction (Ray Data) and the ONNX file, on the test images.

    On the stage-1 run: fc2's bias already holds the val offsets, so a CFAR run's
    calibration stays near 0 and would not tell an applied offset from an ignored one."""
    import onnxruntime

    assert report["calibration"]["source"] == "stage1_cfar"
    run = str(runs["campar"])
    stage1 = evaluate(run, "test", str(tmp_path / "report"), angle_images=0, cam_images=0)
    logits = read_split_logits(RunDir(run).logits("test"))
    columns = eval_columns(logits)
    labels = logits.labels[:, columns]
    expected = stage1["calibration"][CALIBRATED]
    assert stage1["calibration"]["source"] == "stage1_specific"
    assert expected != stage1["calibration"]["0.5"]  # calibration changes the figures

    def figures(present: np.ndarray) -> dict[str, float]:
        return summary(par_metrics(labels, present[:, columns].astype(np.float32), 0.5))

    bundle = save_bundle(run, str(tmp_path / "bundle"))
    predictor = load_model(bundle, CALIBRATED)
    images = [str(runs["manifest"].parent / name) for name in logits.images]
    probs = predictor.predict_proba(images)
    assert figures(predictor.decide(probs)) == pytest.approx(expected, abs=1e-12)

    out = tmp_path / "predictions.parquet"
    predict(bundle, str(runs["manifest"]), str(out), threshold=CALIBRATED)
    rows = {
        path: set(names)
        for path, names in zip(
            *pq.read_table(out, columns=["path", "predicted"]).to_pydict().values(), strict=True
        )
    }
    predicted = np.array(
        [[name in rows[image] for name in logits.attributes] for image in logits.images]
    )
    assert figures(predicted) == pytest.approx(expected, abs=1e-12)

    export_model(bundle, "onnx", str(tmp_path / "model.onnx"), progress=False)
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"))
    exported = session.run(None, {"images": normalize(predictor.prepare(images)).numpy()})[0]
    assert figures(exported >= 0.5) == pytest.approx(expected, abs=1e-12)
