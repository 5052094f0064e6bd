"""``otcbench eval``: zero-shot and linear-probe evaluation of a checkpoint, written to ``metrics.json``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from otcbench.config import EvalConfig
from otcbench.data.format import EvalSet, images_to_tensor, load_eval_set
from otcbench.device import resolve_device
from otcbench.errors import UserError
from otcbench.eval.asr import attack_success, load_poisoned
from otcbench.eval.features import image_features
from otcbench.eval.linear_probe import accuracy, linear_probe
from otcbench.eval.zeroshot import topk_accuracy, zeroshot_classifier, zeroshot_predict
from otcbench.models import checkpoint_model_name, create_model, get_tokenizer
from otcbench.train.checkpoint import ResolvedCheckpoint, resolve_checkpoint, write_json


def load_split(es: EvalSet, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    ds = es.splits[split]
    return images_to_tensor(ds, root=es.path), torch.tensor(ds["label"], dtype=torch.long)


def evaluate(
    checkpoint: str | Path,
    eval_data: str | Path,
    cfg: EvalConfig | None = None,
    *,
    model_name: str | None = None,
    out: str | Path | None = None,
    poison: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on ``eval_data``; writes and returns the metrics.

    ``eval_data`` is an eval set, or a pair dataset that carries one (the synthetic world). With
    ``cfg.asr``, ``poison`` is the poisoned dataset whose manifest says what to measure.
    """
    cfg = cfg or EvalConfig()
    t0 = time.perf_counter()
    ck = resolve_checkpoint(checkpoint)
    es = load_eval_set(eval_data)
    poisoned = manifest = None
    if cfg.asr:
        if poison is None:
            raise UserError("--asr needs --poison POISONED_DATA (the dataset written by `otcbench poison`)")
        poisoned, manifest = load_poisoned(poison)
    name = model_name or checkpoint_model_name(ck.file)
    if not name:
        raise UserError(f"checkpoint {ck.file} does not record its model; pass --model NAME")
    if cfg.linear_probe and not {"train", "val"} <= set(es.splits):
        raise UserError(f"eval set {es.path} has no train/val splits for the linear probe; "
                        "evaluate with --zeroshot only, or use an eval set with train/val/test")
    device = resolve_device(cfg.device)
    model = create_model(name, checkpoint=ck.file, device=device)
    amp = torch.bfloat16 if device.type == "cuda" else None
    metrics: dict[str, Any] = {}
    test_x, test_y = load_split(es, "test")
    test_f = image_features(model, test_x, batch_size=cfg.batch_size, device=device, amp_dtype=amp)
    n_classes = len(es.classnames)
    clf = probe = None
    if cfg.zeroshot or cfg.asr:
        tokenizer = get_tokenizer(name)
        clf = zeroshot_classifier(model, tokenizer, es.classnames, es.templates, device=device)
    if cfg.zeroshot:
        acc = topk_accuracy(zeroshot_predict(test_f, clf), test_y, (1, 5))
        metrics["zeroshot_top1"] = acc[1]
        metrics["zeroshot_top5"] = acc[5]
    if cfg.linear_probe:
        tr_x, tr_y = load_split(es, "train")
        va_x, va_y = load_split(es, "val")
        probe_feats = {
            k: image_features(model, x, batch_size=cfg.batch_size, device=device, amp_dtype=amp)
            for k, x in (("train", tr_x), ("val", va_x))
        }
        probe, _ = linear_probe(
            (probe_feats["train"], tr_y), (probe_feats["val"], va_y), n_classes, cfg.probe_c_grid,
            cfg.probe_max_iter,
        )
        metrics["linear_probe_top1"] = accuracy(probe, test_f, test_y)
        metrics["linear_probe_c"] = probe.c
    if cfg.asr:
        def feats(x: torch.Tensor, transform=None) -> torch.Tensor:
            return image_features(model, x, batch_size=cfg.batch_size, device=device, amp_dtype=amp,
                                  transform=transform)

        metrics.update(
            attack_success(poisoned, manifest, es.classnames, feats, clf, test_x, test_y, probe, test_f)
        )
        metrics["poison_data"] = str(poisoned.path)
    metrics.update(
        {
            "n_test": len(test_y),
            "n_classes": n_classes,
            "model": name,
            "checkpoint": str(ck.file),
            "eval_data": str(es.path),
            "eval_fingerprint": es.meta.fingerprint,
            "seconds": round(time.perf_counter() - t0, 2),
        }
    )
    target = Path(out) if out is not None else (
        (ck.run_dir / "metrics.json") if ck.run_dir is not None else ck.file.with_suffix(".metrics.json")
    )
    write_json(target, metrics)
    metrics["metrics_file"] = str(target)
    return metrics


__all__ = ["ResolvedCheckpoint", "evaluate", "load_split", "resolve_checkpoint"]  # the first and last: historical path
