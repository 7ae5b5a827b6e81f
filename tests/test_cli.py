"""The ``campar`` command line: help for every step, clear errors, and the demo end to end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from campar_ray.cli import build_parser, main

COMMANDS = [
    "prepare",
    "train",
    "fit-cfar",
    "tune",
    "evaluate",
    "compare",
    "bundle",
    "predict",
    "export",
    "demo",
    "config",
]

QUIET_TRAIN = {
    "model.backbone": "timm:mobilenetv3_small_050",
    "model.fusion": "false",
    "data.image_size": "[32, 16]",
    "data.pad": "2",
    "train.batch_size": "16",
    "train.cpus_per_worker": "0.5",
    "train.epochs": "2",
}
RAY_NOISE = [
    "Failed to query Ray Train Controller actor state",  # Ray Train's PlacementGroupCleaner
    "PlacementGroupCleaner",
    "(TrainController",  # any forwarded worker or actor line
    "(RayTrainWorker",
    "(SplitCoordinator",
    "Running Dataset",  # Ray Data's progress bars and their logged form
    "Execution plan of Dataset",
    "row/s]",  # a tqdm bar
    "\x1b[A",  # a tqdm redraw
    "Token authentication is enabled",
    "Started a local Ray instance",
    "worker processes have been started",  # the raylet's startup-concurrency warning
    "Configuration for experiment",  # Ray Tune's header
    "View detailed results here",
]


def test_every_command_has_help():
    result = subprocess.run(
        [sys.executable, "-m", "campar_ray.cli", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout
    for command in COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args([command, "--help"])
        assert exit_info.value.code == 0


def test_unknown_config_key_is_a_one_line_error(capsys):
    assert main(["config", "--set", "train.lrr=1"]) == 2
    error = capsys.readouterr().err
    assert "unknown config key 'train.lrr'" in error
    assert "train.lr" in error


def test_shorthand_flags_become_config_keys(capsys):
    assert main(["config", "--set", "seed=3"]) == 0
    assert "seed: 3" in capsys.readouterr().out


def test_prepare_synthetic_through_the_cli(tmp_path, capsys):
    out = tmp_path / "manifest.parquet"
    code = main(["prepare", "synthetic", "--out", str(out), "--n", "40", "--size", "32,16"])
    assert code == 0
    assert out.exists()
    assert "40 images" in capsys.readouterr().out


@pytest.mark.ray
def test_demo_runs_every_step_then_reuses_them(ray_cluster, tmp_path, capsys):
    """The README's main command on a tiny budget: data, stage 1, search, CFAR, report."""
    tiny = [
        "--set",
        "data.image_size=[32, 16]",
        "--set",
        "train.epochs=1",
        "--set",
        "train.batch_size=16",
        "--set",
        "cfar.actors=1",
        "--set",
        "cfar.fc2_epochs=20",
    ]
    args = ["demo", "--out", str(tmp_path), "--images", "120", "--trials", "2", *tiny]
    assert main(args) == 0
    captured = capsys.readouterr()
    out, shown = captured.out, captured.out + captured.err
    assert "Stage 1 + CFAR" in out
    lines = [line for line in shown.splitlines() if not re.search(r"\d+s elapsed$", line)]
    assert len(lines) < 80, shown  # campar's own lines (progress aside); Ray's go to the log file
    for noise in RAY_NOISE:
        assert noise not in out, out
    metrics = json.loads((tmp_path / "run" / "report" / "test" / "metrics.json").read_text())
    assert "stage1_cfar" in metrics["sources"]
    assert (tmp_path / "run" / "report" / "test" / "report.html").exists()
    # One figure, one name: the search's test figure is stage 2 at its own val threshold, the
    # final table's val row and metrics.json's; the table's default rows are at 0.5.
    (searched,) = re.findall(r"test mA, Stage 1 \+ CFAR: (\d+\.\d\d) \(threshold val\)", out)
    (row,) = re.findall(r"^Stage 1 \+ CFAR\s+val\s+(\d+\.\d\d) ", out, re.M)
    assert searched == row == f"{100 * metrics['protocols']['val']['mA']:.2f}"
    fixed = f"{100 * metrics['sources']['stage1_cfar']['mA']:.2f}"
    assert re.search(rf"^Stage 1 \+ CFAR\s+0\.5\s+{fixed} ", out, re.M), out
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert {"data", "stage 1", "search", "stage 2", "evaluate"} <= set(timings)

    assert main(args) == 0
    rerun = capsys.readouterr().out
    assert rerun.count("already done") == 4


@pytest.mark.ray
def test_training_prints_its_own_progress_and_keeps_ray_quiet(tmp_path):
    """A fresh process, as a user runs it: one line per epoch and step, no Ray output."""
    manifest = tmp_path / "data" / "manifest.parquet"
    assert (
        main(["prepare", "synthetic", "--out", str(manifest), "--n", "120", "--size", "32,16"]) == 0
    )
    settings = [arg for key, value in QUIET_TRAIN.items() for arg in ("--set", f"{key}={value}")]
    run_dir = tmp_path / "run"
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    command = ["train", "--manifest", str(manifest), "--run-dir", str(run_dir), *settings]
    result = subprocess.run(
        [sys.executable, "-m", "campar_ray.cli", *command],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # Progress lines come every tracking.progress_seconds however slow the machine is.
    timed = [line for line in output.splitlines() if re.search(r"\d+s elapsed$", line)]
    assert all(re.match(r"\[stage1\] (starting|epoch \d/2 |logits )", line) for line in timed)
    lines = [line for line in output.splitlines() if line not in timed]
    assert len(lines) <= 16, output
    for noise in RAY_NOISE:
        assert noise not in output, output
    assert sum(line.startswith("[stage1] epoch ") and "val mA" in line for line in lines) == 2
    log = run_dir / "logs" / "ray-train.log"
    assert f"Ray's logs: {log}" in output
    assert "Started a local Ray instance" in log.read_text()
