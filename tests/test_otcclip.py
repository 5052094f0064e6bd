"""Tests for the otcclip defense: matching mechanism on hand-built features, losses against their formulas,
sharding, the caption pool, exact resume with matching, options.

Feature-level tests substitute the model's feature extractors (``otcclip.features.image_features`` /
``text_features``) with lookup tables, so the expected assignment is known by construction.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from run_helpers import interrupt_at

from otcbench import ot
from otcbench.config import DefenseConfig, SynthConfig, TrainJob
from otcbench.data.synth import write_world
from otcbench.defenses import DEFENSES
from otcbench.defenses import otcclip as oc
from otcbench.defenses.otcclip import features as oc_features
from otcbench.defenses.otcclip import losses as oc_losses
from otcbench.errors import UserError
from otcbench.models import encode_image_tokens, encode_text_tokens
from otcbench.train.data import TrainData
from otcbench.train.loop import Trainer, epoch_order

D = 8  # feature dimension of the hand-built worlds
SOT = 7  # the start-of-text token's (constant) embedding direction


def e(*dims: int, w: list[float] | None = None) -> torch.Tensor:
    """A vector with ones (or weights ``w``) at ``dims``."""
    v = torch.zeros(D)
    for i, d in enumerate(dims):
        v[d] += 1.0 if w is None else w[i]
    return v


# --------------------------------------------------------------------------------------------------
# a hand-built world: images and captions are keys into feature tables


@dataclass
class FakeWorld:
    """Image key → (global, tokens); caption key → (global, tokens incl. SOT, mask)."""

    images: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    captions: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def image(self, key: int, glob: torch.Tensor, tokens: list[torch.Tensor]) -> None:
        self.images[key] = (glob, torch.stack(tokens))

    def caption(self, key: int, glob: torch.Tensor, tokens: list[torch.Tensor], m: int = 4) -> None:
        toks = torch.zeros(m, D)
        mask = torch.zeros(m, dtype=torch.bool)
        for i, t in enumerate([e(SOT), *tokens]):
            toks[i], mask[i] = t, True
        self.captions[key] = (glob, toks, mask)

    def image_features(self, model: Any, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys = images[:, 0, 0, 0].long().tolist()
        return (torch.stack([self.images[k][0] for k in keys]), torch.stack([self.images[k][1] for k in keys]))

    def text_features(self, model: Any, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        keys = tokens[:, 1].tolist()
        return tuple(torch.stack([self.captions[k][i] for k in keys]) for i in range(3))


def train_data(image_keys: list[int], caption_keys: list[int], poison: list[str] | None = None) -> TrainData:
    n = len(image_keys)
    images = torch.zeros(n, 3, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.tensor(image_keys, dtype=torch.uint8)
    tokens = torch.tensor([[49406, k, 49407, 0] for k in caption_keys])
    return TrainData(images, tokens, torch.zeros(n, dtype=torch.long), poison or [""] * n,
                     [f"caption {k}" for k in caption_keys])


@dataclass
class Ctx:
    """A minimal DataContext."""

    data: TrainData
    model: torch.nn.Module = field(default_factory=lambda: torch.nn.Linear(1, 1))
    device: torch.device = torch.device("cpu")
    caption_index: torch.Tensor | None = None
    cfg: Any = None

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @property
    def embed_batch_size(self) -> int:
        return 2  # several chunks even on tiny data


def defense(name: str = "otcclip+filter", **options: Any) -> oc.OTCCLIP:
    """The defense with ``options``; without the pair filter unless asked (the matching tests test the matching).

    ``otcclip+filter`` by default: the own caption competes, the rule most mechanism tests were written for."""
    options.setdefault("filter_fraction", 0.0)
    return DEFENSES.get(name)(DEFENSES.options(name, options))


@pytest.fixture
def use_world(monkeypatch: pytest.MonkeyPatch) -> Callable[[FakeWorld], None]:
    def install(world: FakeWorld) -> None:
        monkeypatch.setattr(oc_features, "image_features", world.image_features)
        monkeypatch.setattr(oc_features, "text_features", world.text_features)

    return install


def identity_world() -> tuple[FakeWorld, TrainData]:
    """Three classes; image c has 4 tokens e_c, caption c has tokens e_c e_c. Rows 0 and 1 have swapped captions."""
    w = FakeWorld()
    for c in range(3):
        w.image(c, e(c), [e(c)] * 4)
        w.caption(c, e(c), [e(c), e(c)])
    data = train_data([0, 1, 2, 0, 1, 2], [1, 0, 2, 0, 1, 2], ["badnet", "badnet", "", "", "", ""])
    return w, data


# --------------------------------------------------------------------------------------------------
# ranking


def test_rank_candidates_own_caption_wins_ties_and_margin() -> None:
    cos = torch.tensor([[0.5, 0.5, 0.2], [0.1, 0.9, 0.3], [0.8, 0.2, 0.1]])
    choice, s = oc.rank_candidates(cos, None, alpha=1.0)
    assert choice.tolist() == [0, 1, 0]  # a tie keeps the own caption (column 0); the own best stays
    assert torch.equal(s, cos)
    choice, _ = oc.rank_candidates(cos, None, alpha=1.0, margin=0.85)
    assert choice.tolist() == [0, 0, 0]  # 0.9 - 0.1 = 0.8 does not beat the margin


def test_rank_candidates_mixes_global_and_ot() -> None:
    cos = torch.tensor([[0.0, 1.0, 0.6]])
    ot_sim = torch.tensor([[0.0, 0.0, 1.0]])
    choice, s = oc.rank_candidates(cos, ot_sim, alpha=0.5)
    assert choice.tolist() == [2]
    assert torch.allclose(s, torch.tensor([[0.0, 0.5, 0.8]]))
    assert oc.rank_candidates(cos, ot_sim, alpha=1.0)[0].tolist() == [1]  # alpha 1 = global only


def test_cap_caption_uses_keeps_the_best_scoring_images() -> None:
    # images 0-3 all chose caption 9 (scores .5 .9 .7 .9), image 4 chose caption 8, 5-9 keep their own
    assigned = torch.tensor([9, 9, 9, 9, 8, 5, 6, 7, 8, 9])
    score = torch.tensor([0.5, 0.9, 0.7, 0.9, 0.3, 0, 0, 0, 0, 0])
    assert oc.cap_caption_uses(assigned, score, 1).tolist() == [0, 9, 2, 3, 8, 5, 6, 7, 8, 9]  # tie: lower row
    assert oc.cap_caption_uses(assigned, score, 2).tolist() == [0, 9, 2, 9, 8, 5, 6, 7, 8, 9]
    assert oc.cap_caption_uses(assigned, score, 4).tolist() == assigned.tolist()
    assert oc.cap_caption_uses(torch.arange(4), torch.zeros(4), 1).tolist() == [0, 1, 2, 3]


# --------------------------------------------------------------------------------------------------
# matching on hand-built features


CACHE = pytest.mark.parametrize("cache_mb", [1024, 0], ids=["token-cache", "re-encode"])


@CACHE
def test_swapped_captions_are_reassigned_and_own_captions_kept(
    use_world: Callable[[FakeWorld], None], cache_mb: int
) -> None:
    world, data = identity_world()
    use_world(world)
    res = defense(top_k=3, token_cache_mb=cache_mb).data_step(Ctx(data), None)
    keys = data.tokens[:, 1]
    image_class = torch.tensor([0, 1, 2, 0, 1, 2])
    assert torch.equal(keys[res.caption_index], image_class)  # every image ends with a caption of its class
    assert res.caption_index[2:].tolist() == [2, 3, 4, 5]  # rows whose own caption is best keep it
    assert res.flagged.tolist() == [True, True, False, False, False, False]
    # own-pair scores: matching pairs have cos 1 and d_OT 0 (every token identical), swapped ones 0 and 1
    assert res.scores["global"].tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert torch.allclose(res.scores["ot"], torch.tensor([0.0, 0.0, 1, 1, 1, 1]), atol=1e-5)
    assert torch.allclose(res.scores["match"], torch.tensor([0.0, 0.0, 1, 1, 1, 1]), atol=1e-5)
    # gap = own score - best candidate's: -1 for the swapped rows, 0 where the own caption is (one of) the best
    assert torch.allclose(res.scores["gap"], torch.tensor([-1.0, -1.0, 0, 0, 0, 0]), atol=1e-5)
    s = res.summary
    assert (s["repaired_n"], s["poison_repaired"], s["clean_repaired"], s["image_tokens"]) == (2, 1.0, 0.0, 4)
    assert s["token_cache"] is (cache_mb > 0)
    assert s["detect_auroc_ot"] == 1.0 and s["detect_auroc_global"] == 1.0


def test_a_caption_replaces_at_most_max_uses_captions(use_world: Callable[[FakeWorld], None]) -> None:
    world, _ = identity_world()
    use_world(world)
    # images 0 and 1 (class 0) both want caption 0, which only row 2 has; row 2 (class 1) wants a caption 1
    data = train_data([0, 0, 1, 1], [1, 1, 0, 1])
    capped = defense(top_k=3).data_step(Ctx(data), None)
    assert capped.caption_index[:2].tolist() in ([2, 1], [0, 2])  # one of them gets it, the other keeps its own
    assert capped.caption_index[2] in (0, 1, 3) and capped.caption_index[3] == 3
    assert capped.summary["capped_n"] == 1
    free = defense(top_k=3, max_uses=None).data_step(Ctx(data), None)
    assert free.caption_index[:2].tolist() == [2, 2] and free.summary["capped_n"] == 0
    # the count is of re-pairs undone by the cap, whatever the filter leaves out besides
    filtered = defense(top_k=3, filter_fraction=0.75, filter_duplicates=False).data_step(Ctx(data), None)
    assert filtered.summary["filtered_n"] == 3 and filtered.summary["capped_n"] == 1


def ot_vs_global_world() -> tuple[FakeWorld, TrainData]:
    """Image 0 shows objects 0 and 1. Caption X agrees globally but not token-wise; caption Y the reverse."""
    w = FakeWorld()
    w.image(0, e(0, 1, 2, w=[1, 1, 2]), [e(0), e(0), e(1), e(1)])
    w.image(1, e(5), [e(5)] * 4)
    w.image(2, e(6), [e(6)] * 4)
    w.caption(10, e(4), [e(4), e(4)])  # image 0's own caption: wrong in every way
    w.caption(11, e(0, 1, 2, w=[1, 1, 2]), [e(3), e(3)])  # X: cos 1, tokens unrelated (d_OT = 1)
    w.caption(12, e(0, 1), [e(0), e(1)])  # Y: cos 0.58, tokens match the image's (d_OT ≈ 0)
    return w, train_data([0, 1, 2], [10, 11, 12])


@CACHE
def test_ot_reranking_changes_the_choice_when_tokens_disagree(
    use_world: Callable[[FakeWorld], None], cache_mb: int
) -> None:
    world, data = ot_vs_global_world()
    use_world(world)
    by_ot = defense(top_k=2, alpha=0.5, token_cache_mb=cache_mb).data_step(Ctx(data), None)
    by_global = defense(top_k=2, score="global", token_cache_mb=cache_mb).data_step(Ctx(data), None)
    assert by_ot.caption_index[0] == 2  # Y: 0.5·0.58 + 0.5·1 = 0.79 beats X: 0.5·1 + 0.5·0 = 0.5
    assert by_global.caption_index[0] == 1  # X: cosine 1
    assert defense(top_k=2, alpha=1.0).data_step(Ctx(data), None).caption_index[0] == 1
    # the reported own-pair OT score does not depend on what decides the matching
    assert torch.allclose(by_ot.scores["ot"], by_global.scores["ot"])
    assert torch.equal(by_global.scores["match"], by_global.scores["global"])


def test_duplicate_images_do_not_vouch_for_each_others_captions(use_world: Callable[[FakeWorld], None]) -> None:
    # rows 0 and 1 are two copies of one image (a targeted poison) with two poisoned captions; row 2 is a clean
    # pair whose caption describes the image better than row 0's own caption, but less well than row 1's
    w = FakeWorld()
    w.image(0, e(0, 1), [e(0, 1)])
    w.image(2, e(0), [e(0)])
    w.image(3, e(1), [e(1)])
    w.caption(3, e(0, 1, w=[0.2, 1.0]), [e(1)])  # row 0's own: cos 0.83 with image 0
    w.caption(4, e(0, 1, w=[1.0, 1.05]), [e(1)])  # row 1's own: cos 1.00 with image 0
    w.caption(5, e(0, 1, w=[1.0, 0.8]), [e(0)])  # row 2's own (clean): cos 0.99 with image 0
    w.caption(6, e(1), [e(1)])
    use_world(w)
    data = train_data([0, 0, 2, 3], [3, 4, 5, 6])
    off = defense(top_k=1, score="global").data_step(Ctx(data), None)
    assert off.caption_index.tolist() == [1, 1, 2, 3]  # row 0 takes its duplicate's poisoned caption
    on = defense(top_k=1, score="global", exclude_duplicates=True).data_step(Ctx(data), None)
    assert on.caption_index.tolist() == [2, 1, 2, 3]  # the duplicate's caption is out: the clean one wins
    # with fewer non-duplicates than top_k the duplicates never win, whatever the score
    assert defense(top_k=4, exclude_duplicates=True).data_step(Ctx(data), None).caption_index[0] == 2


def test_filter_leaves_out_the_lowest_own_pair_scores(use_world: Callable[[FakeWorld], None]) -> None:
    world, data = identity_world()  # rows 0 and 1 (the poison) have own-pair score 0, the others 1
    use_world(world)
    res = defense(top_k=3, filter_fraction=0.34, filter_duplicates=False).data_step(Ctx(data), None)  # 2 rows
    assert res.keep is not None and res.keep.tolist() == [False, False, True, True, True, True]
    assert res.flagged.tolist() == [True, True, False, False, False, False]
    s = res.summary
    assert (s["filtered_n"], s["poison_filtered"], s["clean_filtered"]) == (2, 1.0, 0.0)
    assert s["poison_filtered_badnet"] == 1.0
    assert defense(top_k=3, filter_fraction=0).data_step(Ctx(data), None).keep is None  # the abstract's method
    # rows 3 and 4 show the same images as rows 0 and 1: with filter_duplicates the filter counts the 3 images
    # and an image leaves with all its rows (0.34 of 3 images: one, the first of the two scoring 0)
    one = defense(top_k=3, filter_fraction=0.34, filter_duplicates=True).data_step(Ctx(data), None)
    assert one.keep is not None and one.keep.tolist() == [False, True, True, False, True, True]
    dup = defense(top_k=3, filter_fraction=0.67, filter_duplicates=True).data_step(Ctx(data), None)
    assert dup.keep is not None and dup.keep.tolist() == [False, False, True, False, False, True]
    assert dup.flagged.tolist() == [True, True, False, True, True, False]


def test_filtered_rows_are_left_out_until_the_next_matching(use_world: Callable[[FakeWorld], None]) -> None:
    world, data = identity_world()
    use_world(world)
    d = defense(top_k=3, warmup_epochs=1, match_every=2, filter_fraction=0.34, filter_duplicates=False)
    trainer = SimpleNamespace(data=data, model=torch.nn.Linear(1, 1), device=torch.device("cpu"),
                              caption_index=torch.arange(6), autocast=contextlib.nullcontext, embed_batch_size=4,
                              global_step=0, log=lambda record: None)
    order = torch.tensor([5, 0, 3, 1, 4, 2])
    rows = []
    for epoch in range(3):
        d.on_epoch_start(trainer, epoch)
        rows.append(d.epoch_indices(trainer, epoch, order).tolist())
    assert rows[0] == order.tolist()  # warm-up: everything
    assert rows[1] == rows[2] == [5, 3, 4, 2]  # the matched epoch and the one after it, in the given order
    restored = defense(top_k=3, filter_fraction=0.34)
    restored.load_state_dict(d.state_dict())
    assert restored.epoch_indices(trainer, 2, order).tolist() == [5, 3, 4, 2]


def test_top_k_limits_the_candidates(use_world: Callable[[FakeWorld], None]) -> None:
    world, data = ot_vs_global_world()
    use_world(world)
    # by global cosine image 0's top-1 is X; Y (the OT winner) is not a candidate at k=1
    assert defense(top_k=1).data_step(Ctx(data), None).caption_index[0] == 1


@CACHE
def test_shards_concatenate_to_the_full_result(use_world: Callable[[FakeWorld], None], cache_mb: int) -> None:
    world, data = random_world(1)
    use_world(world)
    d = defense(top_k=3, match_chunk=2, token_cache_mb=cache_mb)
    ctx = Ctx(data)
    pool = d.pool_features(ctx, torch.arange(13))
    full = d.score_rows(ctx, 0, 13, pool)
    parts = [d.score_rows(ctx, lo, hi, pool) for lo, hi in ((0, 1), (1, 9), (9, 13))]
    assert torch.equal(torch.cat([p[0] for p in parts]), full[0])
    assert torch.allclose(torch.cat([p[1].stack() for p in parts]), full[1].stack())


def random_world(seed: int, n: int = 13) -> tuple[FakeWorld, TrainData]:
    """``n`` pairs with random features (3 image tokens, 2 caption tokens): a non-trivial matching."""
    g = torch.Generator().manual_seed(seed)
    w = FakeWorld()
    for i in range(n):
        w.image(i, torch.randn(D, generator=g), list(torch.randn(3, D, generator=g)))
        w.caption(100 + i, torch.randn(D, generator=g), list(torch.randn(2, D, generator=g)))
    return w, train_data(list(range(n)), [100 + i for i in range(n)])


def test_token_cache_and_reencoding_agree(use_world: Callable[[FakeWorld], None]) -> None:
    world, data = random_world(2, n=17)
    use_world(world)
    for pool_size in (None, 5):  # a FIFO pool: most own captions are encoded on the side
        a = defense(top_k=4, match_chunk=5, pool_size=pool_size).data_step(Ctx(data), None)
        b = defense(top_k=4, match_chunk=5, pool_size=pool_size, token_cache_mb=0).data_step(Ctx(data), None)
        assert a.summary["token_cache"] and not b.summary["token_cache"]
        assert torch.equal(a.caption_index, b.caption_index) and a.flagged.any()
        for k in a.scores:
            assert torch.allclose(a.scores[k], b.scores[k], atol=1e-6)


def test_matching_from_stored_training_features_equals_fresh_matching(use_world: Callable[[FakeWorld], None]) -> None:
    world, data = random_world(3, n=15)
    use_world(world)
    fresh = defense(top_k=4, match_chunk=4).data_step(Ctx(data), 2)
    # a store filled by "training forwards" of epoch 1 with the same features, rows 2, 7 and 11 not seen
    g_i, v = world.image_features(None, data.images)
    g_t, w, m = world.text_features(None, data.tokens)
    m = m.clone()
    m[:, 0] = False
    st = oc_features.FeatureStore.empty(1, 15, v.shape[1], w.shape[1], D, torch.device("cpu"))
    seen = torch.ones(15, dtype=torch.bool)
    seen[[2, 7, 11]] = False
    st.img_g[seen], st.img_t[seen], st.img_ok[seen] = F.normalize(g_i, dim=-1)[seen], v[seen], True
    st.txt_g[seen], st.txt_t[seen], st.txt_m[seen], st.txt_ok[seen] = F.normalize(g_t, dim=-1)[seen], w[seen], \
        m[seen], True
    d = defense(top_k=4, match_chunk=4)
    d._store = st
    stored = d.data_step(Ctx(data), 2)
    assert stored.summary["train_features"] == pytest.approx(12 / 15)
    assert torch.equal(stored.caption_index, fresh.caption_index) and fresh.flagged.any()
    for k in fresh.scores:
        assert torch.allclose(stored.scores[k], fresh.scores[k], atol=1e-6)
    assert d.data_step(Ctx(data), 3).summary["train_features"] == 0.0  # a store of another epoch is not used


def _matching_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """One torchrun-like process: join a gloo group, run the matching, save what this rank ended with."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        w, data = random_world(0)
        oc_features.image_features, oc_features.text_features = w.image_features, w.text_features
        res = defense(top_k=4, match_chunk=3).data_step(Ctx(data), None)
        torch.save({"ci": res.caption_index, **res.scores}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_matching_sharded_over_two_processes_equals_one_process(
    use_world: Callable[[FakeWorld], None], tmp_path: Path
) -> None:
    w, data = random_world(0)
    use_world(w)
    single = defense(top_k=4, match_chunk=3).data_step(Ctx(data), None)
    assert single.flagged.any()  # the random world makes the test meaningful
    # this process is rank 0 (its features are already installed), one spawned process is rank 1
    init = str(tmp_path / "init")
    child = torch.multiprocessing.get_context("spawn").Process(target=_matching_worker,
                                                               args=(1, 2, init, str(tmp_path)))
    child.start()
    try:
        torch.distributed.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=2)
        try:
            res = defense(top_k=4, match_chunk=3).data_step(Ctx(data), None)
            torch.save({"ci": res.caption_index, **res.scores}, tmp_path / "rank0.pt")
        finally:
            torch.distributed.destroy_process_group()
    finally:
        child.join(timeout=300)
    assert child.exitcode == 0
    for rank in (0, 1):  # 13 rows: shards of 6 and 7 images, pool features gathered from both
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(got["ci"], single.caption_index)
        for k, v in single.scores.items():
            assert torch.allclose(got[k], v, atol=1e-6)


