"""``--resume``'s trial record: written by campar, read back only after every check (no Ray).

The searches that use it (interrupted, planted pickles, tampered files through the CLI) run
in ``test_tune.py`` on its shared search.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from cli_checks import Payload

from campar_ray.config import Config
from campar_ray.run.layout import SearchDir
from campar_ray.tune import load_search_space
from campar_ray.tune.record import ResumeError, read_record, write_record
from campar_ray.tune.report import trial_row

SPACE = load_search_space(None, Config(), "cfar")
VALUES = {
    "cfar.alpha": 2.0,
    "cfar.lam": 0.1,
    "cfar.factors": 8,
    "cfar.keys": 16,
    "cfar.threshold": 0.5,
    "cfar.lookup": "fold-in",
    "cfar.fc2_lr": 0.01,
}


def _rows(trials_dir: str) -> list[dict]:
    done = {"complete": True, "val_mA": 0.7, "stage1_val_mA": 0.6, "timestamp": 1}
    return [
        trial_row("a_00000", VALUES, {**done, "trial_dir": f"{trials_dir}/a_00000"}, None, SPACE),
        trial_row("a_00001", VALUES, {"val_mA": 0.5, "done": True}, None, SPACE),
        trial_row("a_00002", VALUES, {}, RuntimeError("boom"), SPACE),
        trial_row("a_00003", {**VALUES, "cfar.factors": 12}, {}, None, SPACE),  # unfinished
    ]


def _read(tune_dir: Path, num_samples: int = 8):
    return read_record(
        str(tune_dir),
        SPACE,
        metric="val_mA",
        num_samples=num_samples,
        trials_dir=str(tune_dir / "trials"),
    )


def test_the_record_round_trips_finished_rows_and_the_values_to_rerun(tmp_path):
    rows = _rows(str(tmp_path / "trials"))
    write_record(str(tmp_path), rows, SPACE)
    replay = _read(tmp_path)
    assert [row["status"] for row in replay.finished] == ["complete", "stopped", "error"]
    assert replay.finished[0] == rows[0] and replay.finished[2]["error"] == "RuntimeError: boom"
    assert replay.rerun == [{**VALUES, "cfar.factors": 12}]
    assert _read(tmp_path / "nothing-yet").finished == []  # interrupted before any trial


def test_param_membership_is_exact_about_types_and_bounds():
    params = {param.key: param for param in SPACE.params}
    assert params["cfar.factors"].contains(8) and not params["cfar.factors"].contains(8.0)
    assert not params["cfar.factors"].contains(True) and not params["cfar.factors"].contains(65)
    assert params["cfar.alpha"].contains(0.5) and not params["cfar.alpha"].contains(float("nan"))
    assert params["cfar.lookup"].contains("fold-in") and not params["cfar.lookup"].contains("x")


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda r: r["trials"][0]["params"].update({"cfar.keys": "16"}), "cfar.keys = '16'"),
        (lambda r: r["trials"][0]["params"].update({"cfar.nope": 1}), "cfar.nope"),
        (lambda r: r["trials"][0]["params"].pop("cfar.lam"), "exactly the searched keys"),
        (lambda r: r["trials"][0]["params"].update({"cfar.alpha": 1e9}), "cfar.alpha = 1"),
        (lambda r: r["trials"][0]["params"].update({"cfar.lookup": "knn"}), "cfar.lookup"),
        (lambda r: r["trials"][0].update({"status": "done"}), "status 'done' is not one of"),
        (lambda r: r["trials"][0].update({"trial_id": "../../etc"}), "trial_id must be"),
        (lambda r: r["trials"][0]["info"].update({"trial_dir": "/elsewhere"}), "trial_dir must"),
        (lambda r: r["trials"][1]["info"].update({"trial_dir": "/elsewhere"}), "trial_dir must"),
        (lambda r: r["trials"][0]["info"].update({"checkpoint": "x"}), "info may hold only"),
        (lambda r: r["trials"][0]["metrics"].update({"val_mA": None}), "needs a finite val_mA"),
        (lambda r: r["trials"][0]["metrics"].update({"test_mA": 0.9}), "val_* and stage1_val_*"),
        (lambda r: r["trials"][2].update({"error": None}), "exactly when the status is 'error'"),
        (lambda r: r["trials"][1].update({"extra": 1}), "expected an object with the keys"),
        (lambda r: r["trials"].append(dict(r["trials"][0])), "appears twice"),
        (lambda r: r.update({"format": "ray"}), "is not campar's trial record"),
        (lambda r: r.update({"trials": r["trials"] * 3}), "at most 8 trials"),
    ],
)
def test_a_tampered_record_is_refused_naming_the_field(tmp_path, tamper, message):
    write_record(str(tmp_path), _rows(str(tmp_path / "trials")), SPACE)
    path = Path(SearchDir(str(tmp_path)).record)
    record = json.loads(path.read_text())
    tamper(record)
    path.write_text(json.dumps(record))
    with pytest.raises(ResumeError) as error:
        _read(tmp_path)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "content", ["pickle", b"\xff\xfe", b"[1, 2]", b'{"format": NaN}', b"[" * 20_000 + b"]" * 20_000]
)
def test_a_record_that_is_no_json_object_is_refused_and_never_loaded(tmp_path, content):
    marker = tmp_path / "payload-ran"
    data = pickle.dumps(Payload(marker)) if content == "pickle" else content
    Path(SearchDir(str(tmp_path)).record).write_bytes(data)
    with pytest.raises(ResumeError, match="is not campar's trial record") as error:
        _read(tmp_path)
    assert "\n" not in str(error.value) and not marker.exists()


class _Trial:
    """What the record reads of a Tune trial: its id, sampled values and last result."""

    def __init__(self, trial_id: str, last_result: dict):
        self.trial_id, self.config, self.last_result = trial_id, {}, last_result


def test_a_result_naming_another_trial_is_not_the_trials_own():
    """Before its first report, a trial on a reused actor shows that actor's defaults, which
    name the previous trial: a search stopped then wrote that trial twice, and ``--resume``
    refused the record ("trial_id ... appears twice")."""
    from campar_ray.tune.search import _own_result

    own = {"trial_id": "b", "val_mA": 0.7, "complete": True}
    assert _own_result(_Trial("b", own)) == own
    assert _own_result(_Trial("b", {"trial_id": "a", "complete": True})) == {}
    assert _own_result(_Trial("b", {})) == {}
