"""fc2 (eq. 20): the linear layer that combines CFAR's r_hat with the stage-1 logits.

Stage 1 stays frozen: fc2 needs only the stored logits, so it trains full-batch in seconds.
It starts *as* the stage-1 prediction (weights ``[0 | I]`` on ``concat(r_hat, logits)``, bias
0), and the epoch kept is the best under ``cfar.fc2_rule``, epoch 0 included. So on the
validation data that selects it, CFAR is never worse than stage 1 by that rule: it can only
move away from stage 1 where that helps. The default rule is validation mean AUC: fc2 first
moves the logits' offsets (where 0.5 falls) and only then their ranking, so a rule at 0.5
kept epoch 0 in every PETA run; the decision is the run's calibration's (``decision``).

The loss is stage 1's (``cfar.fc2_loss``; :func:`campar_ray.model.losses.bce`, weighted by
the training labels' positive rates). Unknown labels (-1) are left out of fc2's training and
validation losses and of its validation scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from campar_ray.decision import probabilities
from campar_ray.metrics import mean_auc, par_metrics
from campar_ray.model.losses import bce, positive_ratio
from campar_ray.run.checkpoints import checkpoint_score

PATIENCE = 20
"""Epochs without a lower validation loss before training stops."""


class Fc2(nn.Module):
    """``logits = W concat(r_hat, l) + b``, 2M -> M, initialised to return ``l``."""

    def __init__(self, attributes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(2 * attributes, attributes)
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.weight[:, attributes:] = torch.eye(attributes)
            self.linear.bias.zero_()

    def forward(self, r_hat: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.cat([r_hat, logits], dim=1))

    @classmethod
    def from_arrays(cls, weight: np.ndarray, bias: np.ndarray) -> Fc2:
        """Rebuild from saved weights (M x 2M and M)."""
        head = cls(len(bias))
        head.linear.load_state_dict(
            {"weight": torch.from_numpy(weight), "bias": torch.from_numpy(bias)}
        )
        return head.eval()

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: v.detach().numpy().copy() for k, v in self.linear.state_dict().items()}

    def logits(self, r_hat: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """fc2(concat(r_hat, l)): the final logits, as a float32 NumPy array."""
        with torch.no_grad():
            return self(_tensor(r_hat), _tensor(logits)).numpy()


@dataclass(frozen=True)
class Fc2Split:
    """Inputs and targets of fc2 for one split: r_hat, prediction logits, labels (N x M)."""

    r_hat: np.ndarray
    logits: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class Fc2Fit:
    head: Fc2
    best_epoch: int
    epochs_run: int
    val_score: float
    """The kept epoch's validation score under the rule it was kept by."""
    val_loss: float
    curve: tuple[float, ...]
    """Validation score after each epoch, epoch 0 (the stage-1 prediction) first: what a
    study of fc2's training data reads (``bench/fc2_heldout.py``)."""


def train_fc2(
    train: Fc2Split,
    val: Fc2Split,
    *,
    lr: float,
    epochs: int,
    columns: np.ndarray | None = None,
    patience: int = PATIENCE,
    rule: str = "val_auc",
    loss: str = "weighted_bce",
) -> Fc2Fit:
    """Full-batch Adam on the training loss, stopped early on the validation loss.

    The epoch kept is the best under ``rule`` (``train.checkpoint_rule``'s choices; epoch 0,
    the stage-1 prediction, included; ties go to the lower validation loss), scored over
    ``columns`` (the evaluated attributes; all when None). ``loss``: ``weighted_bce`` weighs
    each attribute by the training labels' positive rate, as stage 1's loss does. Training
    stops after ``patience`` epochs without a lower validation loss, or after ``epochs``.
    Deterministic: no random initialisation, no sampling.
    """
    head = Fc2(train.logits.shape[1])
    optimiser = torch.optim.Adam(head.parameters(), lr=lr)
    ratio = positive_ratio(train.labels) if loss == "weighted_bce" else None
    inputs, target = (_tensor(train.r_hat), _tensor(train.logits)), _tensor(train.labels)
    val_inputs, val_target = (_tensor(val.r_hat), _tensor(val.logits)), _tensor(val.labels)
    columns = np.arange(train.logits.shape[1]) if columns is None else columns
    labels = val.labels[:, columns]

    def validate(epoch: int) -> tuple[float, float]:
        with torch.no_grad():
            out = head(*val_inputs)
            val_loss = float(bce(out, val_target, ratio))
        scores = out.numpy()[:, columns]
        metrics = {"epoch": epoch, "val_auc": mean_auc(labels, scores)}
        if rule == "val_mA":
            metrics["val_mA"] = par_metrics(labels, probabilities(scores))["mA"]
        return checkpoint_score(metrics, rule), val_loss

    best_epoch, (best_score, best_loss), best_state = 0, validate(0), head.arrays()
    lowest_loss, lowest_epoch = best_loss, 0
    curve = [best_score]
    epoch = 0
    for epoch in range(1, epochs + 1):
        optimiser.zero_grad()
        bce(head(*inputs), target, ratio).backward()
        optimiser.step()
        score, val_loss = validate(epoch)
        curve.append(score)
        if (score, -val_loss) > (best_score, -best_loss):
            best_epoch, best_score, best_loss, best_state = epoch, score, val_loss, head.arrays()
        if val_loss < lowest_loss:
            lowest_loss, lowest_epoch = val_loss, epoch
        elif epoch - lowest_epoch >= patience:
            break
    kept = Fc2.from_arrays(best_state["weight"], best_state["bias"])
    return Fc2Fit(kept, best_epoch, epoch, best_score, best_loss, tuple(curve))


def _tensor(values: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.float32))
