"""The README's main table is the committed quickstart's, recomputed from its summary.csv."""

from __future__ import annotations

from pathlib import Path

from otcbench.bench.report import main_table

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- quickstart-table:start -->", "<!-- quickstart-table:end -->"


def test_readme_table_equals_the_committed_quickstart() -> None:
    readme = (ROOT / "README.md").read_text()
    assert readme.count(START) == 1 and readme.count(END) == 1
    quoted = readme.split(START, 1)[1].split(END, 1)[0].strip()
    expected = main_table(ROOT / "results" / "quickstart").strip()
    assert quoted == expected, (
        "README's quickstart table differs from results/quickstart/summary.csv; paste the output of\n"
        "  python -c \"from otcbench.bench.report import main_table; print(main_table('results/quickstart'))\"\n"
        f"between the markers. Expected:\n{expected}")


def test_readme_table_is_three_seeds_with_no_collapsed_clean_row() -> None:
    import pandas as pd

    df = pd.read_csv(ROOT / "results" / "quickstart" / "summary.csv")
    assert sorted(set(df["seed"])) == [0, 1, 2]
    assert (df["status"] == "done").all()
    clean = df[df["attack"] == "clean"]
    assert (clean["zeroshot_top1"] >= 2 / 12).all()  # the reference is a model that learnt
