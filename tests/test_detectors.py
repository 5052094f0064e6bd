"""Tests for the poisoned-sample detectors (otcbench.defenses.detectors) and precision@poison-count: scores on
hand-built embedding sets whose answer is known, against brute-force formulas, and their place in ``defend``."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from otcbench.defenses.defend import PAIR_SCORES, detector_specs, run_defend
from otcbench.defenses.detectors import DETECTORS, EmbeddingSet, knn_distances, mle_lid, run_detectors
from otcbench.errors import UserError
from otcbench.eval.detection import auroc, per_attack_detection, precision_at_count


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def on_circle(angles: list[float]) -> torch.Tensor:
    """Unit vectors in 2-D at the given angles: distances between them are 2·sin(Δ/2), easy to check by hand."""
    a = torch.tensor(angles, dtype=torch.float64)
    return torch.stack([a.cos(), a.sin()], dim=1)


def score(name: str, x: torch.Tensor, **opts: object) -> torch.Tensor:
    return run_detectors([(name, dict(opts))], EmbeddingSet(x, x))[name]


def test_knn_distance_by_hand() -> None:
    # points at 0, 0.1, 0.3 and 1.3 rad: nearest-neighbour angles 0.1, 0.1, 0.2, 1.0
    x = on_circle([0.0, 0.1, 0.3, 1.3])
    s = score("knn", x, k=1)
    expected = torch.tensor([2 * math.sin(d / 2) for d in (0.1, 0.1, 0.2, 1.0)])
    torch.testing.assert_close(s, -expected.float(), rtol=0, atol=1e-6)
    # k = 2: second neighbours at 0.3, 0.2, 0.3, 1.2 rad
    s2 = score("knn", x, k=2)
    expected2 = torch.tensor([2 * math.sin(d / 2) for d in (0.3, 0.2, 0.3, 1.2)])
    torch.testing.assert_close(s2, -expected2.float(), rtol=0, atol=1e-6)


def test_knn_never_counts_the_query_itself() -> None:
    x = on_circle([0.0, 0.5])
    d = knn_distances(x, x, 1, torch.arange(2), torch.arange(2))
    assert torch.allclose(d.squeeze(1), torch.full((2,), 2 * math.sin(0.25), dtype=torch.float64))
    with pytest.raises(ValueError, match="k=2 neighbours"):
        knn_distances(x, x, 2, torch.arange(2), torch.arange(2))


def _dao_brute_force(x: torch.Tensor, k: int) -> torch.Tensor:
    """DAO by its definition, loop by loop: mean over q's k-NN o of LID(o)·ln(d_k(q)/d_k(o))."""
    n = x.shape[0]
    d = torch.cdist(x.double(), x.double())
    d.fill_diagonal_(math.inf)
    order = d.argsort(dim=1)[:, :k]
    dist = torch.gather(d, 1, order)
    kd = dist[:, -1]
    lid = torch.tensor([-1.0 / float(torch.log(dist[o] / kd[o]).mean()) for o in range(n)])
    return torch.tensor([float(sum(lid[o] * math.log(kd[q] / kd[o]) for o in order[q]) / k) for q in range(n)])


def test_dao_matches_its_formula() -> None:
    g = torch.Generator().manual_seed(0)
    x = unit(torch.randn(60, 5, generator=g, dtype=torch.float64))
    for k in (3, 8):
        torch.testing.assert_close(score("dao", x, k=k), -_dao_brute_force(x, k).float(), rtol=1e-5, atol=1e-5)


def test_mle_lid_of_a_uniform_line_is_one() -> None:
    # neighbours at distances 1..k along a line: the MLE of a 1-D set is -1/mean(ln(i/k)) → 1 as k grows
    dist = torch.arange(1, 2001, dtype=torch.float64).unsqueeze(0)
    assert abs(float(mle_lid(dist)) - 1.0) < 0.01
    # all distances equal (exact duplicates): no information, capped at the largest finite LID of the set
    lid = mle_lid(torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 4.0]]))
    assert torch.isfinite(lid).all() and lid[0] == lid[1]


