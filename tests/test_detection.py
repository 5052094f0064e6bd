"""Tests for otcbench.eval.detection: precision/recall, AUROC with ties, repaired fractions — known answers."""

from __future__ import annotations

import itertools

import pytest
import torch

from otcbench.eval.detection import auroc, detection_metrics, poison_mask


def brute_force_auroc(scores: list[float], positive: list[bool]) -> float:
    """P(score of a positive > score of a negative) + ½ P(tie), over all pairs."""
    pos = [s for s, p in zip(scores, positive, strict=True) if p]
    neg = [s for s, p in zip(scores, positive, strict=True) if not p]
    total = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return total / (len(pos) * len(neg))


def test_auroc_perfect_inverted_and_constant() -> None:
    pos = torch.tensor([True, True, False, False])
    assert auroc(torch.tensor([0.9, 0.8, 0.1, 0.2]), pos) == 1.0
    assert auroc(torch.tensor([0.1, 0.2, 0.9, 0.8]), pos) == 0.0
    assert auroc(torch.tensor([0.5, 0.5, 0.5, 0.5]), pos) == 0.5


def test_auroc_hand_computed_with_a_tie() -> None:
    # positives 0.9, 0.5, 0.3 vs negatives 0.4, 0.5: wins (0.9>0.4, 0.9>0.5, 0.5>0.4) + tie (0.5=0.5) → 3.5 / 6
    scores = torch.tensor([0.9, 0.5, 0.3, 0.4, 0.5])
    pos = torch.tensor([True, True, True, False, False])
    assert auroc(scores, pos) == pytest.approx(3.5 / 6, abs=1e-12)


def test_auroc_matches_brute_force_on_heavily_tied_random_data() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        n = int(torch.randint(2, 60, (1,), generator=g))
        scores = torch.randint(0, 5, (n,), generator=g).float() / 4  # many ties
        pos = torch.rand(n, generator=g) < 0.4
        if pos.all() or not pos.any():
            continue
        assert auroc(scores, pos) == pytest.approx(brute_force_auroc(scores.tolist(), pos.tolist()), abs=1e-12)


def test_auroc_undefined_and_bad_input() -> None:
    assert auroc(torch.tensor([0.1, 0.2]), torch.tensor([True, True])) is None
    assert auroc(torch.tensor([0.1, 0.2]), torch.tensor([False, False])) is None
    with pytest.raises(ValueError, match="NaN"):
        auroc(torch.tensor([0.1, float("nan")]), torch.tensor([True, False]))
    with pytest.raises(ValueError, match="3 scores but 2"):
        auroc(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([True, False]))


def test_detection_metrics_known_answers() -> None:
    # 10 pairs, rows 0-3 poisoned; flagged: rows 0, 1, 2 (poison) and 5 (clean)
    poison = ["badnet"] * 3 + ["targeted"] + [""] * 6
    flagged = torch.zeros(10, dtype=torch.bool)
    flagged[[0, 1, 2, 5]] = True
    # the defense's score ranks all clean above all poison except clean row 5, which ties poison row 3
    score = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.9, 0.4, 0.8, 0.7, 0.6, 0.95])
    m = detection_metrics(flagged, {"ot": score, "global": -score}, poison)
    assert m["detect_precision"] == pytest.approx(3 / 4)
    assert m["detect_recall"] == pytest.approx(3 / 4)
    # clean 6 × poison 4 = 24 pairs; only (row 5 = 0.4) vs (row 3 = 0.4) is a tie → (23 + 0.5) / 24
    assert m["detect_auroc"] == pytest.approx(23.5 / 24)
    assert m["detect_auroc_ot"] == m["detect_auroc"]
    assert m["detect_auroc_global"] == pytest.approx(0.5 / 24)
    assert m["poison_repaired"] == pytest.approx(3 / 4)
    assert m["clean_repaired"] == pytest.approx(1 / 6)
    assert (m["detect_n"], m["detect_n_poison"], m["detect_n_flagged"], m["detect_tp"]) == (10, 4, 4, 3)
    assert (m["poison_repaired_n"], m["clean_repaired_n"]) == (3, 1)


def test_detection_metrics_repaired_from_caption_index() -> None:
    # a filtering defense flags rows 0 and 1 as risky but re-pairs only row 0 (to caption 4)
    flagged = torch.tensor([True, True, False, False, False])
    ci = torch.tensor([4, 1, 2, 3, 4])
    m = detection_metrics(flagged, torch.tensor([0.0, 0.1, 0.5, 0.6, 0.7]), [True, True, False, False, False],
                          caption_index=ci)
    assert m["detect_precision"] == 1.0 and m["detect_recall"] == 1.0 and m["detect_auroc"] == 1.0
    assert m["poison_repaired"] == 0.5 and m["clean_repaired"] == 0.0
    assert "detect_auroc_score" not in m  # a bare tensor is the defense's own score only


def test_detection_metrics_undefined_values_are_none() -> None:
    m = detection_metrics(torch.zeros(3, dtype=torch.bool), torch.tensor([0.1, 0.2, 0.3]), ["", "", ""])
    assert m["detect_precision"] is None  # nothing flagged
    assert m["detect_recall"] is None  # nothing poisoned
    assert m["detect_auroc"] is None
    assert m["poison_repaired"] is None and m["clean_repaired"] == 0.0
    assert detection_metrics(torch.ones(2, dtype=torch.bool), None, [True, False])["detect_auroc"] is None


def test_detection_metrics_length_mismatch() -> None:
    with pytest.raises(ValueError, match="3 flags but 2 poison"):
        detection_metrics(torch.zeros(3, dtype=torch.bool), None, ["", ""])
    with pytest.raises(ValueError, match="score 'x' has 2 entries"):
        detection_metrics(torch.zeros(3, dtype=torch.bool), {"x": torch.zeros(2)}, ["", "", ""])


def test_poison_mask_accepts_names_bools_and_tensors() -> None:
    assert poison_mask(["", "badnet", ""]).tolist() == [False, True, False]
    assert poison_mask([True, False]).tolist() == [True, False]
    assert poison_mask(torch.tensor([0, 1])).tolist() == [False, True]
