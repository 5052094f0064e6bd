"""Training metrics to TensorBoard or wandb (``train.report_to``), as open_clip's ``--report-to``.

``log.jsonl`` stays the run's record; a reporter only mirrors its records as scalars for live curves. It never
touches the model, the data or the RNG, so a run computes the same with or without one (``report_to`` is left
out of run ids and may change on resume).

Record → scalars: a ``step`` record gives ``train/<key>``, an ``epoch`` record ``epoch/<key>``, any other record
(a defense's: ``roclip_match``, ``otcclip_match``, ``safeclip``, ``cleanclip``, …) ``<type>/<key>``; each at the
record's ``step`` (the trainer's global step when it has none). Numbers and bools (0/1) are kept, a dict of
numbers is flattened one level (``<type>/<key>/<sub>``); strings, lists and None are not scalars and are skipped.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol

from otcbench.errors import UserError

#: the sinks ``train.report_to`` accepts (the config's Literal names the same)
SINKS = ("tensorboard", "wandb")
#: record fields that say where a record belongs, not what it measured
_POSITION = ("type", "step", "epoch")
_PREFIX = {"step": "train", "epoch": "epoch"}


def _number(value: Any) -> float | None:
    # bool before int (bool is an int): a flag becomes 0/1; anything else that is not a number is no scalar
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return None


def to_scalars(record: dict[str, Any], default_step: int = 0) -> tuple[dict[str, float], int]:
    """The scalars of one ``log.jsonl`` record, by tag, and the step they belong to."""
    kind = str(record.get("type", "log"))
    prefix = _PREFIX.get(kind, kind)
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in _POSITION:
            continue
        if isinstance(value, dict):  # one level only: deeper structure is no curve anyone plots
            for sub, inner in value.items():
                x = _number(inner)
                if x is not None:
                    out[f"{prefix}/{key}/{sub}"] = x
            continue
        x = _number(value)
        if x is not None:
            out[f"{prefix}/{key}"] = x
    step = record.get("step")
    return out, int(step) if isinstance(step, (int, float)) and math.isfinite(step) else default_step


class _Sink(Protocol):
    def log(self, scalars: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def _missing(sink: str) -> UserError:
    # the sink, its package and its extra share one name
    return UserError(f"train.report_to={sink} needs the {sink} package, which is not installed; "
                     f'pip install "otcbench[{sink}]"')


class _TensorBoard:
    """Event files in ``RUN/tensorboard`` (a resumed run appends a new file there; TensorBoard merges them)."""

    def __init__(self, out_dir: Path) -> None:
        try:  # imported now, so that a missing package fails while the trainer is built, before any training
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing("tensorboard") from None
        self._cls, self._dir = SummaryWriter, out_dir / "tensorboard"
        self._writer: Any = None

    def log(self, scalars: dict[str, float], step: int) -> None:
        if self._writer is None:  # opened at the first record: building a trainer writes nothing
            self._writer = self._cls(log_dir=str(self._dir))
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, global_step=step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class _Wandb:
    """An offline wandb run in ``RUN/wandb`` (``wandb sync`` uploads it later; no network, no login)."""

    def __init__(self, out_dir: Path, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise _missing("wandb") from None
        self._wandb, self._dir, self._config = wandb, out_dir, config
        self._run: Any = None

    def log(self, scalars: dict[str, float], step: int) -> None:
        if self._run is None:
            self._run = self._wandb.init(mode="offline", dir=str(self._dir), project="otcbench",
                                         name=self._dir.name, config=self._config)
        self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._run is not None:
            self._wandb.finish()
            self._run = None


class Reporter:
    """Fans each trainer record out to the chosen sinks; with none, every call is a no-op."""

    def __init__(self, sinks: list[_Sink]) -> None:
        self.sinks = sinks

    def log(self, record: dict[str, Any], default_step: int = 0) -> None:
        if not self.sinks:
            return
        scalars, step = to_scalars(record, default_step)
        if scalars:
            for sink in self.sinks:
                sink.log(scalars, step)

    def close(self) -> None:
        """Flush and close every sink (safe to call twice; a later record opens them again)."""
        for sink in self.sinks:
            sink.close()


def make_reporters(names: list[str], out_dir: str | Path, config: dict[str, Any]) -> Reporter:
    """One :class:`Reporter` for ``names`` (``train.report_to``, which TrainConfig has already split from a
    comma-separated string) of the run in ``out_dir``.

    Raises :class:`otcbench.errors.UserError` (one line) for an unknown sink or one whose package is missing.
    ``config``: the run's resolved options, recorded by wandb.
    """
    out = Path(out_dir)
    sinks: list[_Sink] = []
    for name in dict.fromkeys(names):
        if name == "tensorboard":
            sinks.append(_TensorBoard(out))
        elif name == "wandb":
            sinks.append(_Wandb(out, config))
        else:
            raise UserError(f"train.report_to: unknown sink {name!r}; choose from {', '.join(SINKS)}")
    return Reporter(sinks)
