"""Tests for otcbench.models: registry, creation, checkpoints, preprocessing, fine-grained tokens."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from otcbench.errors import UserError
from otcbench.models import (
    CONFIG_DIR,
    bundled_model_names,
    checkpoint_model_name,
    create_model,
    encode_fine_grained,
    encode_image_tokens,
    encode_text_tokens,
    get_tokenizer,
    image_mean_std,
    image_size,
    list_model_names,
    load_checkpoint_file,
    model_summary,
    prepare_images,
    register_bundled_configs,
)

BUNDLED = ("otc-vit-tiny", "otc-vit-small", "otc-rn-tiny")
CAPTIONS = ["a photo of a dog", "two cats on a red mat", "x", "a very long caption " * 10]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # These tensors are tiny: intra-op threading only adds overhead, and when another process
    # holds a core, OpenMP barriers make 2-thread runs ~100x slower. Restored afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def vit() -> torch.nn.Module:
    return create_model("otc-vit-tiny")


@pytest.fixture(scope="module")
def rn() -> torch.nn.Module:
    return create_model("otc-rn-tiny")


def _texts(name: str) -> torch.Tensor:
    return get_tokenizer(name)(CAPTIONS)


def _images(model: torch.nn.Module, batch: int = 4) -> torch.Tensor:
    raw = torch.randint(0, 256, (batch, 3, 40, 40), dtype=torch.uint8)
    return prepare_images(model, raw)


# --------------------------------------------------------------------------------------------
# registry and creation
# --------------------------------------------------------------------------------------------


def test_bundled_configs_registered_and_listed() -> None:
    assert set(BUNDLED) <= set(bundled_model_names())
    names = list_model_names()
    assert set(BUNDLED) <= set(names)
    assert set(BUNDLED) <= set(open_clip.list_models())
    assert "ViT-B-32" in names and "RN50" in names
    for name in bundled_model_names():
        cfg = json.loads((CONFIG_DIR / f"{name}.json").read_text())
        assert open_clip.get_model_config(name) == cfg


def test_register_is_idempotent() -> None:
    paths = open_clip.factory._MODEL_CONFIG_PATHS
    before = len(paths)
    register_bundled_configs()
    register_bundled_configs()
    assert len(paths) == before


@pytest.mark.parametrize("name", BUNDLED)
def test_create_each_bundled_model(name: str) -> None:
    model = create_model(name)
    summary = model_summary(name)
    assert isinstance(model, open_clip.CLIP)
    assert image_size(model) == summary["image_size"]
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    assert summary["params_m"] == pytest.approx(n_params)
    assert summary["bundled"] is True


def test_model_summary_family_and_size() -> None:
    vit = model_summary("otc-vit-tiny")
    assert (vit["family"], vit["image_size"], vit["embed_dim"], vit["context_length"]) == (
        "vit",
        (32, 32),
        64,
        20,
    )
    rn = model_summary("otc-rn-tiny")
    assert rn["family"] == "resnet" and rn["image_size"] == (64, 64)
    assert model_summary("otc-vit-small")["image_size"] == (64, 64)
    big = model_summary("RN50")
    assert big["family"] == "resnet" and big["image_size"] == (224, 224) and big["bundled"] is False
    assert model_summary("ViT-B-32")["params_m"] == pytest.approx(151.28, abs=0.01)
    assert model_summary("ViT-B/32")["name"] == "ViT-B-32"  # open_clip's '/' spelling


def test_unknown_model_suggests_close_match() -> None:
    with pytest.raises(UserError, match="did you mean 'otc-vit-tiny'.*otcbench list models"):
        create_model("otc-vit-tiyn")
    with pytest.raises(UserError, match="otcbench list models"):
        model_summary("definitely-not-a-model")
    with pytest.raises(UserError, match="schema"):
        create_model("hf-hub:someone/model")


def test_bad_precision_and_device() -> None:
    with pytest.raises(UserError, match="precision"):
        create_model("otc-vit-tiny", precision="fp64")
    with pytest.raises(UserError, match="device"):
        create_model("otc-vit-tiny", device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            create_model("otc-vit-tiny", device="cuda")


def test_tokenizer_context_length() -> None:
    assert get_tokenizer("otc-vit-tiny")(["a dog"]).shape == (1, 20)
    assert get_tokenizer("otc-vit-small")(["a dog"]).shape == (1, 32)


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------


def _outputs(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=g)
    with torch.no_grad():
        return model.encode_image(prepare_images(model, images)), model.encode_text(_texts("otc-vit-tiny"))


def test_checkpoint_roundtrip_our_format(tmp_path: Path) -> None:
    model = create_model("otc-vit-tiny").eval()
    opt = torch.optim.AdamW(model.parameters())
    path = tmp_path / "last.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "model_name": "otc-vit-tiny",
            "epoch": 3,
            "optimizer": opt.state_dict(),
        },
        path,
    )
    assert checkpoint_model_name(path) == "otc-vit-tiny"
    assert load_checkpoint_file(path)["epoch"] == 3
    loaded = create_model("otc-vit-tiny", checkpoint=path).eval()
    for a, b in zip(_outputs(model), _outputs(loaded), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_checkpoint_openclip_and_bare_formats(tmp_path: Path) -> None:
    model = create_model("otc-vit-tiny").eval()
    ddp = {"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 1}
    torch.save(ddp, tmp_path / "oc.pt")
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    assert checkpoint_model_name(tmp_path / "bare.pt") is None
    for file in ("oc.pt", "bare.pt"):
        loaded = create_model("otc-vit-tiny", checkpoint=tmp_path / file).eval()
        torch.testing.assert_close(_outputs(model)[0], _outputs(loaded)[0], rtol=0, atol=0)


def test_checkpoint_from_other_architecture(tmp_path: Path, rn: torch.nn.Module) -> None:
    named = tmp_path / "rn.pt"
    torch.save({"model": rn.state_dict(), "model_name": "otc-rn-tiny"}, named)
    with pytest.raises(
        UserError, match="trained with model 'otc-rn-tiny', not 'otc-vit-tiny'; pass --model otc-rn-tiny"
    ):
        create_model("otc-vit-tiny", checkpoint=named)
    bare = tmp_path / "rn_bare.pt"
    torch.save(rn.state_dict(), bare)
    with pytest.raises(
        UserError, match=r"does not match model 'otc-vit-tiny': \d+ missing keys.*shape mismatch"
    ):
        create_model("otc-vit-tiny", checkpoint=bare)
    # same family, other sizes: only shape mismatches
    small = create_model("otc-vit-small")
    torch.save({"model": small.state_dict()}, tmp_path / "small.pt")
    with pytest.raises(UserError, match=r"\d+ shape mismatches \(e\.g\. "):
        create_model("otc-vit-tiny", checkpoint=tmp_path / "small.pt")


def test_missing_and_corrupted_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        create_model("otc-vit-tiny", checkpoint=tmp_path / "nope.pt")
    with pytest.raises(UserError, match="not a file"):
        load_checkpoint_file(tmp_path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(UserError, match="not a readable torch checkpoint"):
        create_model("otc-vit-tiny", checkpoint=garbage)
    good = tmp_path / "good.pt"
    torch.save({"model": create_model("otc-vit-tiny").state_dict(), "model_name": "otc-vit-tiny"}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated or corrupted"):
        checkpoint_model_name(truncated)
    not_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_dict)
    with pytest.raises(UserError, match="not a dict"):
        load_checkpoint_file(not_dict)
    no_weights = tmp_path / "meta.pt"
    torch.save({"epoch": 1}, no_weights)
    with pytest.raises(UserError, match="no model weights"):
        create_model("otc-vit-tiny", checkpoint=no_weights)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"model": {}, "path": Path("x")}, unsafe)
    with pytest.raises(UserError, match="cannot be loaded safely"):
        load_checkpoint_file(unsafe)


# --------------------------------------------------------------------------------------------
# image preprocessing
# --------------------------------------------------------------------------------------------


def test_prepare_images_constant_normalisation(vit: torch.nn.Module) -> None:
    mean, std = image_mean_std(vit)
    assert mean == pytest.approx(OPENAI_DATASET_MEAN) and std == pytest.approx(OPENAI_DATASET_STD)
    images = torch.full((2, 3, 32, 32), 200, dtype=torch.uint8)
    out = prepare_images(vit, images)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    for c in range(3):
        expected = (200 / 255 - mean[c]) / std[c]
        torch.testing.assert_close(out[:, c], torch.full_like(out[:, c], expected))
    # a constant image stays constant through the (antialiased) resize
    resized = prepare_images(vit, torch.full((1, 3, 57, 80), 200, dtype=torch.uint8))
    assert resized.shape == (1, 3, 32, 32)
    torch.testing.assert_close(resized, out[:1])


def test_prepare_images_float_and_resize(vit: torch.nn.Module, rn: torch.nn.Module) -> None:
    raw = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(prepare_images(vit, raw), prepare_images(vit, raw.float() / 255))
    # no resize when the size already matches: a per-pixel pattern survives exactly
    mean, std = image_mean_std(vit)
    manual = (raw.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(prepare_images(vit, raw), manual)
    # resize to each model's own size
    assert prepare_images(rn, raw).shape == (3, 3, 64, 64)
    big = torch.randint(0, 256, (2, 3, 128, 96), dtype=torch.uint8)
    expected = F.interpolate(big.float() / 255, size=(32, 32), mode="bilinear", antialias=True)
    expected = (expected - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(prepare_images(vit, big), expected)


def test_prepare_images_rejects_bad_input(vit: torch.nn.Module) -> None:
    with pytest.raises(UserError, match=r"\[B, 3, H, W\]"):
        prepare_images(vit, torch.zeros(3, 32, 32, dtype=torch.uint8))
    with pytest.raises(UserError, match=r"\[B, 3, H, W\]"):
        prepare_images(vit, torch.zeros(1, 32, 32, 3, dtype=torch.uint8))
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        prepare_images(vit, torch.full((1, 3, 32, 32), 255.0))
    with pytest.raises(UserError, match="dtype"):
        prepare_images(vit, torch.zeros(1, 3, 32, 32, dtype=torch.int64))


# --------------------------------------------------------------------------------------------
# fine-grained tokens
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "n_tokens"), [("otc-vit-tiny", 16), ("otc-rn-tiny", 4)])
def test_fine_grained_matches_global_encoders(name: str, n_tokens: int) -> None:
    model = create_model(name).eval()
    images, texts = _images(model), _texts(name)
    with torch.no_grad():
        fg = encode_fine_grained(model, images, texts)
        image_global, text_global = model.encode_image(images), model.encode_text(texts)
    torch.testing.assert_close(fg.image_global, image_global, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fg.text_global, text_global, rtol=1e-5, atol=1e-5)
    assert fg.image_tokens.shape == (4, n_tokens, 64)
    assert fg.text_tokens.shape == (4, 20, 64)
    assert fg.text_mask.dtype == torch.bool
    assert torch.equal(fg.text_mask, texts != 0)
    # the pooled text position is a token like the others (argmax pooling: end-of-text token)
    eot = texts.argmax(-1)
    torch.testing.assert_close(fg.text_tokens[torch.arange(4), eot], fg.text_global)
    # uint8 batches are prepared automatically
    with torch.no_grad():
        g, _ = encode_image_tokens(model, torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8))
    assert g.shape == (2, 64)


@pytest.mark.parametrize("name", ["otc-vit-tiny", "otc-rn-tiny"])
def test_gradients_flow_from_tokens(name: str) -> None:
    model = create_model(name).train()
    fg = encode_fine_grained(model, _images(model), _texts(name))
    (fg.image_tokens * torch.randn_like(fg.image_tokens)).sum().backward(retain_graph=True)
    assert model.visual.conv1.weight.grad is not None and model.visual.conv1.weight.grad.abs().sum() > 0
    assert model.token_embedding.weight.grad is None  # image tokens do not touch the text tower
    (fg.text_tokens * torch.randn_like(fg.text_tokens)).sum().backward()
    assert model.token_embedding.weight.grad.abs().sum() > 0
    assert model.text_projection.grad.abs().sum() > 0


def test_vit_tokens_recomputed_by_hand(vit: torch.nn.Module) -> None:
    vit.eval()
    images = _images(vit)
    v = vit.visual
    with torch.no_grad():
        global_, tokens = encode_image_tokens(vit, images)
        x = v.conv1(images).flatten(2).transpose(1, 2)  # [B, 16, width]
        cls = v.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding
        x = v.transformer(v.ln_pre(x))
        x = v.ln_post(x)
        expected_tokens = x[:, 1:] @ v.proj
        expected_global = x[:, 0] @ v.proj
    torch.testing.assert_close(tokens, expected_tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(global_, expected_global, rtol=1e-5, atol=1e-5)


def _tiny_vit_variant(**vision_overrides: object) -> open_clip.CLIP:
    cfg = copy.deepcopy(open_clip.get_model_config("otc-vit-tiny"))
    cfg["vision_cfg"].update(vision_overrides)
    return open_clip.CLIP(**cfg).eval()


def test_vit_avg_pool_global_is_token_mean() -> None:
    model = _tiny_vit_variant(pool_type="avg")
    images = _images(model)
    with torch.no_grad():
        global_, tokens = encode_image_tokens(model, images)
        torch.testing.assert_close(global_, model.encode_image(images), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(global_, tokens.mean(dim=1), rtol=1e-5, atol=1e-5)

    late_ln = _tiny_vit_variant(pool_type="avg", final_ln_after_pool=True)
    with torch.no_grad():
        global_, tokens = encode_image_tokens(late_ln, images)
        torch.testing.assert_close(global_, late_ln.encode_image(images), rtol=1e-5, atol=1e-5)
    assert tokens.shape == (4, 16, 64)


def test_unsupported_variants_raise_user_error() -> None:
    attn_pool = _tiny_vit_variant(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=4)
    with pytest.raises(UserError, match="attentional pooler"):
        encode_image_tokens(attn_pool, torch.zeros(1, 3, 32, 32))
    with pytest.raises(UserError, match="not supported for image tower"):
        encode_image_tokens(torch.nn.Linear(2, 2), torch.zeros(1, 3, 32, 32))


def test_resnet_tokens_are_maskclip_values(rn: torch.nn.Module) -> None:
    rn.eval()
    images = _images(rn)
    pool = rn.visual.attnpool
    captured: dict[str, torch.Tensor] = {}
    handle = rn.visual.layer4.register_forward_hook(lambda m, i, o: captured.__setitem__("grid", o))
    try:
        with torch.no_grad():
            global_, tokens = encode_image_tokens(rn, images)
    finally:
        handle.remove()
    grid = captured["grid"]  # [B, C, 2, 2]
    assert grid.shape[-2:] == (2, 2) and tokens.shape == (4, 4, 64)
    with torch.no_grad():
        feats = grid.flatten(2).transpose(1, 2) + pool.positional_embedding[1:]
        torch.testing.assert_close(tokens, pool.c_proj(pool.v_proj(feats)), rtol=1e-5, atol=1e-5)

        # With zero queries the attention is uniform, so the global must be the plain average of
        # the per-position values: the mean token's value and the spatial tokens.
        pool.q_proj.weight.zero_()
        pool.q_proj.bias.zero_()
        uniform_global, uniform_tokens = encode_image_tokens(rn, images)
        mean_token = pool.c_proj(pool.v_proj(grid.mean(dim=(2, 3)) + pool.positional_embedding[0]))
        expected = (mean_token + uniform_tokens.sum(dim=1)) / (uniform_tokens.shape[1] + 1)
    torch.testing.assert_close(uniform_global, expected, rtol=1e-4, atol=1e-5)


def test_text_mask_follows_end_of_text_not_zero_ids(vit: torch.nn.Module) -> None:
    # id 0 is a real vocabulary entry ('!'); the mask must end at the end-of-text token
    texts = torch.zeros(2, 20, dtype=torch.long)
    texts[0, :5] = torch.tensor([49406, 0, 320, 1929, 49407])
    texts[1, :3] = torch.tensor([49406, 320, 49407])
    with torch.no_grad():
        global_, tokens, mask = encode_text_tokens(vit, texts)
    assert mask[0].tolist() == [True] * 5 + [False] * 15
    assert mask[1].tolist() == [True] * 3 + [False] * 17
    assert tokens.shape == (2, 20, 64)


def test_text_input_validation(vit: torch.nn.Module) -> None:
    with pytest.raises(UserError, match="get_tokenizer"):
        encode_text_tokens(vit, ["a dog"])  # type: ignore[arg-type]
    with pytest.raises(UserError, match="context length is 20"):
        encode_text_tokens(vit, torch.zeros(2, 77, dtype=torch.long))


def test_custom_text_clip_supported() -> None:
    cfg = copy.deepcopy(open_clip.get_model_config("otc-vit-tiny"))
    model = open_clip.CustomTextCLIP(**cfg).eval()
    texts = _texts("otc-vit-tiny")
    with torch.no_grad():
        global_, tokens, mask = encode_text_tokens(model, texts)
        torch.testing.assert_close(global_, model.encode_text(texts), rtol=1e-5, atol=1e-5)
    assert tokens.shape == (4, 20, 64) and torch.equal(mask, texts != 0)


def test_works_under_autocast(vit: torch.nn.Module) -> None:
    vit.eval()
    images, texts = _images(vit), _texts("otc-vit-tiny")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fg = encode_fine_grained(vit, images, texts)
        image_global = vit.encode_image(images)
        text_global = vit.encode_text(texts)
    torch.testing.assert_close(fg.image_global, image_global)
    torch.testing.assert_close(fg.text_global, text_global)
    assert fg.image_tokens.dtype == image_global.dtype
    assert torch.isfinite(fg.image_tokens.float()).all() and torch.isfinite(fg.text_tokens.float()).all()
