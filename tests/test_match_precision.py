"""Match precision and hub statistics (otcbench.eval.matching) on hand-built assignments."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from otcbench.eval.matching import caption_describes, match_statistics


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
