"""Match precision and hub statistics (otcbench.eval.matching) on hand-built assignments."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from otcbench.eval.matching import binding_overlap, caption_describes, match_statistics


def data(content: list[str] | None = None) -> SimpleNamespace:
    # rows 0, 1: class 0; rows 2, 3: class 1 (row 3 a targeted poison); row 4: class 2
    return SimpleNamespace(labels=torch.tensor([0, 0, 1, 1, 2]), poison=["", "", "", "targeted", ""], content=content)


def test_precision_by_label_counts_clean_captions_of_the_image_class() -> None:
    assigned = torch.tensor([1, 0, 3, 2, 4])  # row 4 keeps its own caption: not in the denominators
    s = match_statistics(data(), assigned, {"global": torch.tensor([1, 1, 1, 1, 4])})
    # 0->1 and 1->0 same class, 2->3 a poisoned caption, 3->2 same class and clean
    assert s["match_precision"] == pytest.approx(3 / 4) == s["match_class_precision"]
    assert (s["match_n"], s["match_distinct"], s["match_largest_group"]) == (4, 4, 1)
    # the alternative: 0 keeps its own; 1, 2, 3 all take caption 1 (class 0): right for row 1 only
    assert s["match_precision_global"] == pytest.approx(1 / 3) and s["match_n_global"] == 3


def test_precision_by_content_needs_the_same_composition() -> None:
    d = data(["red circle|blue square", "blue circle|red square", "a", "a", "b"])
    s = match_statistics(d, torch.tensor([1, 0, 3, 2, 4]))
    assert s["match_precision"] == pytest.approx(1 / 4)  # a binding swap is not a match; only 3 -> 2
    assert s["match_class_precision"] == pytest.approx(3 / 4)
    ok, known = caption_describes(d, torch.tensor([0]), torch.tensor([1]))
    assert ok.tolist() == [False] and known.tolist() == [True]


def test_rows_without_ground_truth_and_no_moves() -> None:
    d = SimpleNamespace(labels=torch.tensor([-1, -1, 0]), poison=["", "", ""], content=["", "", ""])
    s = match_statistics(d, torch.tensor([1, 0, 2]))
    assert s["match_precision"] is None and s["match_n"] == 2  # unknown truth: no precision, not zero
    s = match_statistics(d, torch.arange(3), {"ot": torch.full((3,), -1)})
    assert s["match_precision"] is None and s["match_n"] == 0 and "match_precision_ot" not in s


def test_binding_overlap_grades_partial_and_swapped_matches() -> None:
    d = data(["red circle|blue square", "blue circle|red square", "red circle|green star",
              "red circle|blue square", "red circle"])  # row 3 is a poisoned caption row
    bind, shape = binding_overlap(d, torch.tensor([0, 0, 0, 0, 0]), torch.tensor([1, 2, 4, 3, 0]))
    # a binding swap shares no binding but both shapes; one shared binding of three; a subset; poison: 0
    assert bind.tolist() == pytest.approx([0.0, 1 / 3, 1 / 2, 0.0, 1.0])
    assert shape.tolist() == pytest.approx([1.0, 1 / 3, 1 / 2, 0.0, 1.0])
    s = match_statistics(d, torch.tensor([1, 0, 4, 3, 4]), {"ot": torch.tensor([2, 0, 0, 3, 4])})
    # moved: 0->1 (0), 1->0 (0), 2->4 (1/2); 3 and 4 keep their own captions
    assert s["match_overlap"] == pytest.approx(1 / 6) and s["match_shape_overlap"] == pytest.approx(5 / 6)
    # ot moved 0->2 (1/3), 1->0 (0), 2->0 (1/3)
    assert s["match_overlap_ot"] == pytest.approx(2 / 9)
    assert binding_overlap(data(), torch.tensor([0]), torch.tensor([1])) is None  # no content: no overlap


def test_random_reference_is_a_fixed_derangement() -> None:
    n = 50
    d = SimpleNamespace(labels=torch.arange(n) % 5, poison=[""] * n, content=None)
    s1 = match_statistics(d, torch.arange(n))
    s2 = match_statistics(d, torch.arange(n))
    assert s1["match_n_random"] == n  # every row takes another row's caption
    assert s1["match_precision_random"] == s2["match_precision_random"]  # deterministic
    assert 0.0 <= s1["match_precision_random"] <= 0.5  # near chance (1/5), far from the labels' 1.0
    assert "match_overlap_random" not in s1  # no content