def _sparse_poisons(n_clean: int = 300, n_poison: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean points in three tight blobs, poisons scattered alone (the paper's finding: sparse neighbourhoods)."""
    g = torch.Generator().manual_seed(seed)
    centres = unit(torch.randn(3, 16, generator=g, dtype=torch.float64))
    clean = unit(centres[torch.arange(n_clean) % 3] + 0.05 * torch.randn(n_clean, 16, generator=g,
                                                                         dtype=torch.float64))
    poison = unit(torch.randn(n_poison, 16, generator=g, dtype=torch.float64))
    x = torch.cat([clean, poison])
    is_poison = torch.cat([torch.zeros(n_clean, dtype=torch.bool), torch.ones(n_poison, dtype=torch.bool)])
    return x, is_poison


@pytest.mark.parametrize("name", ["knn", "dao"])
def test_scattered_poisons_are_found(name: str) -> None:
    x, is_poison = _sparse_poisons()
    s = score(name, x, k=8)
    assert auroc(s, ~is_poison) == 1.0
    assert precision_at_count(s, is_poison) == 1.0


def _poison_cluster(m: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean points spread over one half of the sphere, poisons one tight cluster of m in the empty half (a
    backdoor's triggered copies, all moved to where no clean image lies)."""
    g = torch.Generator().manual_seed(1)
    clean = torch.randn(400, 3, generator=g, dtype=torch.float64)
    clean[:, 0] = clean[:, 0].abs()
    clean = unit(clean)
    centre = torch.tensor([[-1.0, 0.0, 0.0]], dtype=torch.float64)
    poison = unit(centre + 0.01 * torch.randn(m, 3, generator=g, dtype=torch.float64))
    return torch.cat([clean, poison]), torch.cat([torch.zeros(400, dtype=torch.bool), torch.ones(m, dtype=torch.bool)])


def test_tight_poison_cluster_looks_dense_to_knn_when_k_is_below_its_size() -> None:
    """The known failure mode: with k < cluster size every poison's neighbours are poisons, so k-dist calls
    them the *densest* points; with k above the cluster size their k-th neighbour is a far clean point."""
    x, is_poison = _poison_cluster(20)
    assert auroc(score("knn", x, k=8), ~is_poison) == 0.0
    assert auroc(score("knn", x, k=32), ~is_poison) == 1.0
    assert precision_at_count(score("knn", x, k=32), is_poison) == 1.0


def test_a_small_reference_set_exposes_a_cluster() -> None:
    """The paper's setting: a reference with few poisons in it. Drawing 60 of 420 rows leaves ~3 poisons in
    the reference, fewer than k, so the cluster's k-th neighbours are clean and far; the draw is seeded."""
    x, is_poison = _poison_cluster(20)
    a = score("knn", x, k=8, reference_size=60, seed=3)
    assert auroc(a, ~is_poison) > 0.95
    assert torch.equal(a, score("knn", x, k=8, reference_size=60, seed=3))
    assert not torch.equal(a, score("knn", x, k=8, reference_size=60, seed=4))


def test_spaces_and_bad_options() -> None:
    x, _ = _sparse_poisons()
    t = torch.flip(x, dims=[0])
    emb = EmbeddingSet(x, t)
    img = run_detectors([("knn", {"k": 4})], emb)["knn"]
    txt = run_detectors([("knn", {"k": 4, "space": "text"})], emb)["knn"]
    torch.testing.assert_close(txt, torch.flip(img, dims=[0]))
    both = run_detectors([("knn", {"k": 4}), ("knn", {"k": 5})], emb)
    assert list(both) == ["knn", "knn@1"]
    with pytest.raises(UserError, match="unknown detector 'knm'; did you mean 'knn'"):
        run_detectors([("knm", {})], emb)
    with pytest.raises(UserError, match="k"):
        DETECTORS.options("dao", {"k": 0})
    with pytest.raises(ValueError, match="same N"):
        EmbeddingSet(x, x[:3])


def test_precision_at_count_counts_ties_fractionally() -> None:
    s = torch.tensor([0.0, 0.0, 0.0, 0.0, 5.0, 6.0])
    p = torch.tensor([True, False, False, False, True, False])
    # two poisons; the two lowest scores are a 4-way tie holding one poison: expected hits 2·1/4
    assert precision_at_count(s, p) == pytest.approx(0.25)
    assert precision_at_count(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([False, True, False])) == 0.0
    assert precision_at_count(torch.tensor([1.0, 2.0]), torch.tensor([False, False])) is None


def test_per_attack_detection_judges_each_attack_against_clean_rows() -> None:
    s = torch.tensor([5.0, 6.0, 7.0, 1.0, 2.0, 5.5])  # badnet rows lowest; the targeted row among clean ones
    poison = ["", "", "", "badnet", "badnet", "targeted"]
    rows = {(r["score"], r["attack"]): r for r in per_attack_detection({"knn": s}, poison)}
    assert rows[("knn", "badnet")] == {"score": "knn", "attack": "badnet", "n_poison": 2, "n_clean": 3,
                                       "auroc": 1.0, "precision_at_n": 1.0}
    t = rows[("knn", "targeted")]
    assert (t["n_poison"], t["auroc"], t["precision_at_n"]) == (1, pytest.approx(2 / 3), 0.0)
    assert rows[("knn", "all")]["n_poison"] == 3


def test_detector_specs_errors() -> None:
    assert detector_specs(["knn", "dao"], {"knn": {"k": 4}}) == [("knn", {"k": 4}), ("dao", {})]
    with pytest.raises(UserError, match="add --detector dao"):
        detector_specs(["knn"], {"dao": {"k": 4}})
    with pytest.raises(UserError, match="detector.NAME.KEY"):
        detector_specs(["knn"], {"knn": 3})
    with pytest.raises(UserError, match="twice"):
        detector_specs(["knn", "knn"], None)


@pytest.mark.slow
def test_defend_adds_detector_scores_beside_the_defense(tiny_world: Path, trained_run: Path,
                                                         tmp_path: Path) -> None:
    from otcbench.attacks.poison import poison_dataset

    p = tmp_path / "p"
    poison_dataset(tiny_world, p, [("badnet", {"count": 16})], seed=0)
    out = tmp_path / "out"
    report = run_defend(p, out, defense="safeclip", checkpoint=trained_run, batch_size=128, device="cpu",
                        show_progress=False, detectors=[("knn", {"k": 4}), ("dao", {"k": 4})])
    scores = pd.read_parquet(out / PAIR_SCORES)
    assert [c for c in scores.columns if c.startswith("score_")] == ["score_cosine", "score_p_clean",
                                                                     "score_knn", "score_dao"]
    assert report["detect_auroc"] == report["detect_auroc_cosine"]  # the defense's own score stays first
    poison = torch.tensor((scores["poison"] != "").to_numpy())
    for name in ("knn", "dao", "p_clean"):
        s = torch.tensor(scores[f"score_{name}"].to_numpy())
        assert report[f"detect_auroc_{name}"] == pytest.approx(auroc(s, ~poison))
        assert report[f"detect_precision_at_n_{name}"] == pytest.approx(precision_at_count(s, poison))
    by = {(r["score"], r["attack"]) for r in report["detect_by_attack"]}
    assert ("dao", "badnet") in by and ("cosine", "badnet") in by
    assert report["detectors"][0] == ["knn", {"k": 4, "space": "image", "reference_size": 16384, "seed": 0}]
