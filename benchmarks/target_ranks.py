"""Where does a targeted attack's adversarial class land, target by target? (compositional world)

For one checkpoint and one poisoned dataset, ranks the 12 zero-shot classes for every target image of the
manifest's first targeted attack and reports the adversarial class's rank, the top 3 and the ranks of the
shapes the target shows (its ``content``). The summary says how often c' is top-1 (the ASR ``eval --asr``
gives), how often it is in the top 3, and how often the top-1 is a shape the image shows. Used for the
caption-variant analysis of docs/attacks.md:

    python benchmarks/target_ranks.py RUN_OR_CHECKPOINT WORLD POISONED [--per-target]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from otcbench.attacks.kinds.base import EvalContext
from otcbench.data.format import load_eval_set
from otcbench.eval.asr import load_poisoned
from otcbench.eval.features import image_features
from otcbench.eval.zeroshot import zeroshot_classifier
from otcbench.models import checkpoint_model_name, create_model, get_tokenizer
from otcbench.train.checkpoint import resolve_checkpoint


def target_ranks(checkpoint: str | Path, eval_data: str | Path, poison: str | Path) -> list[dict[str, Any]]:
    """One row per target of the first targeted attack: its classes' zero-shot order and where c' and the
    target's visible shapes fall in it (1-based ranks)."""
    ck = resolve_checkpoint(checkpoint)
    name = checkpoint_model_name(ck.file)
    es = load_eval_set(eval_data)
    poisoned, manifest = load_poisoned(poison)
    model = create_model(name, checkpoint=ck.file).eval()
    clf = zeroshot_classifier(model, get_tokenizer(name), es.classnames, es.templates, device=torch.device("cpu"))

    def feats(x: torch.Tensor, transform: Any = None) -> torch.Tensor:
        return image_features(model, x, batch_size=256, device=torch.device("cpu"), transform=transform)

    ctx = EvalContext(poisoned, manifest, es.classnames, feats, clf, None, None, None, None)
    attack = next(a for a in manifest["attacks"] if a["kind"] == "targeted")
    logits = feats(ctx.target_images()[attack["target_rows"]]) @ clf
    rows = []
    for t, lg in zip(attack["targets"], logits, strict=True):
        order = [es.classnames[int(i)] for i in lg.argsort(descending=True)]
        visible = [o.split(" ", 1)[1] for o in t["content"].split("|")] if t.get("content") else []
        rows.append({"content": t.get("content", ""), "true_class": t["true_class"],
                     "adversarial_class": t["adversarial_class"],
                     "adversarial_rank": order.index(t["adversarial_class"]) + 1, "top3": order[:3],
                     "visible_ranks": [order.index(v) + 1 for v in visible], "top1_visible": order[0] in visible})
    return rows


def summarise(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Shares of targets: c' top-1 (the ASR), c' in the top 3, and a shape the target shows top-1."""
    n = len(rows)
    return {"asr": sum(r["adversarial_rank"] == 1 for r in rows) / n,
            "adversarial_in_top3": sum(r["adversarial_rank"] <= 3 for r in rows) / n,
            "top1_visible": sum(r["top1_visible"] for r in rows) / n, "n": n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path, help="run dir or checkpoint file")
    p.add_argument("eval_data", type=Path, help="eval set or the synthetic world dir")
    p.add_argument("poison", type=Path, help="the poisoned dataset the model trained on")
    p.add_argument("--per-target", action="store_true", help="print every target's row too")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = target_ranks(args.checkpoint, args.eval_data, args.poison)
    if args.per_target:
        for r in rows:
            print(f"{r['content']:42s} true={r['true_class']:9s} c'={r['adversarial_class']:9s} "
                  f"rank(c')={r['adversarial_rank']:2d} top3={r['top3']} visible ranks={r['visible_ranks']}")
    s = summarise(rows)
    print(f"n={s['n']} asr={s['asr']:.3f} c' in top 3={s['adversarial_in_top3']:.3f} "
          f"top-1 a visible shape={s['top1_visible']:.3f}")


if __name__ == "__main__":
    main()
