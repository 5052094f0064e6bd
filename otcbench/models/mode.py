"""The one way to run a model in eval mode: a context manager that restores the previous mode, also on error."""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch


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
