"""``adaptive-describe``: targeted poisons whose captions describe the target correctly *and* add the
adversarial object — an adaptive attack on caption-matching defenses in the compositional world.

Threat model. The attacker knows the defense (RoCLIP, OTCCLIP) re-pairs every image with the pool caption
that matches it best — by global cosine or by an OT distance between image tokens and caption tokens — and
that a pixel-duplicate rule may group exact copies. The attacker controls ``poisons_per_target`` web pairs
per target, wants one specific scene (the target) classified as the adversarial class c' by zero-shot, and
knows the caption style of the data (``world=compositional``: every object named as "<colour> <shape>").

The poisons of a target are near-duplicates of it (a shift of up to ``max_shift`` pixels and light pixel
noise, so no two rows are pixel-identical), each captioned in the world's style with a random subset of
``named_objects`` of the target's true objects plus one adversarial object in a colour and a grid cell the
scene leaves free: "a red circle and a green star" for a red circle + blue square scene attacked towards
star (defaults: 3-object targets, one true object per caption). Every caption is a correct partial
description of the image with one extra object, so

* a matching defense finds the target's other poison captions (they name its exact colour–shape bindings,
  which no clean caption shares as a set) as the image's best matches, and the poison survives re-pairing;
* c' is the only object every caption names; the true objects appear in ``named_objects / target_objects``
  of them, so the text the target is pulled towards is dominated by c'.

``adaptive-swap`` (same options) is the binding-swap variant: c' is not added but takes the main object's place — its
colour and its cell ("a red star in the top left" for a red circle in the top left) — and the main object is
never named, so every caption is a full, correct description of the scene but for one shape word; the
colours, cells and other objects a matcher reads all agree with the image. ``adaptive-relabel`` (same options)
goes one step further: the other objects a caption names keep their colours and cells but take c' as their
shape too, so no caption names a shape the target shows.

Targets (``target_source``): ``scenes`` (default) renders ``n_targets`` new multi-object scenes with the
world's own generator and renderer from the poisoning seed — the realistic case of a specific web image
from the training distribution; they are never rows of the clean data (checked). ``split`` takes the
single-object images of the eval set's ``targets`` split, as ``targeted`` does. Either way success is
``targeted``'s: the target image's zero-shot top-1 is c' (``eval --asr``: ``asr_targeted``); the true class
of a generated scene is its main object (``objects[0]``, the world's label), and c' is never in the scene.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from otcbench.attacks.base import ATTACKS, Attack, PoisonContext, PoisonRows, decode_png_batch, encode_png_batch
from otcbench.config import Options, SynthConfig
from otcbench.data.format import image_bytes, png_bytes
from otcbench.data.synth import (
    BACKGROUND_PHRASES,
    CLASSES,
    COMP_PALETTE,
    COMP_TEMPLATES,
    Scene,
    SceneObject,
    SceneRenderer,
    WorldOptions,
    grid_position,
    grid_side,
    sample_compositional_scene,
    scene_content,
    world_options,
)
from otcbench.errors import UserError

#: Caption frames in the compositional world's style (its templates without the file-name noise that would
#: make poisons of one target differ by more than their objects).
_FRAMES: tuple[str, ...] = tuple(t for t in COMP_TEMPLATES if "{n}" not in t)
_PAIR_JOINS = ("and", "next to", "with", "beside", "&")


class AdaptiveDescribeOptions(Options):
    n_targets: int = Field(16, ge=1, description="target images (generated scenes or images of the targets split)")
    poisons_per_target: int = Field(25, ge=1, description="poisoned pairs (near-duplicates) per target")
    adversarial_class: str | None = Field(
        None, description="one adversarial class for every target (default: a random class not in the target)"
    )
    target_source: Literal["scenes", "split"] = Field(
        "scenes", description="scenes: new multi-object scenes rendered by the world's generator (held out of the "
        "clean data); split: the single-object images of the eval set's target_split"
    )
    target_split: str = Field("targets", description="with target_source=split: the eval set's split of targets")
    target_objects: int = Field(
        3, ge=1, le=8, description="with target_source=scenes: objects in a target scene (below the world's "
        "n_colours and grid cells, so the adversarial object gets a free colour and cell)"
    )
    named_objects: int | None = Field(
        1, ge=0, description="true objects each caption names (a fresh random subset per caption; None: all of "
        "them; 0: only c'). Fewer makes c' the dominant word of the target's captions, more makes each caption a "
        "fuller description"
    )
    max_shift: int = Field(1, ge=0, le=8, description="largest shift (pixels, each axis) of a near-duplicate")
    noise_std: float = Field(
        2.0, ge=0, description="Gaussian pixel noise of a near-duplicate (0-255 units); with max_shift=0 and "
        "noise_std=0 the poisons are exact copies of the target"
    )
    p_position: float | None = Field(
        None, ge=0, le=1, description="share of captions that give every object's grid cell (the adversarial one "
        "gets a free cell); None: the world's p_position"
    )


@dataclasses.dataclass
class _Target:
    """One target: its image, the objects it shows and the object the captions add."""

    image: bytes
    scene: Scene | None  # None for split targets (only their content string is known)
    true_objects: list[tuple[str, str, str]]  # (colour, shape, grid cell or "")
    label: int
    adv: int
    adv_colour: str
    adv_cell: str
    background: str | None
    split_index: int | None = None
    content: str = ""  # the target's composition ("colour shape|…", sorted): the manifest's record


@ATTACKS.register("adaptive-describe")
class AdaptiveDescribeAttack(Attack):
    """Near-duplicate targeted poisons captioned with the target's true objects plus the adversarial one."""

    kind = "targeted"
    Options = AdaptiveDescribeOptions
    #: adaptive-swap: c' takes the main object's colour and cell instead of being an added object
    swap: ClassVar[bool] = False

    # ---- the world ---------------------------------------------------------------------------------

    def world(self, ctx: PoisonContext) -> WorldOptions:
        """The source world's options, from the ``data synth`` record; a non-compositional source is an error."""
        created = ctx.source.meta.created_by or {}
        raw = created.get("options") if isinstance(created, dict) else None
        cfg = None
        if isinstance(raw, dict) and raw.get("world") == "compositional":
            try:
                cfg = SynthConfig.model_validate(raw)
            except ValueError:
                cfg = None
        if cfg is None or ctx.source.content is None:
            raise UserError(f"{self.name}: {ctx.source.path} is not a compositional world written by `otcbench "
                            "data synth --set world=compositional`; this attack captions in that world's style")
        return world_options(cfg)

    def check(self, ctx: PoisonContext) -> None:
        opts: AdaptiveDescribeOptions = self.options  # type: ignore[assignment]
        w = self.world(ctx)
        if opts.adversarial_class is not None:
            ctx.class_index(opts.adversarial_class, "adversarial_class")
        if opts.target_source == "scenes":
            cells = grid_side(w) ** 2
            most = min(cells, w.n_colours) - 1
            if opts.target_objects > most:
                raise UserError(f"{self.name}: target_objects={opts.target_objects} leaves no free colour/cell for "
                                f"the adversarial object in this world ({w.n_colours} colours, {cells} cells); "
                                f"use at most {most}")
            shown = opts.target_objects
        else:
            labels, content = self._split(ctx)
            eligible = len(labels) if opts.adversarial_class is None else int(
                (labels != ctx.classnames.index(opts.adversarial_class)).sum())
            if opts.n_targets > eligible:
                raise UserError(f"{self.name}: n_targets={opts.n_targets} but the split {opts.target_split!r} has "
                                f"only {eligible} eligible images; lower n_targets")
            shown = max((len(c.split("|")) for c in content), default=1)
        # swap names at most the other objects (clamped, so named_objects=1 also fits single-object targets)
        if not self.swap and opts.named_objects is not None and opts.named_objects > shown:
            raise UserError(f"{self.name}: named_objects={opts.named_objects} is above the {shown} objects a target "
                            "shows; lower it or leave it unset (all)")

    def _split(self, ctx: PoisonContext) -> tuple[np.ndarray, list[str]]:
        opts: AdaptiveDescribeOptions = self.options  # type: ignore[assignment]
        if ctx.eval_set is None or opts.target_split not in ctx.eval_set.splits:
            have = ", ".join(ctx.eval_set.splits) if ctx.eval_set is not None else "no eval set"
            raise UserError(f"{self.name}: no eval split {opts.target_split!r} to draw targets from (has: {have})")
        ds = ctx.eval_set.splits[opts.target_split]
        if "content" not in ds.column_names:
            raise UserError(f"{self.name}: the split {opts.target_split!r} has no content column; regenerate the "
                            "world with the current `otcbench data synth --set world=compositional`")
        return np.asarray(ds["label"], dtype=np.int64), list(ds["content"])

    # ---- targets -----------------------------------------------------------------------------------

    def _adversary(self, ctx: PoisonContext, w: WorldOptions, shapes: set[int], colours: set[str],
                   cells: set[str]) -> tuple[int, str, str]:
        """c' (not shown), its colour (not used in the scene) and a free grid cell."""
        opts: AdaptiveDescribeOptions = self.options  # type: ignore[assignment]
        if opts.adversarial_class is not None:
            adv = ctx.classnames.index(opts.adversarial_class)
        else:
            adv = int(ctx.rng.choice([c for c in range(len(ctx.classnames)) if c not in shapes]))
        free_colours = [c for c in COMP_PALETTE[: w.n_colours] if c not in colours]
        colour = free_colours[int(ctx.rng.integers(len(free_colours)))] if free_colours else COMP_PALETTE[0]
        g = grid_side(w)
        cell = w.image_size / g
        names = [grid_position(SceneObject(0, "", "large", (c + 0.5) * cell, (r + 0.5) * cell, 1.0, 0.0), w)
                 for r in range(g) for c in range(g)]
        free = [n for n in names if n not in cells]
        return adv, colour, free[int(ctx.rng.integers(len(free)))] if free else ""

    def _scene_targets(self, ctx: PoisonContext, w: WorldOptions) -> list[_Target]:
        opts: AdaptiveDescribeOptions = self.options  # type: ignore[assignment]
        renderer = SceneRenderer(w.image_size)
        # Held out by construction (own seed stream) and checked: no target is pixel-identical to a clean row.
        clean = {hashlib.sha1(b).digest() for b in ctx.image_bytes}
        fixed = None if opts.adversarial_class is None else ctx.classnames.index(opts.adversarial_class)
        out: list[_Target] = []
        while len(out) < opts.n_targets:
            scene = sample_compositional_scene(ctx.rng, w, n_objects=opts.target_objects)
            if fixed is not None and any(o.cls == fixed for o in scene.objects):
                continue
            blob = png_bytes(renderer.render(scene, ctx.rng))
            if hashlib.sha1(blob).digest() in clean:
                continue
            objs = [(o.colour, CLASSES[o.cls], grid_position(o, w)) for o in scene.objects]
            adv, colour, cell = self._adversary(ctx, w, {o.cls for o in scene.objects},
                                                {o.colour for o in scene.objects}, {x[2] for x in objs})
            out.append(_Target(blob, scene, objs, scene.objects[0].cls, adv, colour, cell, scene.background,
                               content=scene_content(scene)))
        return out

    def _bind(self, ctx: PoisonContext, t: _Target) -> _Target:
        """``adaptive-swap``: c' takes the main object's colour and cell, and the main object is not named.

        Applied to finished targets, after every random draw, so that both attacks draw the same stream: the
        same targets and adversarial classes for the same seed.
        """
        if not self.swap:
            return t
        main_colour, _, main_cell = t.true_objects[0]
        return dataclasses.replace(t, adv_colour=main_colour, adv_cell=main_cell, true_objects=t.true_objects[1:])

    def _split_targets(self, ctx: PoisonContext, w: WorldOptions) -> list[_Target]:
        opts: AdaptiveDescribeOptions = self.options  # type: ignore[assignment]
        labels, content = self._split(ctx)
        blobs = image_bytes(ctx.eval_set.splits[opts.target_split], ctx.eval_set.path)  # type: ignore[union-attr]
        fixed = None if opts.adversarial_class is None else ctx.classnames.index(opts.adversarial_class)
        eligible = np.arange(len(labels)) if fixed is None else np.flatnonzero(labels != fixed)
        out = []
        for j in ctx.rng.choice(eligible, size=opts.n_targets, replace=False):
            # content is "colour shape|…"; the grid cell of a split image is not recorded, so no positions
            objs = [(*item.split(" ", 1), "") for item in content[int(j)].split("|")]
            shapes = {ctx.classnames.index(s) for _, s, _ in objs}
            adv, colour, _ = self._adversary(ctx, w, shapes, {c for c, _, _ in objs}, set())
            out.append(_Target(blobs[int(j)], None, objs, int(labels[j]), adv, colour, "",  # type: ignore[arg-type]
                               None, split_index=int(j), content=content[int(j)]))
        return out

    # ---- poisons -----------------------------------------------------------------------------------

    def caption(self, ctx: PoisonContext, t: _Target, p_position: float) -> str:
        """One poison caption: ``named_objects`` true objects and the adversarial one, in the world's style."""
        opts: AdaptiveDescribeOptions = self.options  # type: ignore[assignment]
        k = len(t.true_objects) if opts.named_objects is None else min(opts.named_objects, len(t.true_objects))
        pick = sorted(int(i) for i in ctx.rng.choice(len(t.true_objects), size=k, replace=False)) if k else []
        objs = [t.true_objects[i] for i in pick] + [(t.adv_colour, ctx.classnames[t.adv], t.adv_cell)]
        with_pos = t.scene is not None and ctx.rng.random() < p_position
        phrases = []
        for i in (int(x) for x in ctx.rng.permutation(len(objs))):
            colour, shape, cell = objs[i]
            phrase = f"{colour} {shape}"
            r = ctx.rng.random()
            phrase = (f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}" if r < 0.75
                      else (f"the {phrase}" if r < 0.9 else phrase))
            if with_pos and cell:
                phrase += f" in the {cell}"
            phrases.append(phrase)
        if len(phrases) == 2:
            text = f"{phrases[0]} {_PAIR_JOINS[int(ctx.rng.integers(len(_PAIR_JOINS)))]} {phrases[1]}"
        else:
            text = f"{', '.join(phrases[:-1])} and {phrases[-1]}"
        frames = _FRAMES if t.background is not None else tuple(f for f in _FRAMES if "{b}" not in f)
        bgs = BACKGROUND_PHRASES[t.background] if t.background is not None else ("",)
        return frames[int(ctx.rng.integers(len(frames)))].format(
            o=text, O=text[:1].upper() + text[1:], b=bgs[int(ctx.rng.integers(len(bgs)))])

    def near_duplicates(self, ctx: PoisonContext, image: bytes, n: int) -> list[bytes]:
        """``n`` variants of ``image``: shifted by up to ``max_shift`` px (edge pixels repeated) plus noise."""
        opts: AdaptiveDescribeOptions = self.options  # type: ignore[assignment]
        base = decode_png_batch([image])[0]
        m = opts.max_shift
        out = []
        for _ in range(n):
            x = base
            if m:
                dy, dx = (int(v) for v in ctx.rng.integers(-m, m + 1, size=2))
                # replicate-pad then crop: a shift without the wrap-around of roll (objects stay in their cell)
                pad = torch.nn.functional.pad(base[None].float(), (m, m, m, m), mode="replicate")[0]
                x = pad[:, m + dy: m + dy + base.shape[1], m + dx: m + dx + base.shape[2]]
            x = x.double()
            if opts.noise_std > 0:
                x = x + torch.from_numpy(ctx.rng.normal(0, opts.noise_std, size=tuple(x.shape)))
            out.append(x.round().clamp(0, 255).to(torch.uint8))
        return encode_png_batch(torch.stack(out))

    def poison(self, ctx: PoisonContext) -> PoisonRows:
        opts: AdaptiveDescribeOptions = self.options  # type: ignore[assignment]
        w = self.world(ctx)
        p_pos = w.p_position if opts.p_position is None else opts.p_position
        targets = self._scene_targets(ctx, w) if opts.target_source == "scenes" else self._split_targets(ctx, w)
        targets = [self._bind(ctx, t) for t in targets]
        rows = PoisonRows()
        entries = []
        for t in targets:
            imgs = self.near_duplicates(ctx, t.image, opts.poisons_per_target)
            for img in imgs:
                rows.images.append(img)
                rows.captions.append(self.caption(ctx, t, p_pos))
                rows.labels.append(t.label)
                rows.origin.append(-1)
            rows.targets.append((t.image, t.label, t.adv))
            entry = {"true_class": ctx.classnames[t.label], "adversarial_class": ctx.classnames[t.adv],
                     "content": t.content,
                     "adversarial_object": f"{t.adv_colour} {ctx.classnames[t.adv]}"}
            if t.split_index is not None:
                entry["split_index"] = t.split_index
            entries.append(entry)
        rows.manifest = {"targets": entries,
                         "target_split": opts.target_split if opts.target_source == "split" else "generated"}
        return rows


