"""A synthetic world on disk: :func:`write_world` renders a :class:`SynthConfig` into a pair dataset and its
eval set."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from otcbench import __version__
from otcbench.config import SynthConfig
from otcbench.data.format import DatasetMeta, build_pair_dataset, save_eval_set, save_pair_dataset
from otcbench.data.synth.compositional import compositional_templates, scene_content
from otcbench.data.synth.generate import encode_png, generate_labelled_scenes, generate_rows
from otcbench.data.synth.scene import WorldOptions
from otcbench.data.synth.vocab import CLASS_SYNONYMS, CLASSES, COLOUR_SYNONYMS, TEMPLATES
from otcbench.errors import UserError


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
