"""``train.checkpoint_rule``: which epoch a run keeps, decided from the checkpoints' metadata.

Checkpoint folders are laid out by hand (metadata only: the rule never opens weights), so
each rule's choice, the legacy default and the tie-break are checked without training.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from campar_ray.config import Config, ConfigError
from campar_ray.metrics import attribute_auc, mean_auc
from campar_ray.run.checkpoints import (
    SCORE_KEY,
    UNSCORED,
    best_checkpoint,
    checkpoint_score,
)
from campar_ray.train.loop import validation_metrics

EPOCHS = (  # epoch: (val_auc, val_mA); AUC peaks at 2, mA at 3, the last epoch is 4
    (1, 0.70, 0.60),
    (2, 0.80, 0.62),
    (3, 0.75, 0.70),
    (4, 0.78, 0.65),
)


def _run(root: Path, rule: str | None) -> str:
    config = Config().to_dict()
    if rule is None:  # a run from before the rule existed
        del config["train"]["checkpoint_rule"]
    else:
        config["train"]["checkpoint_rule"] = rule
    for epoch, auc, ma in EPOCHS:
        folder = root / "ray" / "stage1" / f"checkpoint_{epoch:06d}"
        folder.mkdir(parents=True)
        metrics = {"epoch": epoch, "val_auc": auc, "val_mA": ma}
        meta = {
            "epoch": epoch,
            "metrics": metrics,
            "config": config,
            "history": [metrics],
            "attributes": ["a"],
        }
        (folder / "meta.json").write_text(json.dumps(meta))
    return str(root)


@pytest.mark.parametrize(("rule", "epoch"), [("val_auc", 2), ("val_mA", 3), ("last", 4), (None, 3)])
def test_each_rule_keeps_its_epoch_and_old_runs_keep_val_mA(tmp_path, rule, epoch):
    run_dir = _run(tmp_path, rule)
    chosen = best_checkpoint(run_dir)
    assert json.loads((Path(chosen) / "meta.json").read_text())["epoch"] == epoch


def test_ties_go_to_the_earlier_epoch_and_an_undefined_auc_ranks_last():
    assert checkpoint_score({"epoch": 5, "val_auc": float("nan")}, "val_auc") == UNSCORED
    assert checkpoint_score({"epoch": 5, "val_auc": 0.5}, "last") == 5.0
    with pytest.raises(ValueError, match="val_auc, last, val_mA"):
        checkpoint_score({"epoch": 1}, "val_loss")


def test_an_unknown_rule_is_refused_when_the_config_is_built():
    with pytest.raises(
        ConfigError, match=r"'best' for train\.checkpoint_rule: expected one of val_auc"
    ):
        Config().override({"data.manifest": "m.parquet", "train.checkpoint_rule": "best"})


def test_validation_metrics_carry_the_mean_auc_of_the_evaluated_attributes():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (50, 3)).astype(np.int8)
    probs = np.clip(labels * 0.3 + rng.random((50, 3)) * 0.7, 0, 1)
    metrics = validation_metrics(labels, probs, [0, 2])
    expected = attribute_auc(labels[:, [0, 2]], probs[:, [0, 2]]).mean()
    assert metrics["val_auc"] == pytest.approx(expected)
    assert mean_auc(labels, probs) == pytest.approx(attribute_auc(labels, probs).mean())
    assert SCORE_KEY not in metrics  # the worker adds the score under the run's rule
