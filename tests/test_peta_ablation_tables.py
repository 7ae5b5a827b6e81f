"""The PETA ablation's results bookkeeping: merging two machines' results, judging spread.

The tables are trained for hours (or on a lent GPU) and written by more than one process, so
the merge must never drop a row and the text must never claim a difference the seeds do not
support. No training here: rows are small dicts shaped like ``run_row``'s.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.peta_ablation import aggregate, device_statement, main, merged, spread_statement


def row(name: str, seed: int, m_a: float, init: str = "scratch") -> dict:
    return {
        "name": name,
        "seed": seed,
        "init": init,
        "mA": m_a,
        "accuracy": 0.4,
        "precision": 0.5,
        "recall": 0.6,
        "f1": 0.55,
        "threshold": 0.5,
    }


def test_merge_keeps_rows_of_both_and_ours_win_on_conflict() -> None:
    ours = {
        "rows": [row("baseline", 0, 0.60), row("baseline", 1, 0.61)],
        "angle_samples": {"scratch/baseline/seed0": [80.0]},
        "angles": {"seed": 0},
    }
    theirs = {
        "rows": [row("baseline", 0, 0.99), row("baseline", 0, 0.70, init="imagenet")],
        "angle_samples": {"imagenet/baseline/seed0": [70.0], "scratch/baseline/seed0": [1.0]},
        "angles_imagenet": {"seed": 0},
    }
    result = merged(ours, theirs)
    keys = sorted((r["init"], r["seed"], r["mA"]) for r in result["rows"])
    assert keys == [("imagenet", 0, 0.70), ("scratch", 0, 0.60), ("scratch", 1, 0.61)]
    assert result["angle_samples"]["scratch/baseline/seed0"] == [80.0]
    assert result["angle_samples"]["imagenet/baseline/seed0"] == [70.0]
    assert result["angles"] == {"seed": 0} and result["angles_imagenet"] == {"seed": 0}


def test_spread_statement_judges_only_rows_with_two_seeds() -> None:
    one_seed = aggregate([row("baseline", 0, 0.60), row("fusion", 0, 0.70)])
    assert spread_statement(one_seed).startswith("Fewer than two seeds")

    table = aggregate(
        [
            row("baseline", 0, 0.60),
            row("baseline", 1, 0.62),  # std 0.014
            row("fusion", 0, 0.70),
            row("fusion", 1, 0.71),  # +9.5 points, far beyond the spread
            row("campar", 0, 0.50),  # one seed: not judged
        ]
    )
    text = spread_statement(table)
    assert "+ fusion mA +9.50" in text
    assert "Not yet judged (one seed): + CAM-PAR." in text
    assert "+ CAM-PAR mA" not in text


def test_merge_flag_folds_a_gpu_result_file_into_the_tables(tmp_path: Path) -> None:
    def record(rows: list[dict], **figures: object) -> str:
        return json.dumps({"figures": {"rows": rows, **figures}})

    out = tmp_path / "results"
    out.mkdir()
    (out / "peta_ablation.json").write_text(record([row("baseline", 0, 0.60)]))
    gpu = tmp_path / "gpu.json"
    gpu.write_text(record([row("baseline", 0, 0.68, init="imagenet")], angles_imagenet={"seed": 0}))
    plot = b"plot drawn on the GPU machine"
    (tmp_path / "peta_ablation_angles_imagenet.png").write_bytes(plot)

    main(["--merge", str(gpu), "--out", str(out), "--runs", str(tmp_path / "runs")])

    rows = json.loads((out / "peta_ablation.json").read_text())["figures"]["rows"]
    assert sorted((r["init"], r["mA"]) for r in rows) == [("imagenet", 0.68), ("scratch", 0.60)]
    text = (out / "peta_ablation.md").read_text()
    assert "## Encoder trained from scratch" in text and "from ImageNet weights" in text
    assert "| baseline | 0 | 68.00 ± 0.00 |" in text
    assert (out / "peta_ablation_angles_imagenet.png").read_bytes() == plot
    assert not (tmp_path / "runs").exists(), "--merge must not prepare data or train"


def test_cfar_rows_are_also_judged_against_the_run_they_refine() -> None:
    table = aggregate(
        [
            row("baseline", 0, 0.60),
            row("baseline", 1, 0.62),
            row("campar_fusion", 0, 0.50),
            row("campar_fusion", 1, 0.51),
            row("campar_fusion_cfar", 0, 0.55),
            row("campar_fusion_cfar", 1, 0.56),  # +5 over its stage 1, -5.5 vs baseline
        ]
    )
    text = spread_statement(table)
    refined = text.split("CFAR vs the + CAM-PAR + fusion run it refines, beyond the spread: ")[1]
    assert refined.startswith("+ CAM-PAR + fusion + CFAR (dictionary) mA +5.00")
    assert "+ CAM-PAR + fusion + CFAR (dictionary) mA -5.50" in text  # vs the baseline


def test_a_table_from_two_machines_names_which_runs_each_trained() -> None:
    h200 = [{**row("baseline", seed, 0.6, "imagenet"), "device": "H200"} for seed in (0, 1)]
    h100 = [{**row("fusion", 1, 0.6, "imagenet"), "device": "H100"}]
    assert device_statement(h200, "gpu") == "device H200"
    assert device_statement(h200 + h100, "gpu") == (
        "devices H200: baseline seed 0, baseline seed 1; H100: fusion seed 1"
    )
    assert device_statement([], "cpu") == "device cpu"


def protocol_row(name: str, seed: int, m_a: dict[str, float], classifier: str) -> dict:
    """A diagnosed row: headline figures at ``val`` plus every protocol's and the floor."""
    base = {**row(name, seed, m_a["val"]), "classifier": classifier}
    base["protocols"] = {p: {**row(name, seed, value), "attr_mA": []} for p, value in m_a.items()}
    base["mean_auc"] = {"prediction": 0.8, "shared": 0.79}
    if name.startswith("campar"):
        base["mean_auc"]["specific"] = 0.81
        base["floor"] = {"mean_negatives_tied": 0.0, "mean_positives_tied": 0.0}
    return base


