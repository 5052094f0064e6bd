"""The one way to run a model in eval mode: a context manager that restores the previous mode, also on error;
and :func:`min_train_rows`, the fewest rows a train-mode forward takes (BatchNorm)."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm


class eval_mode(AbstractContextManager):
    """``with eval_mode(model): …`` — the model in eval mode inside, its previous train/eval mode after
    (also when the body raises)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __enter__(self) -> torch.nn.Module:
        self.was_training = self.model.training
        self.model.eval()
        return self.model

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


def min_train_rows(model: torch.nn.Module, forward: Callable[[], Any]) -> int:
    """The fewest rows a train-mode call of ``forward`` (a forward pass of ``model``) accepts: 2 where one of
    ``model``'s BatchNorm layers gets a single value per channel for each row (a 1×1 feature map, as the last
    stage of a ModifiedResNet at 32 px, or a BatchNorm1d), which torch refuses for a single row ("Expected more
    than 1 value per channel when training"); else 1.

    Measured by running ``forward`` once (one row is enough) in eval mode without gradient: the running
    statistics do not change.
    """
    per_row: list[int] = []

    def record(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        per_row.append(math.prod(args[0].shape[2:]))  # values per channel of one row

    handles = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, _BatchNorm)]
    try:
        with torch.no_grad(), eval_mode(model):
            forward()
    finally:
        for h in handles:
            h.remove()
    return 2 if 1 in per_row else 1
