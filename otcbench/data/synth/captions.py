"""The shapes world's web-like alt-text captions (:func:`make_caption`), and the phrase and noise helpers
the compositional world's captions share (:func:`pick`, :func:`class_noun`, :func:`join_phrases`,
:func:`fill_template`, :func:`junk_caption`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from otcbench.data.synth.scene import Scene, SceneObject, WorldOptions
from otcbench.data.synth.vocab import (
    BACKGROUND_PHRASES,
    CLASS_SYNONYMS,
    CLASSES,
    COLOUR_SYNONYMS,
    COUNT_WORDS,
    SIZE_WORDS,
    WEB_JUNK,
    plural,
)


def pick(rng: np.random.Generator, xs: Sequence[str]) -> str:
    """One of ``xs``, uniformly (one ``integers`` draw, so both worlds' streams stay as they were)."""
    return xs[int(rng.integers(len(xs)))]


def _position(obj: SceneObject, size: int) -> str:
    third = size / 3
    col = "left" if obj.cx < third else ("right" if obj.cx > 2 * third else "")
    row = "top" if obj.cy < third else ("bottom" if obj.cy > 2 * third else "")
    if row and col:
        return f"{row} {col}"
    return row or col or "center"


def class_noun(rng: np.random.Generator, cls: int, opts: WorldOptions) -> str:
    """The word a caption uses for class ``cls``: its name, or a synonym in a share ``p_synonym``."""
    name = CLASSES[cls]
    return pick(rng, CLASS_SYNONYMS[name]) if rng.random() < opts.p_synonym else name


def _object_phrase(
    rng: np.random.Generator, cls: int, objs: list[SceneObject], opts: WorldOptions, size: int
) -> str:
    noun = class_noun(rng, cls, opts)
    o = objs[0]
    words: list[str] = []
    if len(objs) > 1:
        words.append(pick(rng, COUNT_WORDS.get(len(objs), ("some",))))
    if rng.random() < opts.p_size:
        words.append(pick(rng, SIZE_WORDS[o.size]))
    if rng.random() < opts.p_colour and all(x.colour == o.colour for x in objs):
        cw = o.colour if rng.random() < 0.8 else pick(rng, COLOUR_SYNONYMS[o.colour])
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


def join_phrases(rng: np.random.Generator, phrases: list[str]) -> str:
    """Object phrases as one: "a and b" (or "next to", "with", …) for two, "a, b and c" for more."""
    if len(phrases) == 1:
        return phrases[0]
    if len(phrases) == 2:
        return f"{phrases[0]} {pick(rng, ('and', 'next to', 'with', 'beside', '&'))} {phrases[1]}"
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


def junk_caption(rng: np.random.Generator) -> str:
    """A caption unrelated to the image, as the web has: shop boilerplate or a camera file name."""
    return pick(rng, WEB_JUNK) if rng.random() < 0.6 else f"DSC_{int(rng.integers(10000)):04d}.jpg"


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
        return junk_caption(rng)
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
    return fill_template(rng, _SCENE_TEMPLATES, join_phrases(rng, phrases), scene, opts)


def fill_template(rng: np.random.Generator, templates: Sequence[str], objs: str, scene: Scene,
                   opts: WorldOptions) -> str:
    """A caption from a random template around the object phrases ``objs``, with the worlds' web noise
    (background phrase, file number, capitalisation, typos); both worlds draw from ``rng`` in this order."""
    text = pick(rng, templates).format(
        o=objs,
        O=objs[:1].upper() + objs[1:],
        b=pick(rng, BACKGROUND_PHRASES[scene.background]),
        n=int(rng.integers(1000, 9999)),
    )
    if rng.random() < 0.1:
        text = text.capitalize()
    if rng.random() < opts.p_typo:
        text = _typo(rng, text)
    return text
