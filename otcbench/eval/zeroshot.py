"""Zero-shot classification with open_clip's ``build_zero_shot_classifier`` (mean of normalised templates)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from open_clip import build_zero_shot_classifier

from otcbench.models.mode import eval_mode


@torch.no_grad()
def zeroshot_classifier(
    model: torch.nn.Module,
    tokenizer,
    classnames: Sequence[str],
    templates: Sequence[str],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Class weights ``[D, C]`` (float32, CPU): normalised mean of normalised template embeddings."""
    with eval_mode(model):
        w = build_zero_shot_classifier(
            model, tokenizer, list(classnames), list(templates), num_classes_per_batch=64, device=device
        )
    return w.float().cpu()


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Top-k accuracies for each k (k is capped at the number of classes)."""
    out = {}
    for k in ks:
        kk = min(k, logits.shape[1])
        hit = (logits.topk(kk, dim=1).indices == labels[:, None]).any(dim=1)
        out[k] = float(hit.float().mean()) if len(labels) else float("nan")
    return out


def zeroshot_predict(features: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """Logits of normalised image features against a zero-shot classifier."""
    return features @ classifier
