"""The defense interface: small classes with hooks into the one trainer, seen through :mod:`.protocol`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from otcbench.config import Options
from otcbench.defenses.protocol import DataContext, TrainerContext
from otcbench.registry import Registry

if TYPE_CHECKING:
    from otcbench.config import DefenseConfig
    from otcbench.train.batch import Batch
    from otcbench.train.data import TrainData

DEFENSES: Registry[Defense] = Registry("defense")

__all__ = ["DEFENSES", "DataContext", "DataStepResult", "Defense", "build_defense", "check_defense"]


@dataclass
class DataStepResult:
    """The outcome of a data-side step (re-pairing and/or filtering) over the whole dataset.

    ``scores`` holds named per-pair scores where *higher means more likely a clean pair*; the first
    key is the defense's own score (used for detection AUROC), further keys are ablations shown side
    by side (e.g. ``global`` next to ``ot``). ``flagged`` marks the pairs the defense acted on (a
    caption replaced, or put in the risky set): detection precision/recall are computed from it.
    """

    caption_index: torch.Tensor  # (N,) int64: caption row assigned to each image row
    flagged: torch.Tensor  # (N,) bool
    keep: torch.Tensor | None = None  # (N,) bool rows the CLIP loss trains on (None: all)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    summary: dict[str, float] = field(default_factory=dict)  # scalars worth a log line


class Defense:
    """Base class: plain behaviour everywhere; a defense overrides the hooks it needs.

    Hooks, in the order the trainer calls them:

    * :meth:`train_data` — once, while the trainer is built: the data to train on.
    * :meth:`on_train_start` — once, after the model, optimiser and data exist (also after a resume).
    * :meth:`on_epoch_start` — data-side steps: re-pair captions (write ``trainer.caption_index``),
      refresh pools, score pairs.
    * :meth:`epoch_indices` — sample selection: the rows (in order) this epoch trains on.
    * :meth:`learning_rate` — every step: adjust the scheduled learning rate (SafeCLIP's phases).
    * :meth:`batch_loss` — the loss of one batch, plus scalars to log.
    * :meth:`on_epoch_end` — after an epoch's last step: per-epoch log lines (RoCLIP's match statistics).
    * :meth:`state_dict` / :meth:`load_state_dict` — whatever must survive a checkpoint for ``--resume``.

    Result tables label a run whose options differ from the class's ``Options`` defaults by its changes
    (:func:`otcbench.defenses.labels.variant_label`): ``variant_phrases`` maps an option name (dotted when
    nested) to a function of its value giving a short phrase (``"no warm-up"``; None falls back to
    ``key=value``), and options in ``label_ignore`` (execution knobs: chunk sizes, caches) never count.
    """

    name: ClassVar[str]
    Options: ClassVar[type[Options]] = Options
    #: Rough wall-clock cost of one epoch relative to plain CLIP on the same data; the recipe runner only uses
    #: it to start the longest runs first when it trains several at once.
    relative_cost: ClassVar[float] = 1.0
    #: Option name → (value → short phrase or None) for variant labels in result tables.
    variant_phrases: ClassVar[dict[str, Callable[[Any], str | None]]] = {}
    #: Options that only change how a run executes, not its results: never part of a variant label.
    label_ignore: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, options: Options) -> None:
        self.options = options

    @classmethod
    def estimated_cost(cls, options: Options, epochs: int) -> float:
        """Rough wall-clock cost of a run of ``epochs`` epochs, in plain-CLIP epochs (the runner's start order).

        ``epochs × relative_cost`` unless a defense's cost depends on its options (SafeCLIP's phases).
        """
        return epochs * cls.relative_cost

    @classmethod
    def check(cls, options: Options, epochs: int) -> str | None:
        """Why ``options`` cannot work in a run of ``epochs`` epochs — one line saying what and how to fix it —
        or None. Called before any work starts (``otcbench train``, recipe planning): :func:`check_defense`."""
        return None

    def on_train_start(self, trainer: TrainerContext) -> None:
        """Called once before the first step."""

    def on_epoch_start(self, trainer: TrainerContext, epoch: int) -> None:
        """Called at the start of every epoch (0-based), before :meth:`epoch_indices`."""

    def train_data(self, trainer: TrainerContext, data: TrainData) -> TrainData:
        """The data to train on, called once while the trainer is built (default: the given dataset).

        A fine-tuning defense that trains on other data than ``DATA`` (CleanCLIP's clean set) returns it
        here, before the trainer sizes its epochs and schedule.
        """
        return data

    def learning_rate(self, trainer: TrainerContext, lr: float) -> float:
        """The learning rate of the coming optimiser step, given the trainer's schedule value (default: it)."""
        return lr

    def on_epoch_end(self, trainer: TrainerContext, epoch: int) -> None:
        """Called after the last step of every epoch (0-based), before the epoch's log record."""

    def epoch_indices(self, trainer: TrainerContext, epoch: int, order: torch.Tensor) -> torch.Tensor:
        """Rows to train on this epoch, in the order given (default: all of ``order``)."""
        return order

    def batch_loss(self, trainer: TrainerContext, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one batch (default: the CLIP loss on the batch's image–caption pairs)."""
        return trainer.clip_batch_loss(batch), {}

    def data_step(self, ctx: DataContext, epoch: int | None = None) -> DataStepResult:
        """The defense's data-side step alone (what ``otcbench defend`` runs with a given model).

        Matching/filtering defenses override this and call it from their epoch hooks; ``epoch`` is
        None when run standalone (use the step's post-warm-up behaviour then).
        """
        from otcbench.errors import UserError

        raise UserError(f"defense {self.name!r} has no data-side step; `defend` works with "
                        "matching/filtering defenses (otcclip, roclip, safeclip)")

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


def check_defense(name: str, options: dict[str, Any] | Options, epochs: int, where: str) -> None:
    """Raise a one-line :class:`~otcbench.errors.UserError` (prefixed by ``where``) when the defense ``name``
    with ``options`` cannot work in a run of ``epochs`` epochs (its :meth:`Defense.check`)."""
    from otcbench.errors import UserError

    opts = options if isinstance(options, Options) else DEFENSES.options(name, options)
    problem = DEFENSES.get(name).check(opts, epochs)
    if problem:
        raise UserError(f"{where}: {problem}")


def build_defense(spec: DefenseConfig) -> Defense:
    """The defense a run's ``defense`` section names, with its validated options (what callers pass to the trainer)."""
    return DEFENSES.get(spec.name)(DEFENSES.options(spec.name, spec.options))
