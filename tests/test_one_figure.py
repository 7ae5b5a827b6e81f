"""One figure, one name: on one run, tune, fit-cfar and evaluate print the same test figure
for the same source and threshold protocol, and each printed figure names its protocol.

On a copy of the session's tiny run: ``campar tune`` (one trial, scope ``cfar``) refits the
run's stage 2 with the best configuration and prints its test figure; ``campar fit-cfar
--config best.yaml`` fits that configuration again (the same model: the local solver is
deterministic) and prints its tables; ``campar evaluate`` prints its own. The figures are read
from what the commands printed, as a user reads them.
"""

from __future__ import annotations

import re
import shutil

import pytest
from cli_checks import run_campar

from campar_ray.metrics import DECISION_PROTOCOLS, SUMMARY_HEADERS

PROTOCOL = "|".join(re.escape(p) for p in sorted(DECISION_PROTOCOLS, key=len, reverse=True))
ROW = re.compile(rf"^(?P<source>\S.*?)\s{{2,}}(?P<protocol>{PROTOCOL})\s+(?P<figures>[\d. ]+)$")
LINE = re.compile(
    rf"(?P<split>val|test) (?P<metric>\w+), (?P<source>[^:]+): (?P<value>\d+\.\d\d) "
    rf"\(threshold (?P<protocol>{PROTOCOL})\)"
)
HEADERS = r"\s+".join(SUMMARY_HEADERS.values())
CFAR = ("--set", "cfar.solver=local", "--set", "cfar.fc2_epochs=30")


def tables(out: str) -> dict[tuple[str, str, str], list[float]]:
    """(split, source, protocol) -> the five figures, from every printed figure table."""
    rows, split = {}, None
    for line in out.splitlines():
        header = re.match(rf"^(val|test) split\s+threshold\s+{HEADERS}$", line)
        if header:
            split = header.group(1)
            continue
        row = ROW.match(line)
        if row and split:
            key = (split, row["source"], row["protocol"])
            assert key not in rows, f"{key} printed twice:\n{out}"
            rows[key] = [float(value) for value in row["figures"].split()]
    return rows


@pytest.mark.ray
def test_tune_fit_cfar_and_evaluate_print_one_figure_per_protocol(tiny_run, tmp_path, capsys):
    run = str(shutil.copytree(tiny_run.run_dir, tmp_path / "run"))
    search = ("--scope", "cfar", "--num-samples", "1")
    code, tuned, err = run_campar(capsys, "tune", "--run-dir", run, *search, *CFAR)
    assert code == 0, err
    code, fitted, err = run_campar(capsys, "fit-cfar", "--config", f"{run}/tune/best.yaml")
    assert code == 0, err
    images = ("--angle-images", "0", "--cam-images", "0")
    code, evaluated, err = run_campar(capsys, "evaluate", "--run-dir", run, *images)
    assert code == 0, err

    lines = {
        (m["split"], m["metric"], m["protocol"]): float(m["value"]) for m in LINE.finditer(tuned)
    }
    assert set(lines) == {("val", "mA", "val"), ("test", "mA", "val")}, tuned
    assert all(m["source"] == "Stage 1 + CFAR" for m in LINE.finditer(tuned))
    fit, evaluation = tables(fitted), tables(evaluated)
    (saved,) = {source for _, source, _ in fit if source.endswith("lookup (saved)")}
    assert saved.startswith("Stage 1 + CFAR, ")

    # The refitted model, under its own val threshold: tune's line, fit-cfar's and evaluate's rows.
    assert fit["test", saved, "val"][0] == lines["test", "mA", "val"]
    assert fit["val", saved, "val"][0] == lines["val", "mA", "val"]
    assert evaluation["test", "Stage 1 + CFAR", "val"] == fit["test", saved, "val"]
    # At 0.5 (evaluate's default), every source fit-cfar and evaluate share.
    for source in ("Stage 1, shared logits", "Stage 1, specific logits"):
        assert evaluation["test", source, "0.5"] == fit["test", source, "0.5"], source
    assert evaluation["test", "Stage 1 + CFAR", "0.5"] == fit["test", saved, "0.5"]
    # evaluate's table: every source at 0.5, the final one under each other protocol.
    assert {protocol for _, source, protocol in evaluation if source == "Stage 1 + CFAR"} == set(
        DECISION_PROTOCOLS
    )
    assert re.search(r"^report: .*report\.md \(threshold protocol 0\.5\)$", evaluated, re.M)
