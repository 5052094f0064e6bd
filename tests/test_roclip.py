"""Tests for the embedding pool and RoCLIP (otcbench.defenses.pool, otcbench.defenses.roclip)."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from run_helpers import interrupt_at, last_state, with_defense

from otcbench.config import TrainJob
from otcbench.defenses.pool import EmbeddingPool
from otcbench.defenses.roclip import RoCLIP, RoCLIPOptions
from otcbench.defenses.unimodal import matched_clip_loss
from otcbench.train.loop import Trainer

SMALL = {"pool_size": 96}  # the tiny world has 384 pairs: a pool of 1.5 batches


# --------------------------------------------------------------------------------------------------
# the pool


def test_pool_starts_random_unit_and_is_seeded() -> None:
    a, b = EmbeddingPool(8, 4, seed=1), EmbeddingPool(8, 4, seed=1)
    assert torch.equal(a.vectors, b.vectors) and not torch.equal(a.vectors, EmbeddingPool(8, 4, seed=2).vectors)
    assert torch.allclose(a.vectors.norm(dim=1), torch.ones(8))
    assert bool((a.rows == -1).all()) and a.filled == 0


def test_pool_is_fifo_with_wrap_around_and_detached() -> None:
    pool = EmbeddingPool(5, 3)
    x = torch.eye(3).repeat(3, 1)[:7].requires_grad_()  # 7 rows: wraps around
    pool.push(x[:3], torch.tensor([0, 1, 2]))
    pool.push(x[3:7], torch.tensor([3, 4, 5, 6]))
    assert pool.rows.tolist() == [5, 6, 2, 3, 4] and pool.ptr == 2 and pool.filled == 5
    assert not pool.vectors.requires_grad
    pool.push(torch.randn(12, 3), torch.arange(100, 112))  # larger than the pool: keeps the last 5
    assert sorted(pool.rows.tolist()) == list(range(107, 112))


def test_pool_nearest_by_cosine_and_state_round_trip() -> None:
    pool = EmbeddingPool(4, 2)
    pool.push(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]), torch.tensor([10, 11, 12, 13]))
    m = pool.nearest(torch.tensor([[5.0, 0.2], [-0.1, -3.0]]))  # unnormalised queries
    assert m.rows.tolist() == [10, 13] and m.slots.tolist() == [0, 3]
    assert torch.allclose(m.vectors, torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
    restored = EmbeddingPool.from_state(pool.state_dict())
    assert torch.equal(restored.vectors, pool.vectors) and torch.equal(restored.rows, pool.rows)
    assert (restored.ptr, restored.filled) == (pool.ptr, pool.filled)


# --------------------------------------------------------------------------------------------------
# the mechanism on hand-built embeddings


def test_each_image_is_paired_with_its_nearest_pool_caption() -> None:
    """Images lie next to *other* rows' captions: the match follows the embeddings, not the row ids."""
    torch.manual_seed(0)
    captions = F.normalize(torch.randn(6, 16), dim=1)
    pool = EmbeddingPool(8, 16, seed=3)
    pool.push(captions, torch.arange(6))
    partner = torch.tensor([3, 0, 5, 1, 2, 4])  # image i looks like caption partner[i]
    images = F.normalize(captions[partner] + 0.05 * torch.randn(6, 16), dim=1)
    match = pool.nearest(images)
    assert match.rows.tolist() == partner.tolist()
    # the loss is the symmetric CE over s * nn * I^T with diagonal targets
    s = torch.tensor(10.0)
    logits = s * match.vectors @ images.t()
    target = torch.arange(6)
    expected = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
    assert torch.allclose(matched_clip_loss(images, match.vectors, s), expected)
    # a poisoned caption far from its image is not what the image trains with
    assert float(matched_clip_loss(images, match.vectors, s)) < float(matched_clip_loss(images, captions, s))


def test_matching_epochs_follow_the_official_one_based_count() -> None:
    d = RoCLIP(RoCLIPOptions(match_every=2))
    assert [e for e in range(6) if d.is_matching_epoch(e)] == [1, 3, 5]
    d3 = RoCLIP(RoCLIPOptions(match_every=3))
    assert [e for e in range(7) if d3.is_matching_epoch(e)] == [2, 5]
    warm = RoCLIP(RoCLIPOptions(match_every=2, warmup_epochs=4))
    assert [e for e in range(8) if warm.is_matching_epoch(e)] == [5, 7]


