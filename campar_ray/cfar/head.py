"""fc2 (eq. 20): the linear layer that combines CFAR's r_hat with the stage-1 logits.

Stage 1 stays frozen: fc2 needs only the stored logits, so it trains full-batch in seconds.
It starts *as* the stage-1 prediction (weights ``[0 | I]`` on ``concat(r_hat, logits)``, bias
0), and the epoch kept is the one with the best validation mA, epoch 0 included. So on the
validation data that selects it, CFAR is never worse than stage 1 at the selection threshold:
it can only move away from stage 1 where that helps.

Unknown labels (-1) are left out of fc2's training and validation losses (the mean over the
known entries; today's plain mean when every label is known) and of its validation mA.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.functional import binary_cross_entropy_with_logits

from campar_ray.data.manifest import known_entries
from campar_ray.decision import probabilities
from campar_ray.metrics import par_metrics

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
    val_mA: float
    val_loss: float
    curve: tuple[float, ...]
    """Validation mA after each epoch, epoch 0 (the stage-1 prediction) first: what a study
    of fc2's training data reads (``bench/fc2_heldout.py``)."""


def train_fc2(
    train: Fc2Split,
    val: Fc2Split,
    *,
    lr: float,
    epochs: int,
    columns: np.ndarray | None = None,
    patience: int = PATIENCE,
) -> Fc2Fit:
    """Full-batch Adam on the training BCE, stopped early on the validation loss.

    The epoch kept is the one with the best validation mA (epoch 0, the stage-1 prediction,
    included; ties go to the lower validation loss), computed at threshold 0.5 over
    ``columns`` (the evaluated attributes; all when None). Training stops after ``patience``
    epochs without a lower validation loss, or after ``epochs``. Deterministic: no random
    initialisation, no sampling.
    """
    head = Fc2(train.logits.shape[1])
    optimiser = torch.optim.Adam(head.parameters(), lr=lr)
    inputs = (_tensor(train.r_hat), _tensor(train.logits))
    target, known = _tensor(train.labels > 0), _known(train.labels)
    val_inputs = (_tensor(val.r_hat), _tensor(val.logits))
    val_target, val_known = _tensor(val.labels > 0), _known(val.labels)
    columns = np.arange(train.logits.shape[1]) if columns is None else columns

    def validate() -> tuple[float, float]:
        with torch.no_grad():
            out = head(*val_inputs)
            loss = float(_bce(out, val_target, val_known))
        probs = probabilities(out.numpy())
        return par_metrics(val.labels[:, columns], probs[:, columns])["mA"], loss

    best_epoch, (best_mA, best_loss), best_state = 0, validate(), head.arrays()
    lowest_loss, lowest_epoch = best_loss, 0
    curve = [best_mA]
    epoch = 0
    for epoch in range(1, epochs + 1):
        optimiser.zero_grad()
        _bce(head(*inputs), target, known).backward()
        optimiser.step()
        mA, loss = validate()
        curve.append(mA)
        if (mA, -loss) > (best_mA, -best_loss):
            best_epoch, best_mA, best_loss, best_state = epoch, mA, loss, head.arrays()
        if loss < lowest_loss:
            lowest_loss, lowest_epoch = loss, epoch
        elif epoch - lowest_epoch >= patience:
            break
    kept = Fc2.from_arrays(best_state["weight"], best_state["bias"])
    return Fc2Fit(kept, best_epoch, epoch, best_mA, best_loss, tuple(curve))


def _known(labels: np.ndarray) -> torch.Tensor | None:
    """The known entries of ``labels`` as a float mask, None when every label is known."""
    known = known_entries(labels)
    return None if known is None else _tensor(known)


def _bce(logits: torch.Tensor, target: torch.Tensor, known: torch.Tensor | None) -> torch.Tensor:
    """Mean BCE over the known entries (the plain mean when ``known`` is None)."""
    if known is None:
        return binary_cross_entropy_with_logits(logits, target)
    losses = binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (losses * known).sum() / known.sum().clamp(min=1)


def _tensor(values: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.float32))
