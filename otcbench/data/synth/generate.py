"""Batches of either world in memory: the training rows in seeded chunks (:func:`generate_rows`, over worker
processes) and the class-balanced single-object eval images (:func:`generate_labelled_scenes`)."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable

import numpy as np

from otcbench.data.format import png_bytes
from otcbench.data.synth.captions import make_caption
from otcbench.data.synth.compositional import make_compositional_caption, sample_compositional_scene, scene_content
from otcbench.data.synth.scene import Scene, SceneRenderer, WorldOptions, sample_scene
from otcbench.data.synth.vocab import CLASSES

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
