"""The twelve shape classes' silhouettes, as masks over an object's local coordinates."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from otcbench.data.synth.vocab import CLASSES

# Each shape maps local coordinates (u right, v up, object radius = 1) to an inside mask.


def _polar(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.hypot(u, v), np.arctan2(v, u)


def _circle(u, v):
    return u * u + v * v <= 0.9


def _square(u, v):
    return np.maximum(np.abs(u), np.abs(v)) <= 0.78


def _triangle(u, v):
    return (v >= -0.7) & (np.abs(u) <= 0.95 * (0.95 - v) / 1.65)


def _star(u, v):
    r, t = _polar(u, v)
    # Five spikes: the radius oscillates between 0.42 and 1.0 around the circle.
    k = np.abs(np.cos(2.5 * (t - math.pi / 2)))
    return r <= 0.42 + 0.58 * k**2.2


def _cross(u, v):
    a, b = np.abs(u), np.abs(v)
    return ((a <= 0.28) & (b <= 0.95)) | ((b <= 0.28) & (a <= 0.95))


def _ring(u, v):
    r2 = u * u + v * v
    return (r2 <= 0.95) & (r2 >= 0.36)


def _diamond(u, v):
    return np.abs(u) / 0.7 + np.abs(v) <= 1.0


def _heart(u, v):
    x, y = 1.2 * u, 1.25 * v + 0.2
    return (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0


def _moon(u, v):
    return (u * u + v * v <= 0.92) & ((u - 0.5) ** 2 + (v - 0.25) ** 2 >= 0.6)


def _arrow(u, v):
    shaft = (np.abs(v) <= 0.2) & (u >= -0.95) & (u <= 0.15)
    head = (u >= 0.05) & (u <= 0.95) & (np.abs(v) <= (0.95 - u) * 0.9)
    return shaft | head


def _bar(u, v):
    return (np.abs(v) <= 0.3) & (np.abs(u) <= 0.95)


def _hourglass(u, v):
    return (np.abs(v) <= 0.85) & (np.abs(u) <= 0.85 * np.abs(v) + 0.08)


SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "star": _star,
    "cross": _cross,
    "ring": _ring,
    "diamond": _diamond,
    "heart": _heart,
    "moon": _moon,
    "arrow": _arrow,
    "bar": _bar,
    "hourglass": _hourglass,
}
assert tuple(SHAPES) == CLASSES
