"""The compositional world: every object is a distinct (colour, shape) binding in its own grid cell, and
every caption names each object with its colour (:func:`sample_compositional_scene`,
:func:`make_compositional_caption`); :func:`scene_content` is a scene's ground truth."""

from __future__ import annotations

import math

import numpy as np

from otcbench.data.synth.captions import class_noun, fill_template, join_phrases, junk_caption, pick
from otcbench.data.synth.scene import Scene, SceneObject, WorldOptions
from otcbench.data.synth.vocab import BACKGROUNDS, CLASSES, COLOUR_SYNONYMS, COLOURS

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
        return junk_caption(rng)
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
        colour = pick(rng, COLOUR_SYNONYMS[o.colour]) if rng.random() < opts.p_synonym / 2 else o.colour
        phrase = class_noun(rng, c, opts) if uncoloured else f"{colour} {class_noun(rng, c, opts)}"
        r = rng.random()
        phrase = (f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}" if r < 0.75
                  else (f"the {phrase}" if r < 0.9 else phrase))
        if with_pos:
            phrase += f" in the {grid_position(o, opts)}"
        phrases.append(phrase)
    return fill_template(rng, COMP_TEMPLATES, join_phrases(rng, phrases), scene, opts)
