"""The search's own record of its trials (``tune/trials.json``): what ``--resume`` trusts.

Run directories live in shared buckets, so anything read back from one is untrusted. Ray's
experiment state (``tuner.pkl``, searcher state, trial states) is pickled and would run any
code planted in it; campar therefore never reads it back. Instead, the search writes this
JSON file whenever a trial starts or ends: each trial's status, sampled values, validation
metrics and bookkeeping. ``--resume`` reads only this file (and ``search.json``), checks
every field against the search space before anything else happens, and replays the
finished trials into a fresh searcher. A file that fails a check is refused with one line
naming the file, the trial and the field.

No Ray here: the record is plain data, testable without a cluster.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Any

from campar_ray import storage
from campar_ray.bounded import BoundedError, load_json
from campar_ray.config import ConfigError
from campar_ray.run.layout import SearchDir
from campar_ray.tune.report import REPORTED, STATUSES, is_metric
from campar_ray.tune.space import SearchSpace

FORMAT = "campar-tune-trials/1"
FINISHED = ("complete", "stopped", "error")
"""Statuses that count against the budget; ``unfinished`` trials run again on resume."""
TRIAL_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_TEXT = 20_000
"""Longest string accepted in the record (error texts are cut to it when written)."""
ENTRY_KEYS = ("trial_id", "status", "params", "metrics", "info", "error")


class ResumeError(ConfigError):
    """Tune state in the run directory that ``--resume`` refuses (one line, nothing run)."""


@dataclass(frozen=True)
class Replay:
    """What a resumed search starts from: finished rows to keep, unfinished values to rerun."""

    finished: list[dict[str, Any]]
    """Report rows (as :func:`.report.trial_row` makes them) of complete, stopped and
    errored trials."""
    rerun: list[dict[str, Any]]
    """Sampled values of trials that had started but not finished: they run again."""


def to_entry(row: dict[str, Any], space: SearchSpace) -> dict[str, Any]:
    """A report row as a record entry: sampled values, metrics and bookkeeping apart."""
    return {
        "trial_id": row["trial_id"],
        "status": row["status"],
        "params": {key: _plain(row.get(key)) for key in space.keys},
        "metrics": {key: _plain(value) for key, value in row.items() if is_metric(key)},
        "info": {key: _plain(row.get(key)) for key in REPORTED},
        "error": None if row.get("error") is None else str(row["error"])[-MAX_TEXT:],
    }


def to_row(entry: dict[str, Any]) -> dict[str, Any]:
    """A (checked) record entry back as a report row."""
    row: dict[str, Any] = {"trial_id": entry["trial_id"], "status": entry["status"]}
    row.update(entry["params"])
    row.update(entry["metrics"])
    row.update({key: entry["info"].get(key) for key in REPORTED})
    row["error"] = entry["error"]
    return row


def write_record(tune_dir: str, rows: list[dict[str, Any]], space: SearchSpace) -> None:
    payload = {"format": FORMAT, "trials": [to_entry(row, space) for row in rows]}
    storage.write_json(SearchDir(tune_dir).record, payload)


def read_record(
    tune_dir: str, space: SearchSpace, *, metric: str, num_samples: int, trials_dir: str
) -> Replay:
    """The checked record of ``tune_dir`` (empty when no trial had started yet)."""
    path = SearchDir(tune_dir).record
    if not storage.exists(path):
        return Replay([], [])
    payload = read_json_object(path, "campar's trial record")
    if set(payload) != {"format", "trials"} or payload["format"] != FORMAT:
        raise ResumeError(
            f"{path} is not campar's trial record: expected the keys format "
            f"({FORMAT!r}) and trials, got {_listed(payload)}"
        )
    entries = payload["trials"]
    if not isinstance(entries, list) or len(entries) > num_samples:
        raise ResumeError(
            f"{path}: trials must be a list of at most {num_samples} trials (the search's "
            f"budget), got {_described(entries)}"
        )
    seen: set[str] = set()
    for number, entry in enumerate(entries):
        where = f"{path}: trial {number}"
        _check_entry(entry, where, space, metric, trials_dir)
        if entry["trial_id"] in seen:
            raise ResumeError(f"{where}: trial_id {entry['trial_id']!r} appears twice")
        seen.add(entry["trial_id"])
    rows = [to_row(entry) for entry in entries]
    return Replay(
        finished=[row for row in rows if row["status"] in FINISHED],
        rerun=[
            {key: row[key] for key in space.keys} for row in rows if row["status"] not in FINISHED
        ],
    )


def read_json_object(path: str, what: str) -> dict[str, Any]:
    """``path`` parsed as a JSON object, refused in one line otherwise (pickles included)."""
    data = storage.read_bytes(path)
    try:
        payload = load_json(data, path, parse_constant=_refuse_constant)
    except BoundedError as error:
        raise ResumeError(f"{error}; it is not {what}, refusing it") from None
    except ValueError as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ResumeError(f"{path} is not {what} (not JSON: {reason}); refusing it") from None
    if not isinstance(payload, dict):
        got = _described(payload)
        raise ResumeError(f"{path} is not {what}: expected a JSON object, got {got}")
    return payload


def _check_entry(entry: Any, where: str, space: SearchSpace, metric: str, trials_dir: str) -> None:
    if not isinstance(entry, dict) or set(entry) != set(ENTRY_KEYS):
        raise ResumeError(
            f"{where}: expected an object with the keys {', '.join(ENTRY_KEYS)}, "
            f"got {_listed(entry) if isinstance(entry, dict) else _described(entry)}"
        )
    trial_id, status = entry["trial_id"], entry["status"]
    if not isinstance(trial_id, str) or not TRIAL_ID.fullmatch(trial_id):
        raise ResumeError(
            f"{where}: trial_id must be 1-64 letters, digits, _ or -, got {_short(trial_id)}"
        )
    where = f"{where} ({trial_id})"
    if status not in STATUSES:
        raise ResumeError(f"{where}: status {_short(status)} is not one of {', '.join(STATUSES)}")
    _check_params(entry["params"], where, space)
    _check_metrics(entry["metrics"], where)
    _check_info(entry["info"], where)
    error = entry["error"]
    if (status == "error") != isinstance(error, str) or (
        isinstance(error, str) and len(error) > MAX_TEXT
    ):
        raise ResumeError(
            f"{where}: error must be a text (at most {MAX_TEXT} characters) exactly when the "
            f"status is 'error', got {_described(error)} with status {status!r}"
        )
    if status == "complete" and not _finite(entry["metrics"].get(metric)):
        raise ResumeError(f"{where}: a complete trial needs a finite {metric}")
    # The best trial's folder is where the final stage 2 is fitted: it must be the trial's own.
    expected, trial_dir = storage.join(trials_dir, trial_id), entry["info"].get("trial_dir")
    if (status == "complete" or trial_dir is not None) and trial_dir != expected:
        raise ResumeError(f"{where}: trial_dir must be {expected}, got {_short(trial_dir)}")


def _check_params(params: Any, where: str, space: SearchSpace) -> None:
    if not isinstance(params, dict) or set(params) != set(space.keys):
        got = _listed(params) if isinstance(params, dict) else _described(params)
        raise ResumeError(
            f"{where}: params must hold exactly the searched keys {', '.join(space.keys)}; "
            f"got {got}"
        )
    for param in space.params:
        value = params[param.key]
        if not param.contains(value):
            raise ResumeError(
                f"{where}: {param.key} = {_short(value)} is not a value of the search space "
                f"({param.kind} {list(param.args)})"
            )


def _check_metrics(metrics: Any, where: str) -> None:
    if not isinstance(metrics, dict):
        raise ResumeError(f"{where}: metrics must be an object, got {_described(metrics)}")
    for key, value in metrics.items():
        if not is_metric(key):
            raise ResumeError(
                f"{where}: metrics may hold only val_* and stage1_val_* keys, got {_short(key)}"
            )
        if value is not None and not _finite(value):
            raise ResumeError(f"{where}: metric {key} must be a finite number, got {_short(value)}")


def _check_info(info: Any, where: str) -> None:
    if not isinstance(info, dict) or not set(info) <= set(REPORTED):
        got = _listed(info) if isinstance(info, dict) else _described(info)
        raise ResumeError(f"{where}: info may hold only {', '.join(REPORTED)}; got {got}")
    for key, value in info.items():
        text = isinstance(value, str) and len(value) <= MAX_TEXT
        if not (value is None or text or _finite(value)):
            raise ResumeError(
                f"{where}: info {key} must be a number or a text, got {_short(value)}"
            )


def _plain(value: Any) -> Any:
    """A JSON value: NumPy numbers as Python ones, non-finite numbers as null."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(value) else None
    return str(value)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number campar writes")


def _listed(payload: dict[str, Any]) -> str:
    keys = [_short(key) for key in list(payload)[:12]]
    return "the keys " + (", ".join(keys) or "(none)") + (", ..." if len(payload) > 12 else "")


def _described(value: Any) -> str:
    return f"{type(value).__name__} {_short(value)}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:60]}..."
