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

One module per job; this package re-exports their public names, so ``from otcbench.data.synth import …``
is the way in:

* ``vocab`` — the words: classes, colours, synonyms, backgrounds, prompt templates, web junk;
* ``shapes`` — the classes' silhouettes;
* ``scene`` — scenes, the renderer (both worlds) and the shapes world's scene sampler;
* ``captions`` — the shapes world's captions and the phrase/noise helpers both worlds use;
* ``compositional`` — the compositional world's scenes, captions, prompts and ground truth;
* ``generate`` — batches of rows and eval images in memory (seeded chunks, worker processes);
* ``world`` — :func:`write_world`: a :class:`~otcbench.config.SynthConfig` rendered to disk.
"""

from __future__ import annotations

from otcbench.data.synth.captions import make_caption
from otcbench.data.synth.compositional import (
    COMP_PALETTE,
    COMP_TEMPLATES,
    compositional_templates,
    grid_position,
    grid_side,
    make_compositional_caption,
    sample_compositional_scene,
    scene_content,
)
from otcbench.data.synth.generate import (
    CHUNK,
    Rows,
    encode_png,
    generate_labelled,
    generate_labelled_scenes,
    generate_pairs,
    generate_rows,
)
from otcbench.data.synth.scene import Scene, SceneObject, SceneRenderer, WorldOptions, sample_scene
from otcbench.data.synth.shapes import SHAPES
from otcbench.data.synth.vocab import (
    BACKGROUND_PHRASES,
    BACKGROUNDS,
    CLASS_SYNONYMS,
    CLASSES,
    COLOUR_SYNONYMS,
    COLOURS,
    COUNT_WORDS,
    PLURALS,
    SIZE_WORDS,
    TEMPLATES,
    WEB_JUNK,
    plural,
)
from otcbench.data.synth.world import expected_images, world_options, write_world

__all__ = [
    "BACKGROUNDS",
    "BACKGROUND_PHRASES",
    "CHUNK",
    "CLASSES",
    "CLASS_SYNONYMS",
    "COLOURS",
    "COLOUR_SYNONYMS",
    "COMP_PALETTE",
    "COMP_TEMPLATES",
    "COUNT_WORDS",
    "PLURALS",
    "SHAPES",
    "SIZE_WORDS",
    "TEMPLATES",
    "WEB_JUNK",
    "Rows",
    "Scene",
    "SceneObject",
    "SceneRenderer",
    "WorldOptions",
    "compositional_templates",
    "encode_png",
    "expected_images",
    "generate_labelled",
    "generate_labelled_scenes",
    "generate_pairs",
    "generate_rows",
    "grid_position",
    "grid_side",
    "make_caption",
    "make_compositional_caption",
    "plural",
    "sample_compositional_scene",
    "sample_scene",
    "scene_content",
    "world_options",
    "write_world",
]
