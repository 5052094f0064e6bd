"""Tests for the batched image augmentation (otcbench.data.augment): shapes, ranges, determinism, each op."""

from __future__ import annotations

import pytest
import torch

from otcbench.config import validate
from otcbench.data.augment import (
    PUBLISHED,
    SMALL,
    SMALL_SIDE,
    ImageAugOptions,
    _blur,
    _crop_boxes,
    _hsv_to_rgb,
    _jitter_op,
    _rgb_to_hsv,
    augment_images,
    autoaugment_images,
)
from otcbench.errors import UserError

OFF = dict(flip_p=0.0, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)


def images(b: int = 16, side: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, side, side), generator=g, dtype=torch.uint8)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_shape_dtype_range_and_change() -> None:
    x = images()
    y = augment_images(x, gen(0))
    assert y.dtype == torch.uint8 and y.shape == x.shape and y.device == x.device
    assert not torch.equal(x, y)
    assert augment_images(x[:0], gen(0)).shape == (0, 3, 32, 32)


def test_deterministic_for_a_seeded_generator_and_the_global_rng() -> None:
    x = images()
    assert torch.equal(augment_images(x, gen(3)), augment_images(x, gen(3)))
    assert not torch.equal(augment_images(x, gen(3)), augment_images(x, gen(4)))
    torch.manual_seed(11)
    a = augment_images(x)
    torch.manual_seed(11)
    assert torch.equal(a, augment_images(x))


def test_everything_off_is_the_identity() -> None:
    x = images()
    assert torch.equal(augment_images(x, gen(0), ImageAugOptions(**OFF)), x)


def test_flip_only_flips() -> None:
    x = images()
    y = augment_images(x, gen(0), ImageAugOptions(**{**OFF, "flip_p": 1.0}))
    assert torch.equal(y, x.flip(-1))


def test_grayscale_only_gives_equal_channels() -> None:
    y = augment_images(images(), gen(0), ImageAugOptions(**{**OFF, "grayscale_p": 1.0}))
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 1], y[:, 2])


@pytest.mark.parametrize("side", [32, 48, 64])
def test_crop_boxes_fit_the_image_and_the_scale(side: int) -> None:
    boxes = _crop_boxes(500, side, side, (0.5, 1.0), (3 / 4, 4 / 3), gen(1), torch.device("cpu"))
    top, left, h, w = boxes.unbind(-1)
    assert bool((top >= 0).all() and (left >= 0).all() and (top + h <= side).all() and (left + w <= side).all())
    area = h * w / side**2
    assert float(area.min()) >= 0.45 and float(area.max()) <= 1.0  # rounding to whole pixels
    assert len(set(boxes[:, 2].tolist())) > 3  # really random


def test_resized_crop_matches_a_bilinear_resize_of_the_box() -> None:
    x = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4).repeat(1, 3, 1, 1) / 16
    from otcbench.data.augment import _resized_crop

    # a box covering the whole image is the identity
    assert torch.allclose(_resized_crop(x, torch.tensor([[0.0, 0.0, 4.0, 4.0]])), x, atol=1e-6)
    # the left half stretched to full width: bilinear resize of the two columns (pixel centres at 0.25, 0.75)
    y = _resized_crop(x, torch.tensor([[0.0, 0.0, 4.0, 2.0]]))
    assert torch.allclose(y[..., 0], x[..., 0], atol=1e-6)
    assert torch.allclose(y[..., 1], 0.75 * x[..., 0] + 0.25 * x[..., 1], atol=1e-6)
    assert torch.allclose(y[..., 2], 0.25 * x[..., 0] + 0.75 * x[..., 1], atol=1e-6)


def test_hsv_round_trip_and_hue_zero_is_identity() -> None:
    x = images(8).float() / 255
    assert torch.allclose(_hsv_to_rgb(_rgb_to_hsv(x)), x, atol=1e-5)
    assert torch.allclose(_jitter_op(x, 3, torch.zeros(8)), x, atol=1e-5)
    # a hue shift of a whole turn is the identity too; half a turn of pure red is cyan
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    assert torch.allclose(_jitter_op(red, 3, torch.tensor([0.5])), torch.tensor([0.0, 1.0, 1.0]).view(1, 3, 1, 1),
                          atol=1e-5)


def test_brightness_contrast_saturation_ops() -> None:
    x = images(4).float() / 255
    assert torch.allclose(_jitter_op(x, 0, torch.full((4,), 0.5)), x * 0.5)
    flat = _jitter_op(x, 1, torch.zeros(4))  # contrast 0: the image's mean grey everywhere
    assert torch.allclose(flat, flat[:, :, :1, :1].expand_as(flat))
    grey = _jitter_op(x, 2, torch.zeros(4))  # saturation 0: grayscale
    assert torch.allclose(grey[:, 0], grey[:, 1]) and torch.allclose(grey[:, 1], grey[:, 2])


def test_blur_keeps_constants_and_smooths_noise() -> None:
    o = ImageAugOptions(blur_p=1.0, blur_sigma=(10.0, 10.0))
    const = torch.full((2, 3, 32, 32), 0.4)
    assert torch.allclose(_blur(const, o, gen(0), torch.device("cpu")), const, atol=1e-6)
    noise = images(2).float() / 255
    assert float(_blur(noise, o, gen(0), torch.device("cpu")).std()) < 0.7 * float(noise.std())


