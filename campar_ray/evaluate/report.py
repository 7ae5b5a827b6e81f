"""``campar evaluate``: a run's metrics on one split, as ``metrics.json`` and a readable report.

Writes into ``<run>/report/<split>/`` (or ``out_dir``): ``metrics.json``, ``report.md`` with
its PNG figures, and ``report.html``, one self-contained page with the same figures
embedded. The report holds the overall metrics of every prediction source side by side, the
per-attribute results worst first, the paper's Fig. 7 (angles between each present
attribute's feature vector and its classifier weight; a baseline run's box next to this
run's when given), CAM overlays of a few images, and the training curves. Every figure is
at one threshold protocol (``threshold``: 0.5 by default, as PAR papers report), which the
report names.

Numbers come from the stored logits; angles and CAMs need the network and the images, which
are read from the run's manifest. When the manifest cannot be read (a run copied without its
data), those two sections say so and the rest of the report is still written.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

import numpy as np

from campar_ray import storage
from campar_ray.bundle import ParPredictor, load_model
from campar_ray.config import Config
from campar_ray.data.images import ImageLimits
from campar_ray.decision import DECISION_PROTOCOLS, SOURCE_LABELS
from campar_ray.evaluate import plots
from campar_ray.evaluate.document import Figure, Section, Table, render_html, render_markdown
from campar_ray.evaluate.metrics_table import (
    check_split,
    metrics_document,
    run_config,
    score_split,
)
from campar_ray.evaluate.probes import (
    CamSample,
    angle_summary,
    angles,
    cam_samples,
    eval_mask,
    load_split_images,
)
from campar_ray.metrics import (
    SUMMARY_HEADERS,
    SUMMARY_KEYS,
    THRESHOLD_PROTOCOLS,
    check_protocol,
    protocol_statement,
)
from campar_ray.run.checkpoints import best_checkpoint, read_meta, training_history
from campar_ray.run.layout import RunDir


def evaluate(
    run_dir: str,
    split: str = "test",
    out_dir: str | None = None,
    *,
    baseline_run: str | None = None,
    threshold: str = "0.5",
    angle_images: int = 256,
    cam_images: int = 4,
    cams_per_image: int = 4,
) -> dict[str, Any]:
    """Evaluate ``run_dir`` on ``split`` (``val`` or ``test``) and write the report.

    ``threshold`` is the protocol (:data:`campar_ray.metrics.THRESHOLD_PROTOCOLS`): ``0.5``,
    or each source's threshold chosen on val, one (``val``) or one per attribute
    (``val-per-attribute``); never on test.
    ``angle_images`` images of the split feed Fig. 7, the first ``cam_images`` of them the
    CAM grid. Returns the content of ``metrics.json`` (fractions in [0, 1]) with the paths
    of the written files under ``files``.
    """
    check_split(split)
    check_protocol(threshold)
    out_dir = out_dir or RunDir(run_dir).report(split)
    config = run_config(run_dir)
    predictor = load_model(run_dir, threshold)
    scored, logits = score_split(
        run_dir, split, config.model.predict_from, predictor.cfar, threshold, config.data.manifest
    )
    document = metrics_document(run_dir, split, config, scored, logits, predictor.cfar, threshold)
    sections = [
        _overview(document),
        _overall_section(document),
        *_source_sections(document),
        _protocol_section(document),
        _attribute_section(document),
    ]
    image_sections, angle_stats = _image_sections(
        predictor, config, run_dir, split, baseline_run, angle_images, cam_images, cams_per_image
    )
    sections += image_sections
    if angle_stats:
        document["angles"] = angle_stats
    sections.append(_training_section(run_dir))
    document["files"] = _write(
        out_dir, document, sections, f"Evaluation of {run_dir} ({split}, threshold {threshold})"
    )
    return document


def run_label(config: Config, run_dir: str) -> str:
    """``CAM-PAR + fusion (run-name)``: what a run is, for figure labels and tables."""
    head = "CAM-PAR" if config.model.head == "campar" else "baseline"
    fusion = " + fusion" if config.model.fusion else ""
    return f"{head}{fusion}\n({posixpath.basename(run_dir.rstrip('/'))})"


def percent(value: float) -> str:
    """How every metric appears in the report: a percentage with two decimals."""
    return f"{100 * value:.2f}"


def _threshold_text(threshold: float | list[float] | tuple[float, ...]) -> str:
    """A threshold in a table cell: ``0.50``, or the range of per-attribute ones."""
    if np.ndim(threshold) == 0:
        return f"{threshold:.2f}"
    return f"per attribute, {min(threshold):.2f}-{max(threshold):.2f}"


def _overview(document: dict[str, Any]) -> Section:
    model = document["model"]
    return Section(
        "Run",
        [
            f"Split {document['split']}: {document['images']} images, "
            f"{len(document['eval_attributes'])} evaluated attributes. "
            f"Backbone {model['backbone']}, head {model['head']}, "
            f"fusion {'on' if model['fusion'] else 'off'}, "
            f"stage-1 predictions from {model['predict_from']} logits, "
            f"input {model['image_size'][0]}x{model['image_size'][1]}, "
            f"CFAR {'fitted' if document['cfar'] else 'not fitted'}.",
            f"Predictions (predict, export) use: {SOURCE_LABELS[document['final']]}.",
            f"{protocol_statement(document['threshold_protocol'])} Thresholds are never chosen "
            f"on test data; --threshold picks the protocol ({', '.join(THRESHOLD_PROTOCOLS)}).",
        ],
    )


def _overall_section(document: dict[str, Any]) -> Section:
    rows = []
    for name, source in document["sources"].items():
        marker = " (used for predictions)" if name == document["final"] else ""
        rows.append(
            [
                source["label"] + marker,
                _threshold_text(source["threshold"]),
                source["threshold_source"],
                *(percent(source[key]) for key in SUMMARY_KEYS),
            ]
        )
    header = [
        "Source",
        "Threshold",
        "Threshold from",
        *(f"{SUMMARY_HEADERS[k]} (%)" for k in SUMMARY_KEYS),
    ]
    return Section(
        "Overall metrics",
        [
            "Label-based mA and instance-based accuracy, precision, recall and F1 (the PAR "
            "reference definitions) over the evaluated attributes.",
            Table(header, rows),
        ],
    )


def _source_sections(document: dict[str, Any]) -> list[Section]:
    """Per data source (the manifest's ``source``): every prediction source's figures on that
    source's images alone; none when the split has one data source."""
    sources = document["sources"]
    if not any("by_source" in source for source in sources.values()):
        return []
    rows = [
        [data_source, source["label"], *(percent(figures[key]) for key in SUMMARY_KEYS)]
        for name, source in sources.items()
        for data_source, figures in source["by_source"].items()
    ]
    rows.sort(key=lambda row: row[0])
    header = ["Data source", "Predictions", *(f"{SUMMARY_HEADERS[k]} (%)" for k in SUMMARY_KEYS)]
    return [
        Section(
            "Metrics per data source",
            [
                "The overall metrics on each data source's images alone (the manifest's source "
                "column), at the same thresholds; unknown labels are left out, so a data source "
                "is scored on the attributes it annotates.",
                Table(header, rows),
            ],
        )
    ]


def _protocol_section(document: dict[str, Any]) -> Section:
    """The final source under every decision protocol, as ``campar evaluate`` prints it."""
    calibration = document["calibration"]
    label = SOURCE_LABELS[document["final"]]
    rows = [
        [label, protocol, *(percent(document["protocols"][protocol][key]) for key in SUMMARY_KEYS)]
        for protocol in DECISION_PROTOCOLS
    ]
    offsets = calibration["offsets"].values()
    header = ["Source", "Threshold", *(f"{SUMMARY_HEADERS[k]} (%)" for k in SUMMARY_KEYS)]
    return Section(
        "Every threshold protocol and calibration",
        [
            "The final source under each threshold protocol (--threshold; fit-cfar and tune "
            "report val) and calibrated: "
            f"{calibration['how']}. Offsets (logit units) of the evaluated attributes: "
            f"{min(offsets):+.2f} to {max(offsets):+.2f}. Predict (--threshold calibrated), the "
            "bundle and the exported files apply them.",
            Table(header, rows),
        ],
    )


def _attribute_section(document: dict[str, Any]) -> Section:
    final = document["sources"][document["final"]]
    names = list(final["attributes"])
    values = {
        key: np.array([final["attributes"][n][key] for n in names])
        for key in final["attributes"][names[0]]
    }
    order = np.argsort(values["accuracy"], kind="stable")
    keys = ("accuracy", "positive_rate", "predicted_rate", "precision", "recall", "f1")
    rows = [
        [names[i], *(percent(values[key][i]) for key in keys), f"{values['threshold'][i]:.2f}"]
        for i in order
    ]
    header = ["Attribute", "Accuracy (mA term, %)", "Positive rate (%)", "Predicted rate (%)",
              "Precision (%)", "Recall (%)", "F1 (%)", "Threshold"]  # fmt: skip
    chart = plots.per_attribute_chart(
        names, values["accuracy"], values["positive_rate"], values["f1"]
    )
    return Section(
        f"Per attribute: {final['label']}",
        [
            "Sorted worst first by the attribute's mA term, at threshold "
            f"{_threshold_text(final['threshold'])} (protocol "
            f"{document['threshold_protocol']}).",
            Table(header, rows),
            Figure("per_attribute.png", chart, "Per-attribute accuracy, F1 and positive rate"),
        ],
    )


def _image_sections(
    predictor: ParPredictor,
    config: Config,
    run_dir: str,
    split: str,
    baseline_run: str | None,
    angle_images: int,
    cam_images: int,
    cams_per_image: int,
) -> tuple[list[Section], dict[str, dict[str, float]]]:
    """Fig. 7 and the CAM grid (both need the images, read once), and the angle statistics."""
    angle_section = Section("Feature/weight angles (paper Fig. 7)")
    cam_section = Section("Class activation maps")
    try:
        images = load_split_images(
            config.data.manifest,
            split,
            predictor.image_size,
            max(angle_images, cam_images, 1),
            ImageLimits.of(config.data),
            predictor.config.data.interpolation,
        )
    except (FileNotFoundError, ValueError) as error:
        note = f"Skipped: the run's images cannot be read ({error})."
        return [Section(angle_section.title, [note]), Section(cam_section.title, [note])], {}
    groups = {}
    if angle_images > 0:
        groups[run_label(config, run_dir)] = angles(predictor, images.first(angle_images))
        if baseline_run is not None:
            other = load_model(baseline_run)
            other_data = run_config(baseline_run).data
            other_images = load_split_images(
                other_data.manifest, split, other.image_size, angle_images,
                ImageLimits.of(other_data), other.config.data.interpolation,
            )  # fmt: skip
            groups[run_label(other.config, baseline_run)] = angles(other, other_images)
        angle_section.blocks += _angle_blocks(groups)
    else:
        angle_section.blocks.append("Skipped: angle_images is 0.")
    samples = cam_samples(predictor, images.distinct_persons(cam_images), cam_images)
    if samples:
        cam_section.blocks += _cam_blocks(samples, predictor, cams_per_image)
    else:
        cam_section.blocks.append("Skipped: no image to show (cam_images is 0 or none decodes).")
    stats = {label.replace("\n", " "): angle_summary(v) for label, v in groups.items()}
    return [angle_section, cam_section], stats


def _angle_blocks(groups: dict[str, np.ndarray]) -> list[Any]:
    rows = []
    for label, values in groups.items():
        stats = angle_summary(values)
        if stats["count"] == 0:
            rows.append([label.replace("\n", " "), "0", "", "", "", ""])
            continue
        rows.append(
            [
                label.replace("\n", " "),
                str(stats["count"]),
                f"{stats['median']:.2f}",
                f"{stats['q1']:.2f}",
                f"{stats['q3']:.2f}",
                percent(stats["below_90"]),
            ]
        )
    header = ["Run", "Pairs", "Median (°)", "Q1 (°)", "Q3 (°)", "Below 90° (%)"]
    return [
        "Angle between each present attribute's feature vector v (baseline: GAP(f); CAM-PAR: "
        "GAP(CAM_j * f)) extended by 1 and its classifier [w_j, b_j] (BatchNorm folded in), "
        "over (image, present evaluated attribute) pairs. Their dot product is the logit, so "
        "below 90 degrees is exactly a positive prediction at threshold 0.5, for either head; "
        "smaller is more robust. (Without the bias, CAM-PAR's angle to w_j cannot exceed 90 "
        "degrees under the thesis's CAM: w_j . GAP(CAM_j * f) >= 0.)",
        Table(header, rows),
        Figure("angles.png", plots.angle_boxplot(groups), "Angles of present attributes"),
    ]


def _cam_blocks(samples: list[CamSample], predictor: ParPredictor, per_image: int) -> list[Any]:
    evaluated = eval_mask(predictor)
    shown, rows = [], []
    for sample in samples:
        predicted = predictor.decide(sample.probs) & evaluated
        present = (sample.labels > 0) & evaluated
        interesting = np.flatnonzero(predicted | present)
        ranked = interesting[np.argsort(-sample.probs[interesting], kind="stable")]
        if len(ranked) < per_image:
            rest = np.flatnonzero(evaluated & ~(predicted | present))
            ranked = np.concatenate([ranked, rest[np.argsort(-sample.probs[rest], kind="stable")]])
        shown.append(ranked[:per_image].tolist())
        rows.append(
            [
                sample.name,
                ", ".join(predictor.attributes[i] for i in np.flatnonzero(predicted)) or "-",
                ", ".join(predictor.attributes[i] for i in np.flatnonzero(present)) or "-",
            ]
        )
    grid = plots.cam_grid(samples, predictor.attributes, shown)
    return [
        "Each row: the image, then CAM overlays for its predicted and present attributes "
        "(most probable first); predictions at threshold "
        f"{_threshold_text(predictor.threshold)} (protocol {predictor.decision.protocol}).",
        Figure("cams.png", grid, "CAM overlays with final probabilities and labels"),
        Table(["Image", "Predicted", "True"], rows),
    ]


def _training_section(run_dir: str) -> Section:
    section = Section("Training curves")
    try:
        history = training_history(run_dir)
    except FileNotFoundError as error:
        section.blocks.append(f"No training history: {error}.")
        return section
    best = max(history, key=lambda entry: entry["val_mA"])
    kept = read_meta(best_checkpoint(run_dir))["metrics"]
    section.blocks += [
        f"{len(history)} epochs; best validation mA {percent(best['val_mA'])} at epoch "
        f"{best['epoch']}; the run keeps epoch {kept['epoch']} (train.checkpoint_rule).",
        Figure("training.png", plots.training_curves(history), "Stage-1 training curves"),
    ]
    return section


def _write(
    out_dir: str, document: dict[str, Any], sections: list[Section], title: str
) -> dict[str, str]:
    files = {"metrics": storage.join(out_dir, "metrics.json")}
    for section in sections:
        for block in section.blocks:
            if isinstance(block, Figure):
                files[block.file] = storage.join(out_dir, block.file)
                storage.write_bytes(files[block.file], block.png)
    files["markdown"] = storage.join(out_dir, "report.md")
    files["html"] = storage.join(out_dir, "report.html")
    storage.write_bytes(files["markdown"], render_markdown(title, sections).encode())
    storage.write_bytes(files["html"], render_html(title, sections).encode())
    storage.write_bytes(
        files["metrics"], json.dumps({**document, "files": files}, indent=1).encode()
    )
    return files