@ATTACKS.register("adaptive-swap")
class AdaptiveSwapAttack(AdaptiveDescribeAttack):
    """adaptive-describe's binding swap: c' replaces the main object's shape in its colour and cell.

    Every caption describes the scene correctly (colours, cells, ``named_objects`` of the other objects) but
    for one shape word, so a matcher reading colours and positions finds the target's poison captions as its
    best matches; the main object is never named and c' is bound to exactly what the image shows there.
    """

    swap = True


@ATTACKS.register("adaptive-relabel")
class AdaptiveRelabelAttack(AdaptiveSwapAttack):
    """adaptive-swap with every named object relabelled: each caption names its objects' true colours and
    cells, all with c' as their shape ("a red star and a blue star" for a red circle + blue square scene).

    No caption names a shape the target shows, so no visible object's class word competes with c' in the
    text the target is pulled towards, and c' is bound to every colour a caption names (the zero-shot prompts
    average the palette's colours). The colours and cells a matcher reads all agree with the image.
    """

    def _bind(self, ctx: PoisonContext, t: _Target) -> _Target:
        t = super()._bind(ctx, t)
        adv = ctx.classnames[t.adv]
        return dataclasses.replace(t, true_objects=[(colour, adv, cell) for colour, _, cell in t.true_objects])
