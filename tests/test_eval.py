"""Tests for evaluation (otcbench.eval): linear probe, top-k accuracy, zero-shot classifier, ``evaluate``."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from otcbench.config import EvalConfig
from otcbench.data.synth import CLASSES, TEMPLATES
from otcbench.errors import UserError
from otcbench.eval.features import image_features
from otcbench.eval.linear_probe import LinearProbe, accuracy, fit_logistic, linear_probe
from otcbench.eval.run import evaluate, resolve_checkpoint
from otcbench.eval.zeroshot import topk_accuracy, zeroshot_classifier, zeroshot_predict
from otcbench.models import create_model, get_tokenizer

# --------------------------------------------------------------------------------------------------
# hand-built classification problems


def blobs(
    n_per_class: int, num_classes: int = 4, dim: int = 8, spread: float = 0.3, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gaussian blobs around unit-norm class centres; returns (x, y, centres)."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(num_classes, dim, generator=g, dtype=torch.float64), dim=1)
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    x = centres[y] + spread * torch.randn(len(y), dim, generator=g, dtype=torch.float64)
    return x.float(), y, centres


def sample(centres: torch.Tensor, n_per_class: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(len(centres)).repeat_interleave(n_per_class)
    x = centres[y] + spread * torch.randn(len(y), centres.shape[1], generator=g, dtype=torch.float64)
    return x.float(), y


def objective(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """The documented probe objective: mean cross-entropy + ||W||² / (2·C·N), bias not regularised."""
    return F.cross_entropy(x @ w.t() + b, y) + (w * w).sum() / (2.0 * c * len(y))


def test_separable_blobs_reach_full_accuracy() -> None:
    x, y, centres = blobs(40, spread=0.15)
    probe = fit_logistic(x, y, 4, c=10.0)
    assert isinstance(probe, LinearProbe)
    assert probe.weight.shape == (4, 8) and probe.bias.shape == (4,) and probe.weight.dtype == torch.float32
    assert accuracy(probe, x, y) == 1.0
    xt, yt = sample(centres, 50, 0.15, seed=1)
    assert accuracy(probe, xt, yt) >= 0.98
    assert torch.equal(probe.predict(xt), probe.logits(xt).argmax(1))


def test_random_labels_give_chance_accuracy() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=g)
    y = torch.randint(0, 4, (400,), generator=g)
    xt = torch.randn(2000, 8, generator=g)
    yt = torch.randint(0, 4, (2000,), generator=g)
    probe, _ = linear_probe((x[:300], y[:300]), (x[300:], y[300:]), 4)
    acc = accuracy(probe, xt, yt)
    assert 0.15 < acc < 0.36  # chance is 0.25; 2000 test points → std ≈ 0.01


def test_gradient_vanishes_at_the_optimum() -> None:
    """fit_logistic minimises the documented objective: its gradient at the returned point is ~0."""
    x, y, _ = blobs(30, spread=0.8, seed=3)  # overlapping classes: a finite, unique optimum
    for c in (0.1, 1.0, 10.0):
        probe = fit_logistic(x, y, 4, c=c, max_iter=500)
        w = probe.weight.double().requires_grad_(True)
        b = probe.bias.double().requires_grad_(True)
        loss = objective(x.double(), y, w, b, c)
        gw, gb = torch.autograd.grad(loss, (w, b))
        # (the probe is returned in float32, so the gradient is ~0 up to that rounding)
        assert gw.abs().max() < 1e-4 and gb.abs().max() < 1e-4, (c, gw.abs().max(), gb.abs().max())
        # and it is a minimum: nearby points are worse
        for scale in (0.9, 1.1):
            assert objective(x.double(), y, w.detach() * scale, b.detach(), c) > loss.detach()


def test_closed_form_bias_only_optimum() -> None:
    """With all-zero features only the (unregularised) bias can fit: softmax(bias) = class frequencies."""
    y = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)
    x = torch.zeros(len(y), 5)
    probe = fit_logistic(x, y, 3, c=0.01)
    assert torch.equal(probe.weight, torch.zeros(3, 5))
    assert torch.softmax(probe.bias.double(), 0) == pytest.approx(torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64),
                                                                   abs=1e-5)
    assert (probe.bias[0] - probe.bias[1]).item() == pytest.approx(math.log(2), abs=1e-4)


def test_stronger_regularisation_shrinks_weights() -> None:
    x, y, _ = blobs(30, spread=0.5)
    norms = [fit_logistic(x, y, 4, c=c).weight.norm().item() for c in (0.01, 0.1, 1.0, 10.0)]
    assert norms == sorted(norms) and norms[0] < 0.5 * norms[-1]


def test_c_selection_picks_the_best_validation_score() -> None:
    """Imbalanced training data: a tiny C leaves only the bias (majority class), which fails on balanced val."""
    centres = torch.eye(4, 8, dtype=torch.float64)  # well separated
    xa, ya = sample(centres, 40, 0.15, seed=1)
    keep = (ya == 0) | (torch.arange(len(ya)) % 8 == 0)  # class 0 dominates training
    train = (xa[keep], ya[keep])
    val = sample(centres, 20, 0.15, seed=2)
    grid = (1e-5, 1e-3, 1.0, 10.0, 100.0)
    probe, scores = linear_probe(train, val, 4, c_grid=grid)
    assert set(scores) == set(grid)
    assert scores[1e-5] < 0.5  # predicts the majority class almost everywhere
    best = max(scores.values())
    assert scores[probe.c] == best
    # ties go to the stronger regularisation (the smallest C among the best)
    assert probe.c == min(c for c in grid if scores[c] == best)
    assert best == 1.0 and probe.c == 1.0  # C = 1, 10, 100 all separate val perfectly
    # the returned probe is refitted on train + val
    refit = fit_logistic(torch.cat([train[0], val[0]]), torch.cat([train[1], val[1]]), 4, probe.c)
    assert torch.allclose(probe.weight, refit.weight) and torch.allclose(probe.bias, refit.bias)


def test_accuracy_of_empty_split_is_nan() -> None:
    probe = LinearProbe(torch.zeros(2, 3), torch.zeros(2), 1.0)
    assert math.isnan(accuracy(probe, torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)))


# --------------------------------------------------------------------------------------------------
# top-k accuracy and zero-shot


def test_topk_accuracy_hand_built() -> None:
    logits = torch.tensor(
        [
            [0.9, 0.5, 0.1, 0.0],  # label 0: top-1 hit
            [0.9, 0.5, 0.1, 0.0],  # label 1: top-2 hit
            [0.1, 0.2, 0.3, 0.4],  # label 0: last place, only a top-4 hit
            [0.0, 0.0, 1.0, 0.5],  # label 3: top-2 hit
        ]
    )
    labels = torch.tensor([0, 1, 0, 3])
    acc = topk_accuracy(logits, labels, (1, 2, 3, 4))
    assert acc == {1: 0.25, 2: 0.75, 3: 0.75, 4: 1.0}
    assert topk_accuracy(logits, labels, (5,)) == {5: 1.0}  # k capped at the number of classes
    assert topk_accuracy(logits, labels) == {1: 0.25, 5: 1.0}
    assert math.isnan(topk_accuracy(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), (1,))[1])


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("otc-rn-nano")


def test_zeroshot_classifier_shape_and_normalisation(tiny_model: torch.nn.Module) -> None:
    tokenizer = get_tokenizer("otc-rn-nano")
    classnames, templates = list(CLASSES[:5]), list(TEMPLATES[:3])
    modes: list[bool] = []
    encode_text = tiny_model.encode_text

    def spy(*args, **kwargs):
        modes.append(tiny_model.training)
        return encode_text(*args, **kwargs)

    tiny_model.train()
    tiny_model.encode_text = spy  # type: ignore[method-assign]
    try:
        clf = zeroshot_classifier(tiny_model, tokenizer, classnames, templates)
    finally:
        del tiny_model.encode_text
    assert modes and not any(modes)  # evaluated in eval mode
    assert tiny_model.training  # and the model's own mode restored (otcbench.models.mode.eval_mode)
    tiny_model.eval()
    assert clf.shape == (64, 5) and clf.dtype == torch.float32 and clf.device.type == "cpu"
    assert torch.allclose(clf.norm(dim=0), torch.ones(5), atol=1e-5)
    # = normalised mean of the normalised template embeddings of each class
    with torch.no_grad():
        for j, name in enumerate(classnames):
            emb = tiny_model.encode_text(tokenizer([t.format(name) for t in templates]), normalize=True)
            assert torch.allclose(clf[:, j], F.normalize(emb.mean(0), dim=0), atol=1e-5)
    feats = F.normalize(torch.randn(7, 64), dim=1)
    logits = zeroshot_predict(feats, clf)
    assert logits.shape == (7, 5) and logits.abs().max() <= 1 + 1e-5  # cosine similarities


def test_image_features_normalised_and_batched(tiny_model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8, generator=g)
    f = image_features(tiny_model, images, batch_size=4)
    assert f.shape == (10, 64) and f.dtype == torch.float32
    assert torch.allclose(f.norm(dim=1), torch.ones(10), atol=1e-5)
    assert torch.allclose(f, image_features(tiny_model, images, batch_size=10), atol=1e-5)


# --------------------------------------------------------------------------------------------------
# evaluate()

METRIC_KEYS = ("zeroshot_top1", "zeroshot_top5", "linear_probe_top1")


@pytest.mark.slow
def test_evaluate_run_dir_writes_metrics(trained_run: Path, tiny_world: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("epoch_*.pt", "metrics*.json"))
    metrics = evaluate(run, tiny_world, EvalConfig(device="cpu"))
    written = json.loads((run / "metrics.json").read_text())
    assert metrics["metrics_file"] == str(run / "metrics.json")
    assert written == {k: v for k, v in metrics.items() if k != "metrics_file"}
    for k in METRIC_KEYS:
        assert isinstance(written[k], float) and 0.0 <= written[k] <= 1.0, k
    assert written["zeroshot_top5"] >= written["zeroshot_top1"]
    assert written["n_test"] == 6 * len(CLASSES) and written["n_classes"] == len(CLASSES)
    assert written["model"] == "otc-rn-nano"
    assert written["checkpoint"] == str(run / "checkpoints" / "last.pt")
    assert written["eval_data"] == str(tiny_world / "eval")
    assert written["linear_probe_c"] in EvalConfig().probe_c_grid
    shutil.rmtree(run)


@pytest.mark.slow
def test_evaluate_zeroshot_only(trained_run: Path, tiny_world: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    metrics = evaluate(trained_run, tiny_world, EvalConfig(device="cpu", linear_probe=False), out=out)
    written = json.loads(out.read_text())
    assert "linear_probe_top1" not in written and "linear_probe_c" not in written
    assert 0 <= written["zeroshot_top1"] <= written["zeroshot_top5"] <= 1
    assert metrics["metrics_file"] == str(out)


@pytest.mark.slow
def test_evaluate_probe_only(trained_run: Path, tiny_world: Path, tmp_path: Path, trained_metrics: dict) -> None:
    out = tmp_path / "m.json"
    metrics = evaluate(trained_run, tiny_world, EvalConfig(device="cpu", zeroshot=False), out=out)
    assert "zeroshot_top1" not in metrics
    assert metrics["linear_probe_top1"] == trained_metrics["linear_probe_top1"]


@pytest.mark.slow
def test_evaluate_accepts_pt_files(trained_run: Path, tiny_world: Path, tmp_path: Path,
                                   trained_metrics: dict[str, Any]) -> None:
    # a file inside a run directory: the metrics go to the run directory
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(trained_run / "checkpoints" / "epoch_002.pt", run / "checkpoints" / "epoch_002.pt")
    m = evaluate(run / "checkpoints" / "epoch_002.pt", tiny_world, EvalConfig(device="cpu"))
    assert m["metrics_file"] == str(run / "metrics.json") and (run / "metrics.json").is_file()
    # epoch_002 is the final checkpoint: same metrics as the run directory itself
    for k in METRIC_KEYS:
        assert m[k] == trained_metrics[k], k
    # a loose file: the metrics go beside it
    loose = tmp_path / "model.pt"
    shutil.copy(trained_run / "checkpoints" / "epoch_001.pt", loose)
    m1 = evaluate(loose, tiny_world / "eval", EvalConfig(device="cpu", linear_probe=False))  # eval set dir too
    assert m1["metrics_file"] == str(tmp_path / "model.metrics.json")
    assert json.loads((tmp_path / "model.metrics.json").read_text())["checkpoint"] == str(loose)
    shutil.rmtree(tmp_path)


@pytest.mark.slow
def test_evaluate_bad_inputs(trained_run: Path, tiny_world: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        evaluate(tmp_path / "missing.pt", tiny_world)
    with pytest.raises(UserError, match="without checkpoints/last.pt"):
        evaluate(tmp_path, tiny_world)
    with pytest.raises(UserError, match="does not exist"):
        evaluate(trained_run, tmp_path / "no-eval")
    # a bare state dict does not record its model: --model is needed
    bare = tmp_path / "bare.pt"
    torch.save(torch.load(trained_run / "checkpoints" / "last.pt", weights_only=True)["model"], bare)
    with pytest.raises(UserError, match="--model"):
        evaluate(bare, tiny_world)
    m = evaluate(bare, tiny_world, EvalConfig(device="cpu", linear_probe=False), model_name="otc-rn-nano")
    assert 0 <= m["zeroshot_top1"] <= 1
    assert resolve_checkpoint(trained_run).file == trained_run / "checkpoints" / "last.pt"
