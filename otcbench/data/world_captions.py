"""More captions per image for the synthetic world, written by the world's own caption model.

The synthetic world has one caption per image; MS-COCO has five. To give the world COCO's shape, each image
gets further captions drawn from the same caption model that wrote its first one (``synth.make_caption`` /
``make_compositional_caption``: templates, synonyms, junk, wrong-class noise and typos at the world's rates),
for the scene the image shows.

The world does not store its scenes, so they are replayed: the world is generated in chunks with one seeded
stream each, and drawing the scenes again from the same streams gives the same scenes. The replay is checked —
every replayed caption must equal the stored one — so a change to the generator is an error here, never a
silent mismatch between images and the captions written for them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from otcbench.config import SynthConfig
from otcbench.data import synth
from otcbench.data.format import DatasetMeta, PairDataset
from otcbench.errors import UserError

#: The stream the extra captions are drawn from: ``default_rng([seed, EXTRA_STREAM, row])``, apart from the
#: world's own streams (``[seed, 0, chunk]`` for the pairs, ``[seed, 1..4]`` for the eval splits).
EXTRA_STREAM = 17


def world_config(meta: DatasetMeta) -> SynthConfig | None:
    """The configuration a dataset was rendered with by ``otcbench data synth``; None for any other dataset."""
    made = meta.created_by or {}
    if str(made.get("command", "")).split()[1:3] != ["data", "synth"] or not isinstance(made.get("options"), dict):
        return None
    try:
        return SynthConfig.model_validate(made["options"])
    except ValueError:
        return None


def replay_scenes(cfg: SynthConfig, n: int, captions: list[str]) -> list[synth.Scene]:
    """The scenes of the world's first ``n`` training rows, drawn again from the world's streams.

    Checks every replayed caption against ``captions`` (the stored ones)."""
    opts = synth.world_options(cfg)
    renderer = synth.SceneRenderer(opts.image_size)
    comp = opts.world == "compositional"
    write = synth.make_compositional_caption if comp else synth.make_caption
    scenes: list[synth.Scene] = []
    for start in range(0, n, synth.CHUNK):
        rng = np.random.default_rng([cfg.seed, 0, start // synth.CHUNK])
        for row in range(start, min(start + synth.CHUNK, n)):
            scene = synth.sample_compositional_scene(rng, opts) if comp else synth.sample_scene(rng, opts)
            renderer.render(scene, rng)  # rendering draws from the stream: replayed to keep it in step
            caption = write(rng, scene, opts)
            if caption != captions[row]:
                raise UserError(f"row {row} of the synthetic world does not replay (stored {captions[row]!r}, replayed "
                                f"{caption!r}): it was written by another version of the generator; re-create it with "
                                "`otcbench data synth`")
            scenes.append(scene)
    return scenes


def extra_captions(data: PairDataset, per_image: int) -> list[list[str]]:
    """Every row's captions, ``per_image`` in all: its stored caption first, then ``per_image - 1`` new ones.

    ``data`` must be an unpoisoned synthetic world (the scenes are replayed from its configuration)."""
    cfg = world_config(data.meta)
    if cfg is None:
        raise UserError(f"{data.path} is not a synthetic world written by `otcbench data synth`; more captions per "
                        "image can only be written for the world (its caption model is needed)")
    if any(data.poison_flags):
        raise UserError(f"{data.path} is poisoned; write the clean world's captions, then poison the result")
    captions = data.captions
    if per_image == 1:
        return [[c] for c in captions]
    if len(captions) != cfg.n_train:
        raise UserError(f"{data.path} has {len(captions)} rows but its configuration says {cfg.n_train}; re-create it")
    scenes = replay_scenes(cfg, len(captions), captions)
    opts = synth.world_options(cfg)
    comp = opts.world == "compositional"
    write: Callable[..., str] = synth.make_compositional_caption if comp else synth.make_caption
    out = []
    for row, (scene, own) in enumerate(zip(scenes, captions, strict=True)):
        rng = np.random.default_rng([cfg.seed, EXTRA_STREAM, row])
        out.append([own] + [write(rng, scene, opts) for _ in range(per_image - 1)])
    return out