# --------------------------------------------------------------------------------------------------
# batch loss with a real (tiny) model


def _text_grad_norm(model: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for n, p in model.named_parameters()
               if not n.startswith("visual") and n != "logit_scale" and p.grad is not None)


def _image_grad_norm(model: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for n, p in model.named_parameters()
               if n.startswith("visual") and p.grad is not None)


@pytest.mark.slow
@pytest.mark.parametrize("reencode", [False, True])
def test_text_tower_gets_no_gradient_in_matching_epochs(
    tmp_path: Path, make_job: Callable[..., TrainJob], reencode: bool
) -> None:
    job = with_defense(make_job(), "roclip", **SMALL, reencode_matched=reencode)
    trainer = Trainer(job, tmp_path / "run", show_progress=False)
    d = trainer.defense
    d.on_train_start(trainer)
    # pre-fill the pool with real captions so that matches are real rows
    with torch.no_grad():
        d._pool(trainer.model.text_projection.shape[1], trainer.device).push(
            trainer.model.encode_text(d.text_tokens[:96], normalize=True), torch.arange(96))
    for epoch, matching in ((0, False), (1, True)):
        d.on_epoch_start(trainer, epoch)
        trainer.model.zero_grad(set_to_none=True)
        loss, extras = d.batch_loss(trainer, trainer.make_batch(torch.arange(96, 160)))
        loss.backward()
        assert extras["matching"] == float(matching)
        assert _image_grad_norm(trainer.model) > 0
        if matching and not reencode:
            assert _text_grad_norm(trainer.model) == 0.0  # the official code's behaviour (0 x own pairs)
            assert extras["matched_random"] == 0.0 and extras["matched_own"] == 0.0
        else:
            assert _text_grad_norm(trainer.model) > 0
    # after the matching batch, its captions are in the pool (FIFO), after the lookup
    assert sorted(d.pool.rows[:64].tolist()) == list(range(96, 160))


@pytest.mark.slow
def test_eda_captions_are_computed_once_and_used(tmp_path: Path, make_job: Callable[..., TrainJob]) -> None:
    trainer = Trainer(with_defense(make_job(), "roclip", **SMALL), tmp_path / "run", show_progress=False)
    d = trainer.defense
    d.on_train_start(trainer)
    assert d.text_tokens.shape == trainer.data.tokens.shape
    changed = (d.text_tokens != trainer.data.tokens).any(1).float().mean()
    assert 0.5 < float(changed) <= 1.0  # most EDA variants differ from the caption
    before = d.text_tokens.clone()
    d.on_epoch_start(trainer, 1)
    assert torch.equal(d.text_tokens, before)
    fresh = RoCLIP(RoCLIPOptions(eda_once=False, **SMALL))
    fresh.on_train_start(trainer)
    fresh.on_epoch_start(trainer, 0)
    e0 = fresh.text_tokens.clone()
    fresh.on_epoch_start(trainer, 1)
    assert not torch.equal(e0, fresh.text_tokens)


# --------------------------------------------------------------------------------------------------
# end to end: two tiny epochs (one plain, one matching) and an exact resume


@pytest.fixture(scope="module")
def roclip_run(tmp_path_factory: pytest.TempPathFactory, make_job: Callable[..., TrainJob]) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("roclip") / "run"
    Trainer(with_defense(make_job(checkpoint_every_steps=1), "roclip", **SMALL), out, show_progress=False).fit()
    yield out
    shutil.rmtree(out, ignore_errors=True)


