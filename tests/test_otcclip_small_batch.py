"""otcclip with small batches: the intra-modality loss's augmented image view has at least 2 images where the
image tower's BatchNorm refuses a single one (a 1×1 feature map in train mode), and the row count is unchanged
everywhere else (results stay bit-identical)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from otcbench.config import DefenseConfig, SynthConfig, TrainJob
from otcbench.data.synth import write_world
from otcbench.defenses.otcclip import losses as oc_losses
from otcbench.defenses.otcclip.losses import intra_rows
from otcbench.models import create_model, encode_image_tokens, image_size
from otcbench.models.mode import min_train_rows
from otcbench.train.loop import Trainer

FRACTIONS = (0.01, 0.05, 0.1, 0.125, 0.25, 0.5, 0.9, 1.0)


def test_intra_rows_is_the_old_count_unless_batchnorm_needs_two() -> None:
    for b in range(1, 300):
        for f in FRACTIONS:
            old = max(1, round(f * b))  # the rule before small batches were handled
            assert intra_rows(b, f) == old
            assert intra_rows(b, f, min_rows=2) == (old if old >= 2 else min(2, b))
    assert intra_rows(8, 0.125) == 1 and intra_rows(8, 0.125, 2) == 2
    assert intra_rows(11, 0.125, 2) == 2 and intra_rows(12, 0.125, 2) == 2 and intra_rows(64, 0.125, 2) == 8


def test_min_train_rows_finds_batchnorm_with_one_value_per_channel() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
    before = net[1].running_mean.clone()
    assert min_train_rows(net, lambda: net(torch.randn(1, 3, 1, 1))) == 2  # 1×1 map: one value per channel
    assert min_train_rows(net, lambda: net(torch.randn(1, 3, 4, 4))) == 1
    assert torch.equal(net[1].running_mean, before) and net.training  # eval mode inside, restored after
    bn1d = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    assert min_train_rows(bn1d, lambda: bn1d(torch.randn(1, 3))) == 2
    ln = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    assert min_train_rows(ln, lambda: ln(torch.randn(1, 3))) == 1
    # the bundled towers: the 32-px ResNets end on a 1×1 map, the 64-px ones and the ViTs take one image
    for name, rows in (("otc-rn-nano", 2), ("otc-rn-grid", 1), ("otc-vit-tiny", 1)):
        model = create_model(name, device="cpu")
        x = torch.zeros(1, 3, *image_size(model))
        assert min_train_rows(model, lambda m=model, x=x: encode_image_tokens(m, x)) == rows, name


@pytest.mark.slow
def test_otcclip_trains_with_batch_8_on_a_batchnorm_model(
    tmp_path: Path, make_job: Callable[..., TrainJob], monkeypatch: pytest.MonkeyPatch
) -> None:
    # batch 8 × intra_fraction 1/8 = 1 image: BatchNorm on otc-rn-nano's 1×1 last stage raised before
    write_world(tmp_path / "world", SynthConfig(n_train=32, probe_train_per_class=1, probe_val_per_class=1,
                                                test_per_class=1, seed=0))
    job = make_job(data=tmp_path / "world", model="otc-rn-nano", batch_size=8, epochs=1)
    job.defense = DefenseConfig(name="otcclip", options={"warmup_epochs": 0, "top_k": 3})
    encoded: list[int] = []

    def spy(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        encoded.append(images.shape[0])
        return encode_image_tokens(model, images)

    monkeypatch.setattr(oc_losses, "encode_image_tokens", spy)
    tr = Trainer(job, tmp_path / "run", show_progress=False)
    tr.fit()
    steps = [r for r in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines())
             if r["type"] == "step"]
    assert len(steps) == 4 and all("loss_intra" in r for r in steps)
    # the one-image probe at the start, then one augmented view of 2 images per step
    assert encoded == [1, 2, 2, 2, 2]
