"""Backdoor triggers: determinism, locality, exact formulas, the rng draw-order contract, validation."""

from __future__ import annotations

import copy
import math

import numpy as np
import pydantic
import pytest
import torch

from otcbench.attacks.triggers import (
    PATCH_KINDS,
    TriggerSpec,
    apply_trigger,
    patch_side,
    sig_signal,
    trigger_mask,
    wanet_grid,
)

KINDS = ["badnet", "yellow", "blended", "sig", "wanet"]
RANDOM_KINDS = ["badnet", "yellow", "blended"]  # the ones that draw from the rng with default options


def _images(b: int = 6, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=g)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _bbox(mask: torch.Tensor) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the True pixels of a 2-D mask."""
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    return int(rows[0]), int(cols[0]), int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


# ---------------------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_output_and_input_untouched(kind: str) -> None:
    x = _images()
    before = x.clone()
    spec = TriggerSpec(kind=kind)
    a = apply_trigger(spec, x, _rng(1))
    b = apply_trigger(spec, x, _rng(1))
    assert a.dtype == torch.uint8 and a.shape == x.shape
    assert torch.equal(a, b)
    assert torch.equal(x, before), "the input batch must not be modified"
    assert not torch.equal(a, x), "a trigger must change the images"


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_other_seed_differs_where_random(kind: str) -> None:
    x = _images()
    spec = TriggerSpec(kind=kind)
    assert not torch.equal(apply_trigger(spec, x, _rng(1)), apply_trigger(spec, x, _rng(2)))


@pytest.mark.parametrize("kind", ["sig", "wanet"])
def test_deterministic_triggers_ignore_and_do_not_consume_rng(kind: str) -> None:
    x = _images()
    spec = TriggerSpec(kind=kind)
    rng = _rng(1)
    state = copy.deepcopy(rng.bit_generator.state)
    assert torch.equal(apply_trigger(spec, x, rng), apply_trigger(spec, x, _rng(2)))
    assert rng.bit_generator.state == state


# ------------------------------------------------------------------------------------------------- patches


@pytest.mark.parametrize("kind", ["badnet", "yellow"])
@pytest.mark.parametrize("location", ["random", "bottom_right", "top_left", "center"])
@pytest.mark.parametrize(("h", "w", "size"), [(32, 32, 16 / 224), (32, 32, 0.25), (24, 40, 0.3), (17, 17, 1.0)])
def test_patch_changes_only_its_square(kind: str, location: str, h: int, w: int, size: float) -> None:
    x = _images(b=8, h=h, w=w, seed=3)
    spec = TriggerSpec(kind=kind, size=size, location=location)
    p = max(1, round(size * min(h, w)))
    assert patch_side(spec, h, w) == p
    rng = _rng(5)
    mask = trigger_mask(spec, x, copy.deepcopy(rng))
    out = apply_trigger(spec, x, rng)
    assert mask is not None and mask.shape == (8, h, w) and mask.dtype == torch.bool
    changed = (out != x).any(dim=1)
    for i in range(8):
        top, left, hh, ww = _bbox(mask[i])
        assert (hh, ww) == (p, p) and int(mask[i].sum()) == p * p, "the mask is one p×p square"
        assert 0 <= top <= h - p and 0 <= left <= w - p
        expected_corner = {
            "top_left": (0, 0),
            "bottom_right": (h - p, w - p),
            "center": ((h - p) // 2, (w - p) // 2),
        }.get(location)
        if expected_corner is not None:
            assert (top, left) == expected_corner
        # Outside the square: bit-identical.
        assert torch.equal(out[i][:, ~mask[i]], x[i][:, ~mask[i]])
        assert not changed[i][~mask[i]].any()
        # Inside: the changed pixels are exactly those where the patch differs from the image.
        patch = out[i][:, top : top + p, left : left + p]
        differs = (patch != x[i][:, top : top + p, left : left + p]).any(dim=0)
        assert int(changed[i].sum()) == int(differs.sum())
        if kind == "yellow":
            assert torch.equal(patch, torch.tensor([255, 255, 0], dtype=torch.uint8).view(3, 1, 1).expand(3, p, p))


def _check_badnet_reference(x: torch.Tensor, spec: TriggerSpec, p: int, seed: int) -> np.random.Generator:
    """Reference implementation of the draw contract: per image top, left, then standard_normal((3, c, c)) with
    c = ceil(p / noise_cell), each value filling a cell; returns the reference rng after the draws."""
    out = apply_trigger(spec, x, _rng(seed))
    ref = _rng(seed)
    cell = spec.noise_cell
    c = -(-p // cell)
    h, w = x.shape[2:]
    for i in range(x.shape[0]):
        top = int(ref.integers(0, h - p + 1))
        left = int(ref.integers(0, w - p + 1))
        z = ref.standard_normal((3, c, c)).repeat(cell, axis=1).repeat(cell, axis=2)[:, :p, :p]
        mean = x[i].numpy().astype(np.float64).mean(axis=(1, 2)).reshape(3, 1, 1)
        expected = np.round(np.clip(mean + 255 * spec.noise_std * z, 0, 255)).astype(np.uint8)
        patch = out[i, :, top : top + p, left : left + p]
        assert np.array_equal(patch.numpy(), expected)
        assert torch.equal(patch[:, :cell, :cell], patch[:, :1, :1].expand(3, cell, cell)), "one value per cell"
    return ref


def test_badnet_patch_is_mean_plus_noise_in_documented_draw_order() -> None:
    _check_badnet_reference(_images(b=4, h=32, w=32, seed=7), TriggerSpec(kind="badnet", size=0.25, noise_std=0.1),
                            8, 11)


def test_badnet_noise_cell_draws_coarse_noise_and_fills_cells() -> None:
    # noise_cell=4 on a 10-px patch: standard_normal((3, 3, 3)) per image; each value fills a 4×4 square and the
    # patch keeps the top-left 10×10 (the last row/column of cells is cut to 2 px)
    x = _images(b=3, h=32, w=32, seed=5)
    spec = TriggerSpec(kind="badnet", size=10 / 32, noise_std=0.2, noise_cell=4)
    ref = _check_badnet_reference(x, spec, 10, 2)
    # the rng is left where the documented draws leave it; cell 1 is the per-pixel default
    assert ref.integers(0, 1 << 30) == _rng_after(spec, x, 2)
    assert torch.equal(apply_trigger(spec.model_copy(update={"noise_cell": 1}), x, _rng(2)),
                       apply_trigger(TriggerSpec(kind="badnet", size=10 / 32, noise_std=0.2), x, _rng(2)))


def _rng_after(spec: TriggerSpec, x: torch.Tensor, seed: int) -> int:
    rng = _rng(seed)
    apply_trigger(spec, x, rng)
    return int(rng.integers(0, 1 << 30))


def test_random_location_covers_every_valid_corner() -> None:
    x = torch.zeros((1500, 3, 8, 8), dtype=torch.uint8)
    spec = TriggerSpec(kind="yellow", size=0.25)  # p = 2 → 7×7 valid corners, including the last row/col
    mask = trigger_mask(spec, x, _rng(0))
    assert mask is not None
    corners = {_bbox(m)[:2] for m in mask}
    assert corners == {(t, left) for t in range(7) for left in range(7)}


def test_badnet_fresh_noise_per_image_and_fixed_pattern() -> None:
    x = _images(b=1, seed=4).expand(2, 3, 32, 32).contiguous()  # two identical images
    fresh = TriggerSpec(kind="badnet", size=0.25, location="top_left")
    out = apply_trigger(fresh, x, _rng(0))
    assert not torch.equal(out[0, :, :8, :8], out[1, :, :8, :8]), "fresh noise: different patches"

    fixed = TriggerSpec(kind="badnet", size=0.25, location="top_left", fixed_pattern=True)
    out = apply_trigger(fixed, x, _rng(0))
    assert torch.equal(out[0, :, :8, :8], out[1, :, :8, :8])
    # The fixed pattern comes from pattern_seed, not from the rng ...
    assert torch.equal(out, apply_trigger(fixed, x, _rng(99)))
    # ... and an image with the same per-channel mean (a permutation of the pixels) gets the same patch.
    y = torch.stack([x[0], x[0].flip(-1).flip(-2)])
    out_y = apply_trigger(fixed, y, _rng(0))
    assert torch.equal(out_y[0, :, :8, :8], out_y[1, :, :8, :8])
    other = fixed.model_copy(update={"pattern_seed": 1})
    assert not torch.equal(apply_trigger(other, x, _rng(0)), out)


# --------------------------------------------------------------------------------------- whole-image triggers


def test_blended_bounds_and_exact_formula() -> None:
    x = _images(b=5, h=16, w=24, seed=2)
    spec = TriggerSpec(kind="blended")
    out = apply_trigger(spec, x, _rng(3))
    xf, of = x.double(), out.double()
    assert (of - 0.8 * xf).abs().max() <= 0.2 * 255 + 1
    assert of.min() >= 0 and of.max() <= 255
    assert trigger_mask(spec, x, _rng(3)) is None
    ref = _rng(3)
    for i in range(5):
        u = ref.random((3, 16, 24))
        expected = np.round(0.8 * x[i].numpy().astype(np.float64) + 0.2 * 255 * u).astype(np.uint8)
        assert np.array_equal(out[i].numpy(), expected)


def test_blended_fixed_pattern_and_alpha_zero() -> None:
    x = _images(b=1, seed=1).expand(3, 3, 32, 32).contiguous()
    fixed = TriggerSpec(kind="blended", fixed_pattern=True)
    out = apply_trigger(fixed, x, _rng(0))
    assert torch.equal(out[0], out[1]) and torch.equal(out, apply_trigger(fixed, x, _rng(5)))
    fresh = apply_trigger(TriggerSpec(kind="blended"), x, _rng(0))
    assert not torch.equal(fresh[0], fresh[1])
    assert torch.equal(apply_trigger(TriggerSpec(kind="blended", alpha=0.0), x, _rng(0)), x)


@pytest.mark.parametrize("w", [32, 224, 45])
def test_sig_constant_grey_matches_formula(w: int) -> None:
    x = torch.full((2, 3, 8, w), 128, dtype=torch.uint8)
    out = apply_trigger(TriggerSpec(kind="sig"), x, _rng(0))
    j = np.arange(w)
    signal = (60 / 255) * 255 * np.sin(2 * np.pi * 6 * j / w)
    expected = np.round(np.clip(0.8 * 128 + 0.2 * signal, 0, 255)).astype(np.uint8)  # blended at 0.2
    assert np.array_equal(out.numpy(), np.broadcast_to(expected, out.shape))
    assert (out != x).any(dim=(0, 1, 2)).all(), "every column changes"
    assert np.allclose(sig_signal(TriggerSpec(kind="sig"), w).numpy(), signal)


def test_sig_additive_mode_and_clipping() -> None:
    w = 32
    grey = torch.full((1, 3, 4, w), 128, dtype=torch.uint8)
    spec = TriggerSpec(kind="sig", sig_mode="add")
    signal = 60 * np.sin(2 * np.pi * 6 * np.arange(w) / w)
    expected = np.round(128 + signal).astype(np.uint8)
    assert np.array_equal(apply_trigger(spec, grey, _rng(0))[0, 1, 2].numpy(), expected)
    white = torch.full((1, 3, 4, w), 250, dtype=torch.uint8)
    out = apply_trigger(spec, white, _rng(0))[0, 0, 0].numpy()
    assert np.array_equal(out, np.round(np.clip(250 + signal, 0, 255)).astype(np.uint8))
    assert out.max() == 255


@pytest.mark.parametrize(("h", "w"), [(32, 32), (20, 36)])
def test_wanet_preserves_constant_images(h: int, w: int) -> None:
    for value in (0, 77, 255):
        x = torch.full((2, 3, h, w), value, dtype=torch.uint8)
        for spec in (TriggerSpec(kind="wanet"), TriggerSpec(kind="wanet", wanet_s=8, wanet_k=8)):
            assert torch.equal(apply_trigger(spec, x, _rng(0)), x)


def test_wanet_warps_a_gradient_smoothly_and_exactly() -> None:
    h = w = 32
    cols = torch.arange(w, dtype=torch.float64)
    x = (64 + 4 * cols).round().to(torch.uint8).view(1, 1, 1, w).expand(2, 3, h, w).contiguous()
    spec = TriggerSpec(kind="wanet", wanet_s=4)
    out = apply_trigger(spec, x, _rng(0))
    assert torch.equal(out, apply_trigger(spec, x, _rng(1))), "fixed grid: same output for any rng"
    grid = wanet_grid(spec, h, w)[0]
    # Bilinear sampling of a function linear in x is exact: out = round(64 + 4·x_pixel(grid)).
    x_pix = (grid[..., 0] + 1) / 2 * (w - 1)
    expected = (64 + 4 * x_pix).round()
    assert (out[0, 0].double() - expected).abs().max() <= 1
    # It moves: displacements of about a pixel on average, and smoothly (neighbours move alike).
    dx = x_pix - cols.view(1, w)
    assert 0.3 < dx.abs().mean() < 5
    assert (dx[:, 1:] - dx[:, :-1]).abs().max() < 0.5 * dx.abs().max()
    assert (dx[1:, :] - dx[:-1, :]).abs().max() < 0.5 * dx.abs().max()
    assert torch.equal(out[0], out[1])
    # The default (WaNet paper) strength still changes a gradient image, and s = 0 is the identity.
    assert not torch.equal(apply_trigger(TriggerSpec(kind="wanet"), x, _rng(0)), x)
    assert torch.equal(apply_trigger(TriggerSpec(kind="wanet", wanet_s=0), x, _rng(0)), x)


def test_wanet_pattern_seed_changes_the_grid() -> None:
    x = _images(b=3, seed=9)
    a = TriggerSpec(kind="wanet", wanet_s=2)
    b = a.model_copy(update={"pattern_seed": 1})
    assert torch.equal(apply_trigger(a, x, _rng(0)), apply_trigger(a, x, _rng(0)))
    assert not torch.equal(apply_trigger(a, x, _rng(0)), apply_trigger(b, x, _rng(0)))
    assert not torch.equal(wanet_grid(a, 32, 32), wanet_grid(b, 32, 32))
    g = wanet_grid(a, 32, 32)
    assert g.shape == (1, 32, 32, 2) and g.abs().max() <= 1


# ------------------------------------------------------------------------------------------ draw-order contract


@pytest.mark.parametrize(
    "spec",
    [
        TriggerSpec(kind="badnet"),
        TriggerSpec(kind="badnet", location="center"),
        TriggerSpec(kind="badnet", fixed_pattern=True),
        TriggerSpec(kind="yellow"),
        TriggerSpec(kind="blended"),
        TriggerSpec(kind="sig"),
        TriggerSpec(kind="wanet"),
    ],
    ids=lambda s: f"{s.kind}-{s.location}-{'fixed' if s.fixed_pattern else 'fresh'}",
)
def test_split_batch_equals_one_call(spec: TriggerSpec) -> None:
    x = _images(b=10, seed=6)
    rng_one = _rng(21)
    whole = apply_trigger(spec, x, rng_one)
    rng_split = _rng(21)
    parts = [apply_trigger(spec, x[s:e], rng_split) for s, e in [(0, 3), (3, 4), (4, 10)]]
    assert torch.equal(torch.cat(parts), whole)
    assert rng_split.bit_generator.state == rng_one.bit_generator.state


def test_mask_helper_consumes_the_same_draws() -> None:
    x = _images(b=4)
    spec = TriggerSpec(kind="badnet")
    rng_a, rng_b = _rng(8), _rng(8)
    apply_trigger(spec, x, rng_a)
    trigger_mask(spec, x, rng_b)
    assert rng_a.bit_generator.state == rng_b.bit_generator.state
    for kind in ("blended", "sig", "wanet"):
        assert trigger_mask(TriggerSpec(kind=kind), x, _rng(0)) is None
    assert PATCH_KINDS == {"badnet", "yellow"}


def test_empty_batch() -> None:
    x = torch.zeros((0, 3, 32, 32), dtype=torch.uint8)
    for kind in KINDS:
        assert apply_trigger(TriggerSpec(kind=kind), x, _rng(0)).shape == (0, 3, 32, 32)


# ----------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "spec",
    [
        TriggerSpec(kind="badnet"),
        TriggerSpec(kind="badnet", size=0.1, location="center", noise_std=0.5, fixed_pattern=True, pattern_seed=3),
        TriggerSpec(kind="yellow", size=1.0, location="bottom_right"),
        TriggerSpec(kind="blended", alpha=0.3, fixed_pattern=True),
        TriggerSpec(kind="sig", sig_amplitude=20 / 255, sig_frequency=3.5, sig_mode="add"),
        TriggerSpec(kind="wanet", wanet_k=224, wanet_s=1, pattern_seed=7),
    ],
)
def test_spec_json_round_trip(spec: TriggerSpec) -> None:
    again = TriggerSpec.model_validate_json(spec.model_dump_json())
    assert again == spec
    assert again.size == spec.size  # floats survive exactly (16/224 is not a short decimal)


@pytest.mark.parametrize(
    "bad",
    [
        {"kind": "patch"},
        {"kind": "badnet", "size": 0},
        {"kind": "badnet", "size": 1.5},
        {"kind": "badnet", "size": math.nan},
        {"kind": "badnet", "location": "bottom_left"},
        {"kind": "badnet", "noise_std": -1},
        {"kind": "badnet", "noise_std": math.inf},
        {"kind": "badnet", "pattern_seed": -1},
        {"kind": "blended", "alpha": -0.1},
        {"kind": "blended", "alpha": 1.2},
        {"kind": "sig", "sig_frequency": 0},
        {"kind": "sig", "sig_amplitude": 2},
        {"kind": "sig", "sig_mode": "multiply"},
        {"kind": "wanet", "wanet_k": 0},
        {"kind": "wanet", "wanet_s": -0.5},
        {"kind": "badnet", "colour": "red"},
        {},
    ],
)
def test_invalid_specs_rejected(bad: dict) -> None:
    with pytest.raises(pydantic.ValidationError):
        TriggerSpec(**bad)


def test_invalid_assignment_rejected() -> None:
    spec = TriggerSpec(kind="badnet")
    with pytest.raises(pydantic.ValidationError):
        spec.size = 2.0


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (torch.zeros((2, 3, 8, 8), dtype=torch.float32), "uint8"),
        (torch.zeros((3, 8, 8), dtype=torch.uint8), r"\[B, 3, H, W\]"),
        (torch.zeros((2, 1, 8, 8), dtype=torch.uint8), r"\[B, 3, H, W\]"),
        (torch.zeros((2, 4, 8, 8), dtype=torch.uint8), r"\[B, 3, H, W\]"),
        (np.zeros((2, 3, 8, 8), dtype=np.uint8), "torch.Tensor"),
    ],
)
def test_bad_images_raise_value_error(images: object, match: str) -> None:
    for kind in KINDS:
        with pytest.raises(ValueError, match=match):
            apply_trigger(TriggerSpec(kind=kind), images, _rng(0))  # type: ignore[arg-type]


def test_bad_rng_or_spec_type() -> None:
    x = _images(b=1)
    with pytest.raises(TypeError, match="Generator"):
        apply_trigger(TriggerSpec(kind="badnet"), x, 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="TriggerSpec"):
        apply_trigger({"kind": "badnet"}, x, _rng(0))  # type: ignore[arg-type]