@pytest.mark.slow
def test_roclip_trains_end_to_end(roclip_run: Path, trained_run: Path) -> None:
    import json

    log = [json.loads(x) for x in (roclip_run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if r["type"] == "step"]
    assert [r["matching"] for r in steps] == [0.0] * 6 + [1.0] * 6
    # the first matching batch sees only the random initial pool (the official quirk), later ones real captions
    assert steps[6]["matched_random"] == 1.0 and steps[-1]["matched_random"] == 0.0
    # one match line per matching epoch: images matched to a random initial entry count as not re-assigned
    (match,) = [r for r in log if r["type"] == "roclip_match"]
    assert match["epoch"] == 1 and 0.0 < match["matched_random"] < 1.0
    assert match["match_n"] > 0 and 0.0 <= match["match_precision"] <= 1.0
    assert 1 <= match["match_largest_group"] <= match["match_n"]
    state = last_state(roclip_run)
    assert state["defense"]["pool"]["filled"] == 96 and state["epoch"] == 2
    base = last_state(trained_run)["model"]
    assert any(not torch.equal(v, base[k]) for k, v in state["model"].items())  # not plain CLIP


@pytest.mark.slow
def test_roclip_resumes_exactly(
    roclip_run: Path, tmp_path: Path, make_job: Callable[..., TrainJob]
) -> None:
    job = with_defense(make_job(checkpoint_every_steps=1), "roclip", **SMALL)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        Trainer(job, run, show_progress=False, on_step=interrupt_at(9)).fit()  # inside the matching epoch
    Trainer(job, run, resume=True, show_progress=False).fit()
    a, b = last_state(run), last_state(roclip_run)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["defense"]["pool"]["vectors"], b["defense"]["pool"]["vectors"])


# --------------------------------------------------------------------------------------------------
# the data-side step alone (otcbench defend)


@pytest.mark.slow
def test_data_step_matches_every_image_to_its_nearest_caption(
    trained_run: Path, tiny_world: Path, tmp_path: Path
) -> None:
    from otcbench.defenses.defend import run_defend
    from otcbench.defenses.embed import embed_captions, embed_images

    run_defend(tiny_world, tmp_path / "defended", defense="roclip", checkpoint=trained_run,
               options={"pool_size": 1000}, device="cpu", show_progress=False)
    import pandas as pd

    scores = pd.read_parquet(tmp_path / "defended" / "pair_scores.parquet")
    assert len(scores) == 384 and "score_cosine" in scores
    # the same step with the trainer as context: the assigned caption is the arg-max over all captions
    trainer = Trainer(TrainJob.model_validate({"data": str(tiny_world), "model": {
        "name": "otc-rn-nano", "init": str(trained_run / "checkpoints" / "last.pt")},
        "train": {"device": "cpu", "threads": 1}, "defense": {"name": "roclip"}}), tmp_path / "run",
        show_progress=False)
    res = trainer.defense.data_step(trainer)
    sims = embed_images(trainer) @ embed_captions(trainer).t()
    assert torch.equal(res.caption_index, sims.argmax(1))
    assert torch.equal(res.flagged, res.caption_index != torch.arange(384))
    assert scores["caption_row"].tolist() == res.caption_index.tolist()
    assert scores["flagged"].tolist() == res.flagged.tolist()


@pytest.mark.slow
def test_pool_update_always_fills_the_pool_in_plain_epochs(tmp_path: Path, make_job: Callable[..., TrainJob]) -> None:
    for update, filled in (("matching", 0), ("always", 64)):
        trainer = Trainer(with_defense(make_job(), "roclip", **SMALL, pool_update=update), tmp_path / update,
                          show_progress=False)
        d = trainer.defense
        d.on_train_start(trainer)
        d.on_epoch_start(trainer, 0)
        with torch.no_grad():
            d.batch_loss(trainer, trainer.make_batch(torch.arange(64)))
        assert (d.pool.filled if d.pool is not None else 0) == filled


# --------------------------------------------------------------------------------------------------
# hub statistics, the later matching rule, the augmentation-matched reference