@CACHE
def test_fifo_pool_limits_the_candidates(use_world: Callable[[FakeWorld], None], cache_mb: int) -> None:
    world, data = identity_world()
    use_world(world)
    # standalone: the pool is what a FIFO holds after one pass, the last 2 rows (captions 1 and 2); the own
    # captions of rows 0-3 are not in it and are encoded on the side
    res = defense(top_k=3, pool_size=2, token_cache_mb=cache_mb).data_step(Ctx(data), None)
    # row 0 (class 0) finds no caption of class 0 in the pool and keeps its own; row 1 gets row 4's caption 1
    assert res.caption_index.tolist() == [0, 4, 2, 3, 4, 5]
    assert res.summary["pool"] == 2


def test_fifo_pool_during_training_is_the_last_trained_rows() -> None:
    d = defense(pool_size=3)
    ctx = Ctx(train_data([0] * 10, [0] * 10), cfg=SimpleNamespace(seed=5, batch_size=4))
    order = epoch_order(10, 5, 1)
    # epoch 1 trained 2 full batches of 4 (rows order[:8]); the FIFO holds the last 3 of them
    assert d._pool_rows(ctx, 2).tolist() == sorted(order[5:8].tolist())
    assert d._pool_rows(ctx, None).tolist() == [7, 8, 9]
    assert defense()._pool_rows(ctx, 2).tolist() == list(range(10))
    # rows the filter left out of epoch 1 were not trained, so they are not in the FIFO either
    d.keep = torch.ones(10, dtype=torch.bool)
    d.keep[order[6:8]] = False
    kept = order[d.keep[order]]  # 8 rows: two full batches of 4
    assert d._pool_rows(ctx, 2).tolist() == sorted(kept[5:8].tolist())