def test_reference_rows_form_their_own_table_with_every_protocol(tmp_path: Path) -> None:
    """Rows of --classifier reference never mix with the thesis rows, and each protocol is its
    own table (0.5 first: the headline), judged against its own spread."""
    from bench.peta_ablation import at_protocol, get_args_parser, markdown

    thesis = [row("baseline", 0, 0.60), row("campar", 0, 0.55)]
    reference = [
        protocol_row(
            name, seed, {"0.5": m + 0.01 * seed, "val": 0.6, "val-per-attribute": 0.62}, "reference"
        )
        for name, m in (("baseline", 0.60), ("campar", 0.66))
        for seed in (0, 1)
    ]
    at_half = aggregate(at_protocol(reference, "0.5"))
    assert [round(entry["mA"], 3) for entry in at_half] == [0.605, 0.665]
    args = get_args_parser().parse_args(["--classifier", "reference", "--seeds", "0", "1"])
    text = markdown(thesis + reference, args, {})
    thesis_part, reference_part = text.split("reference classifier")
    assert "### Threshold" not in thesis_part and "one value chosen on validation" in thesis_part
    headings = [line for line in reference_part.splitlines() if line.startswith("### Threshold")]
    assert [h.split()[2] for h in headings] == ["0.5", "chosen", "chosen"]
    assert "+ CAM-PAR mA +6.00" in reference_part  # at 0.5: beyond the spread
    assert "| + CAM-PAR | 80.00 | 79.00 | 81.00 | 0.00 | 0.00 |" in reference_part


def test_rows_are_diagnosed_again_from_their_evidence_when_the_run_folder_is_gone(
    tmp_path: Path,
) -> None:
    """Run folders do not outlive the machine; the evidence kept under --out does. A row holding
    an older version of the diagnostics is brought up to date from that evidence alone."""
    import numpy as np

    from bench.peta_ablation import (
        EVIDENCE_DIR,
        ROWS,
        base_config,
        get_args_parser,
        record_diagnostics,
    )
    from campar_ray.run.logits import SplitLogits, write_split_logits

    rng = np.random.default_rng(0)
    folder = tmp_path / "out" / EVIDENCE_DIR / "reference-campar-seed0"
    folder.mkdir(parents=True)
    for split in ("val", "test"):
        labels = rng.integers(0, 2, (40, 3)).astype(np.float32)
        logits = SplitLogits(
            images=[f"{split}{i}.png" for i in range(40)],
            labels=labels,
            shared=rng.normal(size=(40, 3)).astype(np.float32),
            specific=(labels - 0.5 + rng.normal(size=(40, 3))).astype(np.float32),
            attributes=("a", "b", "c"),
            eval_attributes=("a", "b", "c"),
        )
        write_split_logits(str(folder / f"{split}.parquet"), logits)
    args = get_args_parser().parse_args(
        ["--classifier", "reference", "--runs", str(tmp_path / "gone")]
    )
    old = {**row("campar", 0, 0.6), "classifier": "reference", "protocols": {"0.5": {}}}
    figures = {"rows": [old]}
    base = base_config(args, str(tmp_path / "manifest.parquet"))
    campar = next(r for r in ROWS if r.name == "campar")
    assert record_diagnostics(figures, campar, 0, base, args, tmp_path / "out")
    fixed = old["protocols"]["0.5"]
    assert len(fixed["attr_recall"]) == len(fixed["attr_predicted_rate"]) == 3
    assert old["test_positive_rate"] == [round(v, 5) for v in labels.mean(axis=0).tolist()]
    assert 0.5 < old["mean_auc"]["specific"] <= 1  # the specific logits carry the labels
    assert not record_diagnostics(figures, campar, 0, base, args, tmp_path / "out")  # up to date