@pytest.mark.slow
def test_match_log_counts_hub_captions_on_a_hand_built_pool(tmp_path: Path, make_job: Callable[..., TrainJob]) -> None:
    """Twelve images, a pool of four captions; nine images lie next to caption row 2 (a hub), three next to
    row 7: the epoch's match line has 2 distinct captions, a largest group of 9, and the class precision
    is the share of re-assigned images whose matched caption's row has the image's label."""
    trainer = Trainer(with_defense(make_job(), "roclip", **SMALL), tmp_path / "run", show_progress=False)
    d = trainer.defense
    d.on_train_start(trainer)
    torch.manual_seed(0)
    caps = F.normalize(torch.randn(4, 16), dim=1)
    pool = EmbeddingPool(8, 16, seed=1)
    pool.push(caps, torch.tensor([2, 7, 11, 13]))
    near = torch.tensor([0] * 9 + [1] * 3)  # pool slot each image is close to
    images = F.normalize(caps[near] + 0.01 * torch.randn(12, 16), dim=1)
    image_rows = torch.arange(100, 112)
    d._record_matches(trainer, image_rows, pool.nearest(images).rows)
    logged: list[dict] = []
    trainer.log = logged.append
    d.on_epoch_end(trainer, 1)
    (rec,) = logged
    assert rec["type"] == "roclip_match" and rec["match_n"] == 12
    assert rec["match_distinct"] == 2 and rec["match_largest_group"] == 9
    labels = torch.as_tensor(trainer.data.labels)
    same = [int(labels[r] == labels[c]) for r, c in zip(image_rows.tolist(), [2] * 9 + [7] * 3, strict=True)]
    assert rec["match_class_precision"] == pytest.approx(sum(same) / 12)


def test_own_query_rule_matches_by_the_own_caption_and_image() -> None:
    """match_query="own": the image trains with the pool caption nearest its *caption*, the caption with the pool
    image nearest its *image*; both towers get gradient."""
    torch.manual_seed(0)
    d = RoCLIP(RoCLIPOptions(pool_size=8, match_query="own"))
    trainer = SimpleNamespace(device=torch.device("cpu"), data=[None] * 20)
    txt_pool, img_pool = F.normalize(torch.randn(4, 16), dim=1), F.normalize(torch.randn(4, 16), dim=1)
    d.pool = EmbeddingPool(8, 16, seed=1)
    d.pool.push(txt_pool, torch.tensor([10, 11, 12, 13]))
    d.image_pool = EmbeddingPool(8, 16, seed=2)
    d.image_pool.push(img_pool, torch.tensor([10, 11, 12, 13]))
    txt = F.normalize(txt_pool[[3, 1, 0]] + 0.05 * torch.randn(3, 16), dim=1).requires_grad_()
    img = F.normalize(torch.randn(3, 16), dim=1).requires_grad_()  # images unrelated to the caption pool
    s = torch.tensor(10.0)
    bank = d.image_pool.vectors.clone()  # 4 pushed images and 4 random initial entries
    nn_i = bank[(img.detach() @ bank.t()).argmax(1)]
    loss, extras = d._own_query_loss(trainer, img, txt, torch.tensor([0, 1, 2]), s)
    target = torch.arange(3)
    expected = 0.5 * (F.cross_entropy(s * img @ txt_pool[[3, 1, 0]].t(), target)
                      + F.cross_entropy(s * txt @ nn_i.t(), target))
    assert torch.allclose(loss, expected)
    assert d.matched[:3].tolist() == [13, 11, 10]  # the caption rows the images trained with
    loss.backward()
    assert float(img.grad.abs().sum()) > 0 and float(txt.grad.abs().sum()) > 0
    assert sorted(d.pool.rows[4:7].tolist()) == [0, 1, 2] and sorted(d.image_pool.rows[4:7].tolist()) == [0, 1, 2]
    assert extras["matching"] == 1.0 and extras["matched_own"] == 0.0


@pytest.mark.slow
def test_augmented_reference_is_roclip_without_its_matching(tmp_path: Path, make_job: Callable[..., TrainJob]) -> None:
    """none+aug trains bit for bit as roclip's plain epochs (same augmentation and EDA captions), and differs
    from plain CLIP."""
    job = make_job(epochs=1)
    runs = {}
    for name, opts in (("none+aug", {}), ("roclip", {"warmup_epochs": 99}), ("none", {})):
        out = tmp_path / name
        Trainer(with_defense(job, name, **opts), out, show_progress=False).fit()
        runs[name] = last_state(out)["model"]
    assert all(torch.equal(runs["none+aug"][k], runs["roclip"][k]) for k in runs["roclip"])
    assert any(not torch.equal(runs["none+aug"][k], runs["none"][k]) for k in runs["none"])
