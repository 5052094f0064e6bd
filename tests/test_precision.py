"""Device and precision paths: the CUDA code paths are exercised on CPU where torch allows it."""

from __future__ import annotations

import pytest
import torch

from otcbench.config import TrainConfig
from otcbench.errors import UserError
from otcbench.models import create_model, prepare_images
from otcbench.train.loop import autocast_dtype, make_optimizer, resolve_device
from otcbench.train.losses import clip_loss


def test_autocast_policy() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert autocast_dtype("auto", cuda) is torch.bfloat16
    assert autocast_dtype("auto", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16
    assert autocast_dtype("fp16", cuda) is torch.float16
    assert autocast_dtype("none", cuda) is None


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="unknown device"):
        resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda")


def _bf16_step(device: str) -> tuple[float, float]:
    torch.manual_seed(0)
    model = create_model("otc-rn-nano", device=device)
    opt = make_optimizer(model, TrainConfig(lr=1e-3))
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, device=device)
    tokens = torch.randint(1, 4000, (16, 20), device=device)
    losses = []
    for _ in range(2):
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
            img = model.encode_image(prepare_images(model, images), normalize=True)
            txt = model.encode_text(tokens, normalize=True)
            assert img.dtype == torch.bfloat16  # the matmuls really ran in bf16
            loss = clip_loss(img.float(), txt.float(), model.logit_scale.exp())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    return losses[0], losses[1]


@pytest.mark.slow
def test_bf16_autocast_step_on_cpu() -> None:
    first, second = _bf16_step("cpu")
    assert torch.isfinite(torch.tensor([first, second])).all()
    assert second < first  # the step made progress on the same batch


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_autocast_step_on_cuda() -> None:
    first, second = _bf16_step("cuda")
    assert second < first
