"""Linear probe: multinomial logistic regression on frozen, normalised image features.

Full-batch L-BFGS in torch (runs on CPU or GPU, deterministic from a zero start). The objective matches
scikit-learn's ``LogisticRegression(C=C)`` up to a constant factor: mean cross-entropy plus
``||W||² / (2·C·N)`` (bias not regularised). ``C`` is chosen on the validation split, then the probe is
refitted on train + validation, as in the CLIP paper's protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LinearProbe:
    """A fitted probe: ``logits = features @ weight.T + bias``."""

    weight: torch.Tensor  # [C, D]
    bias: torch.Tensor  # [C]
    c: float

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return features.to(self.weight) @ self.weight.t() + self.bias

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return self.logits(features).argmax(dim=1)


def fit_logistic(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, c: float, max_iter: int = 300
) -> LinearProbe:
    """Fit L2-regularised multinomial logistic regression with L-BFGS."""
    x = features.double()
    y = labels.long().to(x.device)
    n, d = x.shape
    w = torch.zeros(num_classes, d, dtype=x.dtype, device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-7, tolerance_change=1e-10,
        history_size=20, line_search_fn="strong_wolfe",
    )
    reg = 1.0 / (2.0 * c * n)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.t() + b, y) + reg * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return LinearProbe(w.detach().float(), b.detach().float(), c)


def accuracy(probe: LinearProbe, features: torch.Tensor, labels: torch.Tensor) -> float:
    if len(labels) == 0:
        return float("nan")
    return float((probe.predict(features).cpu() == labels.cpu()).float().mean())


def linear_probe(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    c_grid: Sequence[float] = (0.01, 0.1, 1.0, 10.0, 100.0),
    max_iter: int = 300,
) -> tuple[LinearProbe, dict[float, float]]:
    """Pick ``C`` by validation accuracy (ties: the stronger regularisation), refit on train + val.

    Returns the final probe and the validation accuracy of every ``C`` tried.
    """
    scores: dict[float, float] = {}
    for c in c_grid:
        probe = fit_logistic(train[0], train[1], num_classes, c, max_iter)
        scores[c] = accuracy(probe, val[0], val[1])
    best = max(c_grid, key=lambda c: (scores[c], -c))
    x = torch.cat([train[0], val[0]])
    y = torch.cat([train[1], val[1]])
    return fit_logistic(x, y, num_classes, best, max_iter), scores
