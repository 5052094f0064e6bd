"""The embedded synthetic image–caption world.

A procedural generator of small scenes (1–3 coloured shapes on a textured background) and web-like
alt-text captions. It is the default data of otcbench: deterministic from a seed, fast (numpy only), and
designed so that a tiny CLIP learns measurable zero-shot skill from the captions alone:

* every class is a shape with a distinct silhouette that survives 32 px rendering;
* captions name the objects with their class word most of the time, but also use synonyms, attribute
  words (colour, size, position, count, background), varied word order and web noise (file names,
  shop boilerplate, typos, partly wrong or unrelated captions), as alt-text does;
* the held-out evaluation splits are single-object images with a class label, so zero-shot accuracy
  measures whether the class word was grounded in the image, not whether the model guessed a scene.

A second world, ``world="compositional"`` (:func:`sample_compositional_scene`,
:func:`make_compositional_caption`), puts 2–4 objects with distinct colour–shape bindings in the cells of a
grid and names every object with its colour, so that captions differ from each other by binding alone
("a red circle and a blue square" vs "a blue circle and a red square"); its rows carry the ground truth in a
``content`` column (:func:`scene_content`).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from otcbench import __version__
from otcbench.config import SynthConfig
from otcbench.data.format import DatasetMeta, build_pair_dataset, png_bytes, save_eval_set, save_pair_dataset
from otcbench.errors import UserError

CLASSES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "diamond",
    "heart",
    "moon",
    "arrow",
    "bar",
    "hourglass",
)

#: Words a web caption may use instead of the class name. Also the thesaurus the synthetic world
#: offers to caption augmentation (EDA) so that it works offline.
CLASS_SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("disc", "round shape", "dot"),
    "square": ("box", "block", "tile"),
    "triangle": ("pyramid shape", "wedge"),
    "star": ("starburst", "five-pointed shape"),
    "cross": ("plus sign", "plus"),
    "ring": ("hoop", "donut", "loop"),
    "diamond": ("rhombus", "lozenge"),
    "heart": ("love heart", "valentine shape"),
    "moon": ("crescent", "crescent moon"),
    "arrow": ("pointer", "arrowhead"),
    "bar": ("stripe", "strip", "stick"),
    "hourglass": ("bowtie shape", "sand timer"),
}

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 190, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 30),
    "orange": (250, 140, 20),
    "purple": (150, 50, 200),
    "white": (245, 245, 245),
    "cyan": (30, 210, 220),
    "pink": (250, 120, 190),
}

COLOUR_SYNONYMS: dict[str, tuple[str, ...]] = {
    "red": ("crimson", "scarlet"),
    "green": ("lime", "emerald"),
    "blue": ("navy", "cobalt"),
    "yellow": ("golden", "lemon"),
    "orange": ("amber", "tangerine"),
    "purple": ("violet", "lilac"),
    "white": ("snowy", "ivory"),
    "cyan": ("turquoise", "aqua"),
    "pink": ("rose", "magenta"),
}

SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little", "tiny"),
    "large": ("large", "big", "huge"),
}

BACKGROUNDS: tuple[str, ...] = ("plain", "striped", "checkered", "noisy", "gradient", "dotted")
BACKGROUND_PHRASES: dict[str, tuple[str, ...]] = {
    "plain": ("a plain background", "a plain backdrop", "a blank background"),
    "striped": ("a striped background", "stripes", "a lined background"),
    "checkered": ("a checkered background", "a checkerboard", "a grid pattern"),
    "noisy": ("a noisy background", "a grainy background", "static"),
    "gradient": ("a gradient background", "a fading background", "a smooth gradient"),
    "dotted": ("a dotted background", "polka dots", "a spotted background"),
}

#: Zero-shot prompt templates written with the eval set (open_clip format strings).
TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of the {}.",
    "a drawing of a {}.",
    "a small {}.",
    "a large {}.",
    "a {} on a plain background.",
    "a {} on a striped background.",
)

COUNT_WORDS = {2: ("two", "2", "a pair of"), 3: ("three", "3")}
PLURALS = {"cross": "crosses", "hourglass": "hourglasses", "box": "boxes", "plus": "pluses"}

WEB_JUNK = (
    "click to enlarge",
    "untitled",
    "image not available",
    "free shipping on orders over $50",
    "thumbnail",
    "photo by admin",
    "see more",
    "placeholder image",
    "best price guaranteed",
    "home decor ideas",
)


def plural(noun: str) -> str:
    """English plural of a (possibly multi-word) noun phrase; only the last word changes."""
    head, _, last = noun.rpartition(" ")
    p = PLURALS.get(last, last + "es" if last.endswith(("s", "x", "sh", "ch")) else last + "s")
    return f"{head} {p}" if head else p


# --------------------------------------------------------------------------------------------------
# Shapes: each maps local coordinates (u right, v up, object radius = 1) to an inside mask.

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


# --------------------------------------------------------------------------------------------------
# Scenes


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


# --------------------------------------------------------------------------------------------------
# Captions


def _pick(rng: np.random.Generator, xs: Sequence[str]) -> str:
    return xs[int(rng.integers(len(xs)))]


def _position(obj: SceneObject, size: int) -> str:
    third = size / 3
    col = "left" if obj.cx < third else ("right" if obj.cx > 2 * third else "")
    row = "top" if obj.cy < third else ("bottom" if obj.cy > 2 * third else "")
    if row and col:
        return f"{row} {col}"
    return row or col or "center"


def _noun(rng: np.random.Generator, cls: int, opts: WorldOptions) -> str:
    name = CLASSES[cls]
    return _pick(rng, CLASS_SYNONYMS[name]) if rng.random() < opts.p_synonym else name


def _object_phrase(
    rng: np.random.Generator, cls: int, objs: list[SceneObject], opts: WorldOptions, size: int
) -> str:
    noun = _noun(rng, cls, opts)
    o = objs[0]
    words: list[str] = []
    if len(objs) > 1:
        words.append(_pick(rng, COUNT_WORDS.get(len(objs), ("some",))))
    if rng.random() < opts.p_size:
        words.append(_pick(rng, SIZE_WORDS[o.size]))
    if rng.random() < opts.p_colour and all(x.colour == o.colour for x in objs):
        cw = o.colour if rng.random() < 0.8 else _pick(rng, COLOUR_SYNONYMS[o.colour])
        words.append(cw)
    words.append(plural(noun) if len(objs) > 1 else noun)
    phrase = " ".join(words)
    if len(objs) == 1:
        article = "an" if phrase[0] in "aeiou" else "a"
        r = rng.random()
        phrase = f"{article} {phrase}" if r < 0.7 else (f"the {phrase}" if r < 0.85 else phrase)
        if rng.random() < 0.2:
            pos = _position(o, size)
            phrase += " in the center" if pos == "center" else f" in the {pos}"
    return phrase


def _join(rng: np.random.Generator, phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    if len(phrases) == 2:
        return f"{phrases[0]} {_pick(rng, ('and', 'next to', 'with', 'beside', '&'))} {phrases[1]}"
    return f"{', '.join(phrases[:-1])} and {phrases[-1]}"


_SCENE_TEMPLATES: tuple[str, ...] = (
    "{o}",
    "{o}",
    "a photo of {o}",
    "{o} on {b}",
    "picture of {o}",
    "{o}, {b}",
    "my drawing of {o}",
    "close-up of {o} on {b}",
    "{O}.",
    "stock image: {o} on {b}",
    "IMG_{n} {o}",
    "{o} - free vector art",
    "simple illustration with {o}",
    "{o} against {b}",
    "clipart {o}",
    "wallpaper with {o} on {b}",
    "{o}!!",
    "look at this: {o}",
)


def _typo(rng: np.random.Generator, text: str) -> str:
    words = text.split(" ")
    i = int(rng.integers(len(words)))
    w = words[i]
    if len(w) > 3:
        j = int(rng.integers(1, len(w) - 1))
        words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2 :]
    return " ".join(words)


def make_caption(rng: np.random.Generator, scene: Scene, opts: WorldOptions) -> str:
    """Write a web-like alt-text caption for ``scene``."""
    if rng.random() < opts.p_junk:
        return _pick(rng, WEB_JUNK) if rng.random() < 0.6 else f"DSC_{int(rng.integers(10000)):04d}.jpg"
    groups: dict[int, list[SceneObject]] = {}
    for o in scene.objects:
        groups.setdefault(o.cls, []).append(o)
    order = list(groups)  # main object's class first
    if len(order) > 1:
        if rng.random() < opts.p_omit:
            order = order[:-1]
        if rng.random() < 0.3:
            rest = order[1:]
            rng.shuffle(rest)
            order = [order[0], *rest] if rng.random() < 0.5 else [*rest, order[0]]
    wrong = rng.random() < opts.p_wrong
    phrases = []
    for c in order:
        cc = c
        if wrong and c == scene.objects[0].cls:
            cc = int((c + 1 + rng.integers(len(CLASSES) - 1)) % len(CLASSES))
        phrases.append(_object_phrase(rng, cc, groups[c], opts, opts.image_size))
    return _fill_template(rng, _SCENE_TEMPLATES, _join(rng, phrases), scene, opts)


def _fill_template(rng: np.random.Generator, templates: Sequence[str], objs: str, scene: Scene,
                   opts: WorldOptions) -> str:
    """A caption from a random template around the object phrases ``objs``, with the worlds' web noise
    (background phrase, file number, capitalisation, typos); both worlds draw from ``rng`` in this order."""
    text = _pick(rng, templates).format(
        o=objs,
        O=objs[:1].upper() + objs[1:],
        b=_pick(rng, BACKGROUND_PHRASES[scene.background]),
        n=int(rng.integers(1000, 9999)),
    )
    if rng.random() < 0.1:
        text = text.capitalize()
    if rng.random() < opts.p_typo:
        text = _typo(rng, text)
    return text


# --------------------------------------------------------------------------------------------------
# The compositional world: every object is a distinct (colour, shape) binding in its own grid cell


#: The compositional world's palette, most distinct colours first; ``n_colours`` takes the first n. A small
#: palette keeps colour from being a shortcut: with 4 colours and 2-4 objects, colour sets repeat across a
#: batch and only the shapes (bound to their colours) tell pairs apart.
COMP_PALETTE: tuple[str, ...] = ("red", "green", "blue", "yellow", "white", "purple", "cyan", "orange", "pink")
assert set(COMP_PALETTE) == set(COLOURS)


def scene_content(scene: Scene) -> str:
    """The canonical composition of ``scene``: its objects as "colour shape", sorted, joined by "|".

    Two scenes with the same colours and shapes but other bindings ("red circle|blue square" vs "blue
    circle|red square") get different strings; position, size and background are left out.
    """
    return "|".join(sorted(f"{o.colour} {CLASSES[o.cls]}" for o in scene.objects))


def grid_side(opts: WorldOptions) -> int:
    """Cells per side of the compositional grid: the smallest square with a cell per object (at least 2×2)."""
    return max(2, math.ceil(math.sqrt(opts.comp_objects[1])))


def grid_position(obj: SceneObject, opts: WorldOptions) -> str:
    """The grid cell of ``obj`` in words: "top left", "bottom right"; a 3×3 grid adds "top", "left", "center"."""
    g = grid_side(opts)
    cell = opts.image_size / g
    col, row = min(int(obj.cx // cell), g - 1), min(int(obj.cy // cell), g - 1)
    if g == 2:
        return f"{('top', 'bottom')[row]} {('left', 'right')[col]}"
    rows = ("top", *([""] * (g - 2)), "bottom")
    cols = ("left", *([""] * (g - 2)), "right")
    r, c = rows[row], cols[col]
    return f"{r} {c}" if r and c else (r or c or "center")


def sample_compositional_scene(
    rng: np.random.Generator, opts: WorldOptions, n_objects: int | None = None, cls: int | None = None
) -> Scene:
    """A compositional scene: distinct shapes, distinct colours, one object per (distinct) grid cell.

    ``objects[0]`` is the main object (the row's label); ``n_objects``/``cls`` force a scene of that size
    whose main object is of class ``cls`` (the single-object eval splits). Objects have one size range, so
    no object is singled out by its size and every object is as recognisable as any other.
    """
    s, g = opts.image_size, grid_side(opts)
    lo, hi = opts.comp_objects
    k = n_objects if n_objects is not None else int(rng.integers(lo, hi + 1))
    if k > min(g * g, opts.n_colours):
        raise ValueError(f"{k} objects do not fit a {g}x{g} grid with {opts.n_colours} distinct colours")
    shapes = [int(x) for x in rng.permutation(len(CLASSES))]
    if cls is not None:
        shapes.remove(cls)
        shapes.insert(0, cls)
    colours = [COMP_PALETTE[int(i)] for i in rng.permutation(opts.n_colours)[:k]]
    cells = [int(x) for x in rng.permutation(g * g)[:k]]
    cell = s / g
    objects = []
    for i in range(k):
        radius = float(rng.uniform(0.33, 0.43) * cell)
        # Jitter the centre but keep the object inside its cell, so its position is its cell.
        slack = max(cell / 2 - 0.95 * radius, 0.0)
        row, col = divmod(cells[i], g)
        cx = float((col + 0.5) * cell + rng.uniform(-slack, slack))
        cy = float((row + 0.5) * cell + rng.uniform(-slack, slack))
        angle = float(rng.uniform(-0.25, 0.25))
        objects.append(SceneObject(shapes[i], colours[i], "large", cx, cy, radius, angle))
    return Scene(tuple(objects), BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))])


#: Templates of compositional captions: shorter than the shapes world's, so that four objects with their
#: positions fit a 40-token context.
COMP_TEMPLATES: tuple[str, ...] = (
    "{o}",
    "{o}",
    "{o}",
    "a photo of {o}",
    "picture of {o}",
    "{O}.",
    "{o} on {b}",
    "IMG_{n} {o}",
    "{o} - free vector art",
    "clipart of {o}",
    "simple illustration with {o}",
    "{o}!!",
)


def compositional_templates(opts: WorldOptions) -> tuple[str, ...]:
    """Zero-shot prompts of the compositional world, in its captions' style: a shape bound to each palette colour.

    Every training caption binds a colour to each shape, so a prompt naming a bare shape ("a photo of a
    circle.") is unlike any caption; the classifier averages one prompt per colour (open_clip's template mean).
    """
    colours = COMP_PALETTE[: opts.n_colours]
    return tuple(t.format(c=c) for t in ("the {c} {{}}", "a photo of the {c} {{}}.") for c in colours)


def make_compositional_caption(rng: np.random.Generator, scene: Scene, opts: WorldOptions) -> str:
    """A caption naming every object of ``scene`` with its colour bound to its shape, in a random order.

    "a red circle and a blue square", "IMG_4821 a green star, the pink moon and a white bar", with every
    object's position ("a red circle in the top left") in a share ``p_position`` of captions. Web noise is
    the shapes world's, kept as options: unrelated captions (``p_junk``), the main object's class misnamed
    (``p_wrong``), synonyms (``p_synonym`` for shapes, half of it for colours), typos.
    """
    if rng.random() < opts.p_junk:
        return _pick(rng, WEB_JUNK) if rng.random() < 0.6 else f"DSC_{int(rng.integers(10000)):04d}.jpg"
    with_pos = rng.random() < opts.p_position
    wrong = rng.random() < opts.p_wrong
    # drawn last, so that captions with p_uncoloured=0 are exactly those of a world without the option
    uncoloured = opts.p_uncoloured > 0 and rng.random() < opts.p_uncoloured
    present = {o.cls for o in scene.objects}
    phrases = []
    for i in (int(x) for x in rng.permutation(len(scene.objects))):
        o = scene.objects[i]
        c = o.cls
        if wrong and i == 0:  # a class not in the scene, so the caption stays a set of distinct bindings
            c = int(rng.choice([x for x in range(len(CLASSES)) if x not in present]))
        colour = _pick(rng, COLOUR_SYNONYMS[o.colour]) if rng.random() < opts.p_synonym / 2 else o.colour
        phrase = _noun(rng, c, opts) if uncoloured else f"{colour} {_noun(rng, c, opts)}"
        r = rng.random()
        phrase = (f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}" if r < 0.75
                  else (f"the {phrase}" if r < 0.9 else phrase))
        if with_pos:
            phrase += f" in the {grid_position(o, opts)}"
        phrases.append(phrase)
    return _fill_template(rng, COMP_TEMPLATES, _join(rng, phrases), scene, opts)


# --------------------------------------------------------------------------------------------------
# Batch generation


#: PNG encoding of the world's images (lossless; the pair-dataset format's encoder).
encode_png = png_bytes


CHUNK = 1024


Rows = tuple[list[bytes], list[str], list[int], list[str]]


def _pairs_chunk(args: tuple[int, int, int, WorldOptions]) -> Rows:
    """Rows ``[start, start+count)`` of the training pairs; each chunk has its own seeded stream."""
    seed, start, count, opts = args
    rng = np.random.default_rng([seed, 0, start // CHUNK])
    renderer = SceneRenderer(opts.image_size)
    comp = opts.world == "compositional"
    images, captions, labels, content = [], [], [], []
    for _ in range(count):
        scene = sample_compositional_scene(rng, opts) if comp else sample_scene(rng, opts)
        images.append(encode_png(renderer.render(scene, rng)))
        captions.append(make_compositional_caption(rng, scene, opts) if comp else make_caption(rng, scene, opts))
        labels.append(scene.objects[0].cls)
        content.append(scene_content(scene))
    return images, captions, labels, content


def generate_pairs(
    n: int,
    seed: int,
    opts: WorldOptions,
    progress: Callable[[int], None] | None = None,
    workers: int | None = None,
) -> tuple[list[bytes], list[str], list[int]]:
    """Generate ``n`` training scenes: PNG bytes, captions and main-object labels.

    Rows are produced in fixed-size chunks with independent seeded streams, so the output depends on
    ``seed`` only — not on the number of worker processes used to render it.
    """
    images, captions, labels, _ = generate_rows(n, seed, opts, progress, workers)
    return images, captions, labels


def generate_rows(
    n: int,
    seed: int,
    opts: WorldOptions,
    progress: Callable[[int], None] | None = None,
    workers: int | None = None,
) -> Rows:
    """:func:`generate_pairs` plus each row's ground-truth ``content`` (:func:`scene_content`)."""
    jobs = [(seed, s, min(CHUNK, n - s), opts) for s in range(0, n, CHUNK)]
    workers = workers if workers is not None else min(len(jobs), os.cpu_count() or 1)
    images: list[bytes] = []
    captions: list[str] = []
    labels: list[int] = []
    content: list[str] = []

    def collect(part: Rows) -> None:
        images.extend(part[0])
        captions.extend(part[1])
        labels.extend(part[2])
        content.extend(part[3])
        if progress is not None:
            progress(len(part[1]))

    if workers > 1 and len(jobs) > 1:
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        with ctx.Pool(workers) as pool:
            for part in pool.imap(_pairs_chunk, jobs):
                collect(part)
    else:
        for job in jobs:
            collect(_pairs_chunk(job))
    return images, captions, labels, content


def generate_labelled(
    per_class: int, seed: int, stream: int, opts: WorldOptions
) -> tuple[list[np.ndarray], list[int]]:
    """Single-object, class-balanced labelled images for evaluation (``stream`` separates splits)."""
    images, labels, _ = generate_labelled_scenes(per_class, seed, stream, opts)
    return images, labels


def generate_labelled_scenes(
    per_class: int, seed: int, stream: int, opts: WorldOptions
) -> tuple[list[np.ndarray], list[int], list[Scene]]:
    """:func:`generate_labelled` plus the scenes drawn (compositional world: one object in a grid cell)."""
    rng = np.random.default_rng([seed, stream])
    renderer = SceneRenderer(opts.image_size)
    comp = opts.world == "compositional"
    images, labels, scenes = [], [], []
    for _ in range(per_class):
        for c in range(len(CLASSES)):
            if comp:
                scene = sample_compositional_scene(rng, opts, n_objects=1, cls=c)
            else:
                scene = sample_scene(rng, opts, n_objects=1, cls=c)
            images.append(renderer.render(scene, rng))
            labels.append(c)
            scenes.append(scene)
    return images, labels, scenes


# --------------------------------------------------------------------------------------------------
# Writing a world to disk


def world_options(cfg: SynthConfig) -> WorldOptions:
    """The renderer/caption knobs of a user-facing :class:`SynthConfig`."""
    return WorldOptions(
        image_size=cfg.image_size,
        p_colour=cfg.p_colour,
        p_synonym=cfg.p_synonym,
        p_junk=cfg.p_junk,
        p_wrong=cfg.p_wrong,
        world=cfg.world,
        comp_objects=(cfg.min_objects, cfg.max_objects),
        p_position=cfg.p_position,
        n_colours=cfg.n_colours,
        p_uncoloured=cfg.p_uncoloured,
    )


def write_world(
    out: str | Path,
    cfg: SynthConfig,
    *,
    command: str = "otcbench data synth",
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> DatasetMeta:
    """Generate the synthetic world and save it: a pair dataset at ``out`` and its eval set at ``out/eval``.

    ``progress`` receives the number of images finished since its last call.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"output {out} already exists; choose another path or remove it first")
    opts = world_options(cfg)
    images, captions, labels, content = generate_rows(cfg.n_train, cfg.seed, opts, progress)
    # Only the compositional world writes ``content``: the column is part of the fingerprint, and the
    # shapes world's datasets must keep theirs.
    comp = cfg.world == "compositional"
    pairs = build_pair_dataset(images, captions, labels, content=content if comp else None)

    splits = {}
    for stream, (split, per_class) in enumerate(
        (
            ("train", cfg.probe_train_per_class),
            ("val", cfg.probe_val_per_class),
            ("test", cfg.test_per_class),
            ("targets", cfg.targets_per_class),
        ),
        start=1,
    ):
        if per_class == 0:
            continue
        imgs, labs, scenes = generate_labelled_scenes(per_class, cfg.seed, stream, opts)
        splits[split] = build_pair_dataset(
            [encode_png(x) for x in imgs], [TEMPLATES[0].format(CLASSES[c]) for c in labs], labs,
            content=[scene_content(sc) for sc in scenes] if comp else None,
        )
        if progress is not None:
            progress(len(imgs))
    common = {
        "otcbench_version": __version__,
        "created_by": {"command": command, "options": cfg.model_dump(mode="json"), "seed": cfg.seed},
        "classnames": list(CLASSES),
        "templates": list(compositional_templates(opts) if comp else TEMPLATES),
        "synonyms": {
            **{k: list(v) for k, v in CLASS_SYNONYMS.items()},
            **{k: list(v) for k, v in COLOUR_SYNONYMS.items()},
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.eval-", dir=out.parent))
    try:
        save_eval_set(splits, staging / "eval", DatasetMeta(kind="eval", **common))
        meta = save_pair_dataset(
            pairs, out, DatasetMeta(kind="pairs", eval_set="eval", **common),
            overwrite=overwrite, extra_dirs={"eval": staging / "eval"},
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return meta


def expected_images(cfg: SynthConfig) -> int:
    """How many images :func:`write_world` renders (for progress bars)."""
    per_class = cfg.probe_train_per_class + cfg.probe_val_per_class + cfg.test_per_class + cfg.targets_per_class
    return cfg.n_train + per_class * len(CLASSES)