def test_bad_input_and_options() -> None:
    with pytest.raises(ValueError, match="uint8"):
        augment_images(torch.rand(2, 3, 8, 8))
    with pytest.raises(UserError, match="flip_p"):
        validate(ImageAugOptions, {"flip_p": 2}, where="aug")
    with pytest.raises(UserError, match="unknown key"):
        validate(ImageAugOptions, {"flop": 1}, where="aug")


def _values(o: ImageAugOptions) -> dict:
    return {k: getattr(o, k) for k in PUBLISHED}


def test_published_preset_is_the_official_pipeline() -> None:
    assert PUBLISHED == {"flip_p": 0.5, "crop_scale": (0.08, 1.0), "crop_ratio": (3 / 4, 4 / 3), "jitter_p": 0.8,
                         "brightness": 0.5, "contrast": 0.5, "saturation": 0.5, "hue": 0.1, "grayscale_p": 0.2,
                         "blur_p": 1.0, "blur_sigma": (0.1, 2.0), "blur_kernel": 21}


@pytest.mark.parametrize(("side", "preset"), [(32, "small"), (SMALL_SIDE, "small"), (SMALL_SIDE + 1, "published"),
                                              (224, "published")])
def test_auto_preset_follows_the_image_side(side: int, preset: str) -> None:
    o = ImageAugOptions().resolve(side)
    assert o.preset == preset and _values(o) == {"small": SMALL, "published": PUBLISHED}[preset]


def test_small_preset_keeps_every_step_only_milder() -> None:
    # the mechanism stays the published one: every step still happens, none is stronger than published
    for k in ("flip_p", "jitter_p", "brightness", "contrast", "saturation", "hue", "grayscale_p", "blur_p"):
        assert 0 < SMALL[k] <= PUBLISHED[k], k
    assert PUBLISHED["crop_scale"][0] <= SMALL["crop_scale"][0] < SMALL["crop_scale"][1] == 1.0
    assert SMALL["crop_ratio"] == PUBLISHED["crop_ratio"] and SMALL["blur_kernel"] == PUBLISHED["blur_kernel"]


def test_explicit_options_and_a_forced_preset_win_over_the_rule() -> None:
    o = ImageAugOptions(grayscale_p=0.3, crop_scale=(0.5, 1.0)).resolve(32)
    assert o.grayscale_p == 0.3 and o.crop_scale == (0.5, 1.0) and o.hue == SMALL["hue"]
    assert _values(ImageAugOptions(preset="published").resolve(32)) == PUBLISHED
    assert _values(ImageAugOptions(preset="small").resolve(224)) == SMALL
    assert validate(ImageAugOptions, {"preset": "published", "hue": 0.05}, where="aug").resolve(32).hue == 0.05


def test_augment_images_applies_the_side_rule() -> None:
    # the default options at 32 px are exactly the small preset; at 96 px exactly the published one
    for side, values in ((32, SMALL), (96, PUBLISHED)):
        x = images(8, side)
        assert torch.equal(augment_images(x, gen(2)), augment_images(x, gen(2), ImageAugOptions(**values)))
    x = images(8)
    assert not torch.equal(augment_images(x, gen(2)), augment_images(x, gen(2), ImageAugOptions(preset="published")))


def test_jitter_and_blur_ops_match_torchvision() -> None:
    import torchvision.transforms.functional as TF

    x = images(4).float() / 255
    f = torch.tensor([0.6, 0.9, 1.2, 1.5])
    for op, fn in ((0, TF.adjust_brightness), (1, TF.adjust_contrast), (2, TF.adjust_saturation)):
        ref = torch.stack([fn(x[i], float(f[i])) for i in range(4)])
        assert torch.allclose(_jitter_op(x.clone(), op, f), ref, atol=1e-4), op
    h = torch.tensor([-0.1, -0.05, 0.05, 0.1])
    ref = torch.stack([TF.adjust_hue(x[i], float(h[i])) for i in range(4)])
    assert torch.allclose(_jitter_op(x.clone(), 3, h), ref, atol=1e-4)
    big = torch.rand(2, 3, 224, 224, generator=gen(0))
    o = ImageAugOptions(blur_sigma=(2.0, 2.0), blur_p=1.0)
    assert torch.allclose(_blur(big, o, gen(0), torch.device("cpu")), TF.gaussian_blur(big, [21, 21], [2.0, 2.0]),
                          atol=1e-5)


def test_autoaugment_is_deterministic_and_leaves_the_global_rng_alone() -> None:
    x = images(12)
    a = autoaugment_images(x, gen(5))
    assert a.dtype == torch.uint8 and a.shape == x.shape
    assert torch.equal(a, autoaugment_images(x, gen(5)))
    assert not torch.equal(a, autoaugment_images(x, gen(6)))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    autoaugment_images(x, gen(5))
    assert torch.equal(torch.rand(3), expected)
    torch.manual_seed(2)
    b = autoaugment_images(x)
    torch.manual_seed(2)
    assert torch.equal(b, autoaugment_images(x))