def test_identical_caption_text_is_not_a_replacement(use_world: Callable[[FakeWorld], None]) -> None:
    world, _ = identity_world()
    use_world(world)
    # rows 0 and 1 carry the same caption text; row 0's features tie exactly with its own caption
    data = train_data([0, 0], [0, 0])
    res = defense(top_k=2).data_step(Ctx(data), None)
    assert res.caption_index.tolist() == [0, 1] and not res.flagged.any()


# --------------------------------------------------------------------------------------------------
# losses


def test_pairwise_inter_loss_single_image_token_closed_form() -> None:
    # with one image token the plan is fixed by the text marginal b: d_OT = sum_j b_j (1 - cos(v, w_j))
    g = torch.Generator().manual_seed(0)
    v = torch.randn(3, 1, D, generator=g)
    w = torch.randn(3, 5, D, generator=g)
    g_txt = torch.randn(3, D, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    cost = 1 - F.cosine_similarity(v.expand(-1, 5, -1), w, dim=-1)
    uniform = mask / mask.sum(1, keepdim=True)
    got = defense(marginals="uniform").inter_loss(v, v[:, 0], w, mask, g_txt)
    assert got.item() == pytest.approx((cost * uniform).sum(1).mean().item(), abs=1e-5)
    # weighted marginals: softmax over real tokens of cos(token, global) / 0.1
    sim = F.cosine_similarity(w, g_txt[:, None], dim=-1).masked_fill(~mask, float("-inf"))
    weights = torch.softmax(sim / 0.1, dim=1)
    got = defense(marginals="weighted").inter_loss(v, v[:, 0], w, mask, g_txt)
    assert got.item() == pytest.approx((cost * weights).sum(1).mean().item(), abs=1e-5)


def test_contrastive_inter_loss_is_infonce_over_negative_ot_distances() -> None:
    g = torch.Generator().manual_seed(1)
    v = torch.randn(4, 3, D, generator=g)
    w = torch.randn(4, 5, D, generator=g)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[0, 3:] = False
    d = defense(inter_loss="contrastive", inter_tau=0.2)
    dist = torch.stack([
        d.ot_distance(v[i : i + 1].expand(4, -1, -1), w, torch.ones(4, 3, dtype=torch.bool), mask,
                      v.mean(1)[i : i + 1].expand(4, -1), w.mean(1))
        for i in range(4)
    ])  # [image, caption], pair by pair
    logits = -dist / 0.2
    t = torch.arange(4)
    expected = 0.5 * (F.cross_entropy(logits, t) + F.cross_entropy(logits.t(), t))
    got = d.inter_loss(v, v.mean(1), w, mask, w.mean(1))
    assert got.item() == pytest.approx(expected.item(), abs=1e-5)


@pytest.fixture(scope="module")
def vit_trainer(tmp_path_factory: pytest.TempPathFactory, make_job: Callable[..., TrainJob]) -> Trainer:
    """A Trainer (not fitted) of otc-vit-tiny (16 patch tokens) on the shared tiny world."""
    job = make_job(model="otc-vit-tiny", batch_size=16)
    job.defense = DefenseConfig(name="otcclip", options={"inter_weight": 0.3, "intra_weight": 0.0})
    return Trainer(job, tmp_path_factory.mktemp("vit") / "run", show_progress=False)


def _reference_tokens(trainer: Trainer, batch: Any) -> tuple[torch.Tensor, ...]:
    g_i, v = encode_image_tokens(trainer.model, batch.images)
    g_t, w, m = encode_text_tokens(trainer.model, batch.tokens)
    m = m.clone()
    m[:, 0] = False  # drop_sot
    return g_i, v, g_t, w, m


def _ot(x: torch.Tensor, gx: torch.Tensor, y: torch.Tensor, gy: torch.Tensor, ym: torch.Tensor | None = None,
        xm: torch.Tensor | None = None) -> torch.Tensor:
    """d_OT with the default options (weighted marginals, eps 0.05, 50 iterations), computed independently."""
    xm = torch.ones(x.shape[:2], dtype=torch.bool) if xm is None else xm
    ym = torch.ones(y.shape[:2], dtype=torch.bool) if ym is None else ym
    return ot.ot_distance(x, y, xm, ym, a=ot.token_weights(x, gx, xm), b=ot.token_weights(y, gy, ym), eps=0.05,
                          n_iters=50)


@pytest.mark.slow
def test_batch_loss_is_clip_plus_weighted_inter(vit_trainer: Trainer) -> None:
    tr = vit_trainer
    d: oc.OTCCLIP = tr.defense
    batch = tr.make_batch(torch.arange(16))
    loss, extras = d.batch_loss(tr, batch)
    # the fine-grained forward gives the CLIP loss of the plain forward (globals are identical)
    assert extras["loss_clip"] == pytest.approx(tr.clip_batch_loss(batch).item(), abs=1e-5)
    g_i, v, g_t, w, m = _reference_tokens(tr, batch)
    inter = _ot(v, g_i, w, g_t, m).mean()
    assert extras["loss_inter"] == pytest.approx(inter.item(), abs=1e-5)
    assert loss.item() == pytest.approx(extras["loss_clip"] + 0.3 * extras["loss_inter"], abs=1e-5)
    # gradient reaches both towers through the OT term
    tr.model.zero_grad()
    (loss - extras["loss_clip"]).backward()  # the constant does not change the gradient
    assert tr.model.visual.conv1.weight.grad.abs().sum() > 0
    assert tr.model.token_embedding.weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_batch_loss_without_alignment_is_plain_clip(vit_trainer: Trainer) -> None:
    tr = vit_trainer
    batch = tr.make_batch(torch.arange(8))
    loss, extras = defense(inter_weight=0, intra_weight=0, match_features="fresh").batch_loss(tr, batch)
    assert extras == {} and loss.item() == pytest.approx(tr.clip_batch_loss(batch).item(), abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("align", [False, True])
def test_repaired_captions_do_not_train_the_text_tower(vit_trainer: Trainer, align: bool) -> None:
    tr = vit_trainer
    weights = {"inter_weight": 0.3, "intra_weight": 0.0} if align else {"inter_weight": 0, "intra_weight": 0}
    batch = tr.make_batch(torch.arange(8))
    batch.caption_rows = batch.caption_rows.clone()
    batch.caption_rows[:5] += 100  # rows 0-4 re-paired (the tokens stay: only the bookkeeping matters here)
    values, text_grads, logged = [], [], []
    for grad in (False, True):
        d = defense(match_features="fresh", repaired_text_grad=grad, **weights)
        tr.model.zero_grad(set_to_none=True)
        loss, extras = d.batch_loss(tr, batch)
        loss.backward()
        values.append(loss.item())
        logged.append(extras)
        text_grads.append(tr.model.transformer.resblocks[0].mlp.c_fc.weight.grad.clone())
        assert tr.model.visual.conv1.weight.grad.abs().sum() > 0
    assert values[0] == pytest.approx(values[1], abs=1e-6)  # same forward, different gradient
    assert logged[0]["repaired"] == pytest.approx(5 / 8) and "repaired" not in logged[1]
    assert not torch.allclose(text_grads[0], text_grads[1])
    # all re-paired: no gradient reaches the text tower at all
    batch.caption_rows[:] += 1000
    tr.model.zero_grad(set_to_none=True)
    defense(match_features="fresh", **weights).batch_loss(tr, batch)[0].backward()
    g = tr.model.transformer.resblocks[0].mlp.c_fc.weight.grad
    assert g is None or g.abs().sum() == 0


@pytest.mark.slow
def test_epoch_before_a_matching_keeps_the_training_features(vit_trainer: Trainer) -> None:
    tr = vit_trainer  # epoch 0; with warmup_epochs=1 the matching is at the start of epoch 1
    d = defense(inter_weight=0, intra_weight=0)
    batch = tr.make_batch(torch.arange(3, 11))
    loss, _ = d.batch_loss(tr, batch)
    assert loss.item() == pytest.approx(tr.clip_batch_loss(batch).item(), abs=1e-5)  # same loss, features kept
    st = d._store
    assert st is not None and st.epoch == 0
    assert st.img_ok.nonzero().flatten().tolist() == list(range(3, 11)) == st.txt_ok.nonzero().flatten().tolist()
    g_i, v, g_t, w, m = _reference_tokens(tr, batch)
    assert torch.allclose(st.img_g[3:11], F.normalize(g_i, dim=-1), atol=1e-5)
    assert torch.allclose(st.img_t[3:11], v, atol=1e-5) and torch.allclose(st.txt_t[3:11], w, atol=1e-5)
    assert torch.equal(st.txt_m[3:11], m)
    # the store is checkpointed while it is filled, and restored
    d2 = defense()
    d2.load_state_dict(d.state_dict())
    assert torch.equal(d2._store.img_t, st.img_t) and d2._store.epoch == 0
    assert "store" not in defense(match_features="fresh").state_dict()


@pytest.mark.slow
def test_intra_loss_with_identity_views_is_ot_of_a_set_with_itself(
    vit_trainer: Trainer, monkeypatch: pytest.MonkeyPatch
) -> None:
    tr = vit_trainer
    # identity "augmentations": view 2 = view 1, the EDA variant = the caption itself
    monkeypatch.setattr(oc_losses, "augmenters", lambda modalities: (lambda x: x.clone(),
                                                                lambda caps, seed, synonyms=None: list(caps)))
    d = defense(inter_weight=0, intra_weight=0.5, intra_fraction=0.5)
    monkeypatch.setattr(d, "_thesaurus", lambda trainer: None)
    batch = tr.make_batch(torch.arange(8))
    loss, extras = d.batch_loss(tr, batch)
    g_i, v, g_t, w, m = _reference_tokens(tr, batch)
    img = _ot(v[:4], g_i[:4], v[:4], g_i[:4]).mean()
    txt = _ot(w[:4], g_t[:4], w[:4], g_t[:4], m[:4], m[:4]).mean()
    assert extras["loss_intra"] == pytest.approx(((img + txt) / 2).item(), abs=1e-5)
    assert loss.item() == pytest.approx(extras["loss_clip"] + 0.5 * extras["loss_intra"], abs=1e-5)
    d_img = defense(inter_weight=0, intra_weight=0.5, intra_fraction=0.5, intra_modalities="image")
    _, ex = d_img.batch_loss(tr, batch)
    assert ex["loss_intra"] == pytest.approx(img.item(), abs=1e-5)
    # a view encoded with gradient gives the same value; the fixed-target default has no backward for it
    d_grad = defense(inter_weight=0, intra_weight=0.5, intra_fraction=0.5, intra_modalities="image",
                     intra_view_grad=True)
    loss_g, ex_g = d_grad.batch_loss(tr, batch)
    assert ex_g["loss_intra"] == pytest.approx(ex["loss_intra"], abs=1e-6)
    loss_sg, _ = d_img.batch_loss(tr, batch)
    grads = []
    for lo in (loss_g, loss_sg):
        tr.model.zero_grad()
        lo.backward()
        grads.append(tr.model.visual.conv1.weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])  # the second view's gradient is there only with grad

@pytest.mark.slow
def test_intra_loss_with_real_augmentations_is_seeded(vit_trainer: Trainer) -> None:
    tr = vit_trainer
    d = defense(inter_weight=0, intra_weight=1.0, intra_fraction=0.5, intra_views="two")
    batch = tr.make_batch(torch.arange(8))
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        runs.append(d.batch_loss(tr, batch)[1]["loss_intra"])
    assert runs[0] == runs[1] != runs[2]
    assert 0 < runs[0] < 2


# --------------------------------------------------------------------------------------------------
# real model: schedule, matching inside training, exact resume


def test_schedule() -> None:
    d = defense(warmup_epochs=2, match_every=3)
    assert [e for e in range(10) if d.due(e)] == [2, 5, 8]
    assert [e for e in range(3) if defense(warmup_epochs=0, match_every=1).due(e)] == [0, 1, 2]


@pytest.mark.parametrize("between", ["own", "keep"])
def test_epochs_between_matchings(use_world: Callable[[FakeWorld], None], between: str) -> None:
    world, data = identity_world()
    use_world(world)
    d = defense(top_k=3, warmup_epochs=1, match_every=2, between=between)
    logged: list[dict[str, Any]] = []
    trainer = SimpleNamespace(data=data, model=torch.nn.Linear(1, 1), device=torch.device("cpu"),
                              caption_index=torch.arange(6), autocast=contextlib.nullcontext, embed_batch_size=4,
                              global_step=0, log=logged.append)
    seen = []
    for epoch in range(4):
        d.on_epoch_start(trainer, epoch)
        seen.append(trainer.caption_index.tolist())
    matched = seen[1]
    assert matched[:2] != [0, 1] and matched[2:] == [2, 3, 4, 5]  # epoch 1: rows 0 and 1 re-paired
    assert seen[0] == list(range(6))  # warm-up: own pairs
    assert seen[2] == (list(range(6)) if between == "own" else matched)  # between the matchings
    assert seen[3] == matched  # epoch 3: matched again (same features, same result)
    assert [r["epoch"] for r in logged] == [1, 3]


@pytest.fixture(scope="module")
def poisoned_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 128-pair world with 8 badnet pairs (136 rows)."""
    from otcbench.attacks.poison import poison_dataset

    root = tmp_path_factory.mktemp("small")
    write_world(root / "world", SynthConfig(n_train=128, probe_train_per_class=2, probe_val_per_class=1,
                                            test_per_class=2, targets_per_class=1, seed=1))
    poison_dataset(root / "world", root / "p", [("badnet", {"count": 8})], seed=0)
    return root / "p"


def small_job(data: Path, make_job: Callable[..., TrainJob], **options: Any) -> TrainJob:
    job = make_job(data=data, model="otc-vit-tiny", batch_size=32, epochs=2, checkpoint_every_steps=5)
    job.defense = DefenseConfig(name="otcclip+filter", options={"warmup_epochs": 1, "top_k": 3, **options})
    return job


def _log(run: Path) -> list[dict[str, Any]]:
    import json

    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("options", [{"filter_fraction": 0.0}, {"filter_fraction": 0.25}],
                         ids=["match", "match+filter"])
@pytest.mark.slow
def test_training_matches_logs_and_resumes_exactly(
    poisoned_small: Path, make_job: Callable[..., TrainJob], tmp_path: Path, options: dict[str, Any]
) -> None:
    job = small_job(poisoned_small, make_job, **options)  # 136 rows / 32 = 4 steps per epoch; matching at epoch 1
    ref = Trainer(job, tmp_path / "ref", show_progress=False)
    ref.fit()
    matches = [r for r in _log(tmp_path / "ref") if r["type"] == "otcclip_match"]
    assert len(matches) == 1 and matches[0]["epoch"] == 1 and matches[0]["step"] == 5
    steps = [r for r in _log(tmp_path / "ref") if r["type"] == "step"]
    # the filter leaves 136 - int(0.25·136) = 102 rows for the matched epoch: 3 steps instead of 4
    filtered = options["filter_fraction"] > 0
    assert len(steps) == (7 if filtered else 8)
    if filtered:
        assert ref.defense.keep is not None and int((~ref.defense.keep).sum()) == 34 == matches[0]["filtered_n"]
    m = matches[0]
    assert 0 <= m["repaired"] <= 1 and m["repaired_n"] == int((ref.caption_index != torch.arange(136)).sum())
    for key in ("poison_repaired", "clean_repaired", "detect_auroc_ot", "detect_auroc_global", "detect_auroc_match",
                "detect_auroc_gap"):
        assert key in m
    steps = [r for r in _log(tmp_path / "ref") if r["type"] == "step"]
    assert all({"loss_clip", "loss_inter", "loss_intra"} <= r.keys() for r in steps)

    # interrupted in the matched epoch (after step 6), resumed: same weights, pairs and a single match record
    run = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        Trainer(job, run, show_progress=False, on_step=interrupt_at(6)).fit()
    resumed = Trainer(job, run, resume=True, show_progress=False)
    assert resumed.defense.matched_epoch == 1
    resumed.fit()
    assert torch.equal(resumed.caption_index, ref.caption_index)
    if filtered:
        assert torch.equal(resumed.defense.keep, ref.defense.keep)
    a, b = resumed.model.state_dict(), ref.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len([r for r in _log(run) if r["type"] == "otcclip_match"]) == 1

    # interrupted right after the match was logged, before the matched epoch's first checkpoint: the
    # resume starts from the warm-up's checkpoint, drops the record and matches again, once
    run2 = tmp_path / "resumed2"
    with pytest.raises(KeyboardInterrupt):
        Trainer(job, run2, show_progress=False, on_step=interrupt_at(5)).fit()
    r2 = Trainer(job, run2, resume=True, show_progress=False)
    r2.fit()
    assert torch.equal(r2.caption_index, ref.caption_index)
    assert len([r for r in _log(run2) if r["type"] == "otcclip_match"]) == 1


# --------------------------------------------------------------------------------------------------
# options


def test_options_are_validated() -> None:
    with pytest.raises(UserError, match="unknown key"):
        DEFENSES.options("otcclip", {"topk": 3})
    with pytest.raises(UserError, match="score"):
        DEFENSES.options("otcclip", {"score": "fancy"})
    with pytest.raises(UserError, match="alpha"):
        DEFENSES.options("otcclip", {"alpha": 1.5})
    with pytest.raises(UserError, match="filter_fraction"):
        DEFENSES.options("otcclip", {"filter_fraction": 1.0})
    o = DEFENSES.options("otcclip", {})
    assert (o.top_k, o.alpha, o.score, o.inter_loss, o.eps, o.marginals) == (5, 0.5, "ot", "pairwise", 0.05, "weighted")
    # the paper's reading: RoCLIP's protocol, no otcbench extension
    assert (o.warmup_epochs, o.match_every, o.intra_view_grad, o.between, o.max_uses) == (1, 2, False, "own", None)
    assert (o.filter_fraction, o.own_competes, o.margin, o.exclude_duplicates) == (0.0, False, 0.0, False)
    f = DEFENSES.options("otcclip+filter", {})
    assert (f.filter_fraction, f.filter_duplicates, f.margin, f.max_uses, f.own_competes) == (0.2, True, 0.05, 1, True)
    # everything else is shared
    shared = set(o.model_dump()) - {"filter_fraction", "margin", "max_uses", "own_competes"}
    assert all(getattr(o, k) == getattr(f, k) for k in shared)
    assert math.isclose(o.intra_fraction, 0.125)



# --------------------------------------------------------------------------------------------------
# the paper's reading: every image re-assigned to its best candidate other than its own caption


def own_best_world() -> tuple[FakeWorld, TrainData]:
    """Every row's own caption is its best match; each image's best *other* caption is a different row's."""
    w = FakeWorld()
    w.image(0, e(0), [e(0)] * 4)
    w.image(1, e(1, 2, w=[1, 0.3]), [e(1)] * 4)
    w.image(2, e(2, 0, w=[1, 0.2]), [e(2)] * 4)
    w.caption(10, e(0), [e(0), e(0)])
    w.caption(11, e(0, 1), [e(0), e(1)])
    w.caption(12, e(2), [e(2), e(2)])
    data = train_data([0, 1, 2], [10, 11, 12])
    data.labels = torch.tensor([0, 1, 0])
    return w, data


@CACHE
def test_paper_reading_reassigns_every_image_to_its_best_non_own_candidate(
    use_world: Callable[[FakeWorld], None], cache_mb: int
) -> None:
    world, data = own_best_world()
    use_world(world)
    paper = defense("otcclip", top_k=2, token_cache_mb=cache_mb).data_step(Ctx(data), None)
    # row 0: caption 11 (cos 0.71) over 12 (cos 0); row 1: caption 12 (0.29) over 10 (0); row 2: 10 (0.20) over 11
    assert paper.caption_index.tolist() == [1, 2, 0]
    assert paper.flagged.tolist() == [True, True, True]
    # the own pair is still scored (detection), and is higher than what the image now trains on
    assert bool((paper.scores["gap"] > 0).all())
    s = paper.summary
    assert (s["match_n"], s["match_distinct"], s["match_largest_group"]) == (3, 3, 1)
    # labels [0, 1, 0]: only row 2 -> row 0 names the image's class
    assert s["match_precision"] == pytest.approx(1 / 3) and s["match_precision_global"] == pytest.approx(1 / 3)
    # otcbench's rule (own caption competes) keeps every own caption on the same features
    kept = defense("otcclip", top_k=2, own_competes=True, token_cache_mb=cache_mb).data_step(Ctx(data), None)
    assert kept.caption_index.tolist() == [0, 1, 2] and kept.summary["match_precision"] is None
    assert defense(top_k=2).data_step(Ctx(data), None).caption_index.tolist() == [0, 1, 2]  # otcclip+filter


def test_paper_reading_keeps_the_own_caption_without_other_candidates(use_world: Callable[[FakeWorld], None]) -> None:
    world, data = own_best_world()
    use_world(world)
    # top_k=1 over a pool of one caption: the own caption is excluded, the other rows' captions compete
    alone = defense("otcclip", top_k=1, pool_size=1).data_step(Ctx(data), None)
    assert alone.caption_index.tolist() == [2, 2, 2]  # the FIFO holds row 2 only; row 2 has no candidate
    choice, _ = oc.rank_candidates(torch.tensor([[0.9, 0.1, float("-inf")], [0.9, float("-inf"), float("-inf")]]),
                                   None, alpha=1.0, own_competes=False)
    assert choice.tolist() == [1, 0]  # column 1 despite the own caption's 0.9; nothing allowed: own caption
