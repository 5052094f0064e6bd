"""The shapes world's scenes: what a scene is (:class:`Scene`), how one is drawn (:class:`SceneRenderer`, shared
by both worlds) and how the default world samples one (:func:`sample_scene`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from otcbench.data.synth.shapes import SHAPES
from otcbench.data.synth.vocab import BACKGROUNDS, CLASSES, COLOURS


@dataclass(frozen=True)
class SceneObject:
    """One shape in a scene."""

    cls: int
    colour: str
    size: str  # "small" | "large"
    cx: float  # centre in pixels
    cy: float
    radius: float  # pixels
    angle: float  # radians


@dataclass(frozen=True)
class Scene:
    """A rendered scene's description: what the caption generator may talk about."""

    objects: tuple[SceneObject, ...]
    background: str


@dataclass(frozen=True)
class WorldOptions:
    """Knobs of the world (kept small: `SynthConfig` in config.py is the user-facing model)."""

    image_size: int = 32
    max_objects: int = 3
    p_objects: tuple[float, ...] = (0.45, 0.35, 0.20)
    p_repeat: float = 0.2  # a scene repeats one class ("two red stars")
    p_synonym: float = 0.12  # a class mentioned by a synonym
    p_omit: float = 0.15  # a multi-object caption omits a secondary object
    p_junk: float = 0.04  # caption unrelated to the image (web boilerplate)
    p_wrong: float = 0.03  # caption names a wrong class for the main object
    p_typo: float = 0.03
    p_colour: float = 0.3  # an object phrase names its colour
    p_size: float = 0.35  # an object phrase names its size
    world: str = "shapes"  # "shapes" | "compositional"
    comp_objects: tuple[int, int] = (2, 4)  # compositional: fewest and most objects in a training scene
    p_position: float = 0.3  # compositional: a caption gives every object's grid position
    n_colours: int = 4  # compositional: palette size (the first n of COMP_PALETTE)
    p_uncoloured: float = 0.0  # compositional: a caption names the shapes without their colours


class SceneRenderer:
    """Renders scenes to uint8 RGB arrays with 2× supersampled anti-aliasing."""

    def __init__(self, image_size: int) -> None:
        self.size = image_size
        ss = 2 * image_size
        # Pixel-centre coordinates of the supersampled grid, in output-pixel units.
        c = (np.arange(ss, dtype=np.float32) + 0.5) / 2.0
        self.xx, self.yy = np.meshgrid(c, c)
        p = np.arange(image_size, dtype=np.float32)
        self.px, self.py = np.meshgrid(p, p)

    def background(self, kind: str, rng: np.random.Generator) -> np.ndarray:
        s = self.size
        # Muted colours so that the saturated object colours stand out.
        base = rng.uniform(20, 120, size=3) if rng.random() < 0.6 else rng.uniform(120, 200, size=3)
        grey = base.mean()
        base = 0.5 * base + 0.5 * grey
        other = np.clip(base + rng.choice([-1, 1]) * rng.uniform(30, 60), 0, 255) * np.ones(3)
        img = np.empty((s, s, 3), dtype=np.float32)
        img[:] = base
        if kind == "striped":
            period = rng.integers(3, 7)
            coord = self.py if rng.random() < 0.5 else self.px
            if rng.random() < 0.3:
                coord = self.px + self.py
            img[(coord // period) % 2 == 1] = other
        elif kind == "checkered":
            period = rng.integers(3, 6)
            img[((self.px // period) + (self.py // period)) % 2 == 1] = other
        elif kind == "noisy":
            img += rng.normal(0, 25, size=img.shape).astype(np.float32)
        elif kind == "gradient":
            t = (self.px if rng.random() < 0.5 else self.py) / max(s - 1, 1)
            img = base * (1 - t[..., None]) + other * t[..., None]
        elif kind == "dotted":
            period = rng.integers(4, 7)
            img[((self.px % period) == 1) & ((self.py % period) == 1)] = other
        return img.astype(np.float32)

    def draw(self, img: np.ndarray, obj: SceneObject, rng: np.random.Generator) -> None:
        ca, sa = math.cos(obj.angle), math.sin(obj.angle)
        dx = (self.xx - obj.cx) / obj.radius
        dy = (obj.cy - self.yy) / obj.radius  # v points up
        u = ca * dx + sa * dy
        v = -sa * dx + ca * dy
        inside = SHAPES[CLASSES[obj.cls]](u, v).astype(np.float32)
        s = self.size
        alpha = inside.reshape(s, 2, s, 2).mean(axis=(1, 3))[..., None]
        colour = np.asarray(COLOURS[obj.colour], dtype=np.float32) + rng.normal(0, 12, size=3)
        img *= 1 - alpha
        img += alpha * colour

    def render(self, scene: Scene, rng: np.random.Generator) -> np.ndarray:
        img = self.background(scene.background, rng)
        for obj in scene.objects:
            self.draw(img, obj, rng)
        img += rng.normal(0, 4, size=img.shape).astype(np.float32)
        return np.clip(img, 0, 255).astype(np.uint8)


def sample_scene(
    rng: np.random.Generator, opts: WorldOptions, n_objects: int | None = None, cls: int | None = None
) -> Scene:
    """Sample a scene; ``n_objects``/``cls`` force a single-object scene of a class (eval splits)."""
    s = opts.image_size
    k = n_objects if n_objects is not None else int(rng.choice(len(opts.p_objects), p=opts.p_objects)) + 1
    classes: list[int] = []
    for i in range(k):
        if i == 0:
            classes.append(cls if cls is not None else int(rng.integers(len(CLASSES))))
        elif rng.random() < opts.p_repeat:
            classes.append(classes[0])
        else:
            classes.append(int(rng.integers(len(CLASSES))))
    objects: list[SceneObject] = []
    colour_names = list(COLOURS)
    repeat_colour = colour_names[int(rng.integers(len(colour_names)))]
    for i, c in enumerate(classes):
        # The main object is the largest; single-object scenes use most of the frame.
        if k == 1:
            size = "large" if rng.random() < 0.6 else "small"
        else:
            size = "large" if i == 0 else ("small" if rng.random() < 0.7 else "large")
        lo, hi = ((0.26, 0.34) if size == "large" else (0.18, 0.23)) if k > 1 else (
            (0.32, 0.44) if size == "large" else (0.22, 0.28)
        )
        radius = float(rng.uniform(lo, hi) * s)
        # Rejection-sample a centre that keeps objects mostly apart.
        for _ in range(12):
            cx = float(rng.uniform(radius * 0.9, s - radius * 0.9))
            cy = float(rng.uniform(radius * 0.9, s - radius * 0.9))
            if all(math.hypot(cx - o.cx, cy - o.cy) > 0.8 * (radius + o.radius) for o in objects):
                break
        same = c == classes[0] and i > 0
        colour = repeat_colour if same and rng.random() < 0.7 else colour_names[int(rng.integers(9))]
        if i == 0:
            repeat_colour = colour
        angle = float(rng.uniform(-0.25, 0.25))
        objects.append(SceneObject(c, colour, size, cx, cy, radius, angle))
    return Scene(tuple(objects), BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))])
