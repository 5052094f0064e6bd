"""The attack interface and registry.

An attack reads the clean source (never modifies it) and returns the rows it adds or changes plus its
entry of the poison manifest. :func:`otcbench.attacks.poison.poison_dataset` composes one or several
attacks into one poisoned dataset, so every defense is later tested against identical poisons.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from otcbench.attacks.kinds import attack_kind
from otcbench.config import Options
from otcbench.data.format import EvalSet, PairDataset, decode_image, png_bytes
from otcbench.errors import UserError
from otcbench.registry import Registry


def _check_kind(cls: type[Attack]) -> None:
    """An attack registers only with a registered kind (otcbench.attacks.kinds)."""
    attack_kind(getattr(cls, "kind", None), f"attack {cls.name!r}")


ATTACKS: Registry[Attack] = Registry("attack", check=_check_kind)

#: Short captions that name only a class (disjoint from the eval prompt templates): poison captions
#: that teach "this image → that class" without describing anything else.
NAME_CAPTIONS = ("a {}", "{}", "the {}", "a {} icon", "{} clipart", "my {}", "a single {}", "{} picture")


@dataclass
class PoisonContext:
    """What an attack may read: the clean source, its eval set, class names and templates."""

    source: PairDataset
    eval_set: EvalSet | None
    classnames: list[str]
    templates: list[str]
    synonyms: dict[str, list[str]]
    captions: list[str]
    labels: np.ndarray
    image_bytes: Sequence[bytes]  # encoded source images (PNG/JPEG bytes), by row; read when indexed
    rng: np.random.Generator

    def class_index(self, name: str, option: str) -> int:
        """Index of a class name; an unknown name is a one-line error listing the classes."""
        if name not in self.classnames:
            raise UserError(f"{option}={name!r} is not a class of {self.source.path} "
                            f"(classes: {', '.join(self.classnames)})")
        return self.classnames.index(name)

    def captions_naming(self, word: str) -> list[int]:
        """Rows whose caption contains ``word`` as a whole word (case-insensitive)."""
        pat = re.compile(rf"\b{re.escape(word)}\b", re.IGNORECASE)
        return [i for i, c in enumerate(self.captions) if pat.search(c)]


@dataclass
class PoisonRows:
    """An attack's output: appended rows, in-place replacements and its manifest entry."""

    images: list[bytes] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    origin: list[int] = field(default_factory=list)
    replace: dict[int, tuple[bytes, str]] = field(default_factory=dict)  # row -> (image, caption)
    manifest: dict[str, Any] = field(default_factory=dict)
    # targeted attacks: held-out target images (encoded) with true and adversarial class indices
    targets: list[tuple[bytes, int, int]] = field(default_factory=list)


class Attack:
    """Base class: subclasses set ``Options``, ``kind`` and implement :meth:`poison`.

    ``kind`` names a registered attack kind (``targeted``, ``backdoor``, … — :mod:`otcbench.attacks.kinds`),
    which decides how the attack is evaluated, summarised and shown."""

    name: ClassVar[str]
    kind: ClassVar[str]
    Options: ClassVar[type[Options]] = Options

    def __init__(self, options: Options) -> None:
        self.options = options

    def check(self, ctx: PoisonContext) -> None:
        """Validate options against the data before any work (one-line UserErrors)."""

    def poison(self, ctx: PoisonContext) -> PoisonRows:
        raise NotImplementedError


def decode_png_batch(blobs: list[bytes]) -> torch.Tensor:
    """Encoded images → uint8 ``[N,3,H,W]`` (all the same size)."""
    arrays = [decode_image({"bytes": b, "path": None}) for b in blobs]
    if not arrays:
        return torch.empty(0, 3, 0, 0, dtype=torch.uint8)
    shapes = sorted({a.shape[:2] for a in arrays})
    if len(shapes) > 1:  # real data: triggers are applied to one batch of equally sized images
        few = ", ".join(f"{w}x{h}" for h, w in shapes[:3])
        raise UserError(f"the images to poison have {len(shapes)} different sizes (e.g. {few}); import the "
                        "dataset with --image-size PX to give them one size")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def encode_png_batch(images: torch.Tensor) -> list[bytes]:
    """uint8 ``[N,3,H,W]`` → PNG bytes (lossless, so triggers survive storage bit-exactly)."""
    arr = images.permute(0, 2, 3, 1).contiguous().numpy()
    return [png_bytes(a) for a in arr]

