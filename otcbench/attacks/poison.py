"""``otcbench poison``: apply one or several attacks to a clean pair dataset, write the poisoned copy.

The poisoned dataset holds the clean rows (label-consistent attacks trigger some of them in place),
then every attack's appended rows; the ``poison`` column names the attack of each poisoned row. Its
``otcbench.json`` carries the poison manifest (docs/attacks.md): for each attack its name, options, rows and
what evaluation needs (targets with true/adversarial classes, trigger spec and target class), plus the
seed and the source's fingerprint. Target images are stored in ``OUT/targets``; the source's eval set is
copied to ``OUT/eval`` so ``eval --asr`` needs only the poisoned directory. The source is never written.

Poisoning at scale: when the source stores image *paths* (an imported dataset), the clean rows are not
copied. ``OUT/source`` is a link to the source dataset directory and clean rows keep their paths under it
(``source/images/…``), so stored paths stay relative and inside ``OUT``; only the poisoned rows carry new
images (as bytes). Moving ``OUT`` away from the source breaks the link (docs/data.md).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from otcbench import __version__
from otcbench.attacks.base import ATTACKS, Attack, PoisonContext, PoisonRows
from otcbench.attacks.kinds import TARGETS_DIR, attack_kind
from otcbench.config import apply_overrides
from otcbench.data.format import (
    SOURCE_LINK,
    DatasetMeta,
    ImageBlobs,
    build_pair_dataset,
    fingerprint_dataset,
    has_image_paths,
    image_cells,
    load_eval_set,
    load_pair_dataset,
    save_pair_dataset,
    staged_extras,
)
from otcbench.data.image_ids import content_id
from otcbench.errors import UserError


def attack_options(names: list[str], overrides: list[str] | None) -> list[tuple[str, dict[str, Any]]]:
    """Split ``--set`` overrides among attacks: with one attack keys are its own (``rate=0.01``); with
    several, prefix them with the attack name (``badnet.rate=0.01``)."""
    if not names:
        raise UserError("no attack given; pass --attack NAME (see `otcbench list attacks`)")
    if len(set(names)) != len(names):
        raise UserError(f"an attack is given twice ({', '.join(names)}); give each attack once")
    for n in names:
        ATTACKS.get(n)
    raw = apply_overrides({}, overrides)
    if len(names) == 1:
        if names[0] in raw and isinstance(raw[names[0]], dict) and len(raw) == 1:
            raw = raw[names[0]]
        return [(names[0], raw)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        raise UserError(f"--set {unknown[0]}...: with several attacks prefix each option with its attack, "
                        f"e.g. --set {names[0]}.{unknown[0]}=...")
    return [(n, raw.get(n, {})) for n in names]


def poison_dataset(
    source: str | Path,
    out: str | Path,
    attacks: list[tuple[str, dict[str, Any]]],
    *,
    seed: int = 0,
    command: str = "otcbench poison",
    overwrite: bool = False,
) -> DatasetMeta:
    """Poison ``source`` with ``attacks`` (name, options) and write the result to ``out``."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"output {out} already exists; choose another path or remove it first")
    built: list[Attack] = [ATTACKS.get(n)(ATTACKS.options(n, o)) for n, o in attacks]
    src = load_pair_dataset(source)
    if out.resolve() == src.path.resolve():
        raise UserError("the output must differ from the source; poisoning never modifies the clean dataset")
    eval_path = src.eval_set_path()
    eval_set = load_eval_set(eval_path) if eval_path is not None else None
    classnames = src.meta.classnames or (eval_set.classnames if eval_set else [])
    templates = src.meta.templates or (eval_set.templates if eval_set else [])
    if not classnames or not templates:
        raise UserError(f"{src.path} records no class names/templates; attacks need them to name classes")
    captions = src.captions
    labels = np.asarray(src.ds["label"], dtype=np.int64)
    cells = image_cells(src.ds)
    blobs = ImageBlobs(cells, src.path)  # read lazily: attacks touch only the rows they poison
    linked = has_image_paths(src.ds)

    def ctx_for(i: int) -> PoisonContext:
        return PoisonContext(src, eval_set, classnames, templates, src.meta.synonyms, captions, labels, blobs,
                             np.random.default_rng([seed, i]))

    for i, a in enumerate(built):
        attack_kind(a.kind, f"attack {a.name!r}")  # a kind unknown here could never be evaluated
        a.check(ctx_for(i))  # every bad option fails here, before any poisoning work

    results: list[PoisonRows] = [a.poison(ctx_for(i)) for i, a in enumerate(built)]

    # Clean rows: stored bytes stay bytes; a stored path is re-rooted under the link to the source.
    images: list[bytes | str] = [c["bytes"] if c["bytes"] is not None else f"{SOURCE_LINK}/{c['path']}"
                                 for c in cells]
    caps, labs = list(captions), labels.tolist()
    poison = list(src.ds["poison"])
    origin = list(src.ds["origin"])
    # Ground-truth composition (when the source has it): attacks change or add images whose composition
    # they do not describe, so their rows get "" (unknown); clean rows keep theirs.
    content = src.content
    # Image ids (when the source stores them): an image an attack writes is an image of its own, named by its
    # bytes — a triggered copy of a clean image leaves the clean image's other captions alone, and the copies
    # of one targeted poison image share one id. Attacks choose rows (captions), not images: docs/data.md.
    image_id = src.image_ids if src.has_image_id_column else None
    manifest_attacks = []
    target_imgs: list[bytes] = []
    target_true: list[int] = []
    target_adv: list[int] = []
    target_attack: list[str] = []
    for a, r in zip(built, results, strict=True):
        for row, (img, cap) in r.replace.items():
            if poison[row]:
                raise UserError(f"{a.name}: row {row} is already poisoned by {poison[row]}; "
                                "use separate target classes for the attacks")
            images[row], caps[row], poison[row], origin[row] = img, cap, a.name, row
            if content is not None:
                content[row] = ""
            if image_id is not None:
                image_id[row] = content_id(img)
        start = len(images)
        images += r.images
        caps += r.captions
        labs += r.labels
        origin += r.origin
        poison += [a.name] * len(r.images)
        if content is not None:
            content += [""] * len(r.images)
        if image_id is not None:
            image_id += [content_id(b) for b in r.images]
        rows = sorted(r.replace) + list(range(start, len(images)))
        entry = {"name": a.name, "kind": a.kind, "options": a.options.model_dump(mode="json"),
                 "rows": rows, "n_poisoned": len(rows), **r.manifest}
        if r.targets:
            entry["target_rows"] = list(range(len(target_imgs), len(target_imgs) + len(r.targets)))
            for img, true, adv in r.targets:
                target_imgs.append(img)
                target_true.append(true)
                target_adv.append(adv)
                target_attack.append(a.name)
        manifest_attacks.append(entry)

    ds = build_pair_dataset(images, caps, labs, poison, origin, content, image_id)
    meta = DatasetMeta(
        kind="pairs",
        otcbench_version=__version__,
        created_by={"command": command, "options": {"attacks": [[n, o] for n, o in attacks]}, "seed": seed},
        classnames=classnames,
        templates=templates,
        synonyms=src.meta.synonyms,
        eval_set="eval" if eval_set is not None else None,
    )
    with staged_extras(out, src.path if linked else None) as (staging, extra):
        if eval_set is not None:
            shutil.copytree(eval_set.path, staging / "eval")
            extra["eval"] = staging / "eval"
        targets_fp = None
        if target_imgs:
            tds = build_pair_dataset(target_imgs, [classnames[c] for c in target_adv], target_true,
                                     target_attack, list(range(len(target_imgs))))
            tds.save_to_disk(str(staging / TARGETS_DIR))
            targets_fp = fingerprint_dataset(tds)
            extra[TARGETS_DIR] = staging / TARGETS_DIR
        meta.poison = {
            "seed": seed,
            "source": {"path": str(src.path), "fingerprint": src.meta.fingerprint,
                       "link": SOURCE_LINK if linked else None},
            "attacks": manifest_attacks,
            "targets_fingerprint": targets_fp,
        }
        return save_pair_dataset(ds, out, meta, overwrite=overwrite, extra_dirs=extra)
