"""``otcbench report DIR --compare REF`` and the recipe's ``reference`` (otcbench.bench.compare): hand-built
results directories in the summary.csv format, no training."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from otcbench.bench.compare import TWO_STD_THIS, WELCH, compare_results, compare_with_reference
from otcbench.bench.summary import HEAD, META
from otcbench.cli import app
from otcbench.errors import UserError

cli = CliRunner()


def results_dir(path: Path, cells: dict[tuple[str, str], dict[str, list[float]]], recipe: str = "demo") -> Path:
    """A results directory whose summary.csv holds one done run per seed of each (attack, defense) (a metric
    with fewer values than the cell's seeds is empty in the later ones)."""
    rows: list[dict[str, Any]] = []
    for (attack, defense), metrics in cells.items():
        for seed in range(max(len(v) for v in metrics.values())):
            row: dict[str, Any] = {"run_id": f"{attack}-{defense}-{seed}", "attack": attack, "defense": defense,
                                   "seed": seed, "status": "done", "seconds": 1.0, "attack_group": attack,
                                   "defense_group": defense, "defense_name": defense, "variant": defense}
            row.update({m: v[seed] if seed < len(v) else None for m, v in metrics.items()})
            rows.append(row)
    path.mkdir(parents=True)
    pd.DataFrame(rows, columns=HEAD + META + ["zeroshot_top1", "asr_backdoor"]).to_csv(path / "summary.csv",
                                                                                     index=False)
    (path / "results.json").write_text(json.dumps({"recipe": recipe}))
    return path


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """This run (three seeds) and a reference (three seeds, one cell with one seed), each with a cell the other
    lacks."""
    this = results_dir(tmp_path / "out" / "demo", {
        ("badnet", "none"): {"zeroshot_top1": [0.90, 0.91, 0.92], "asr_backdoor": [0.90, 0.95, 1.00]},
        ("badnet", "roclip"): {"zeroshot_top1": [0.60, 0.62, 0.61], "asr_backdoor": [0.10, 0.12, 0.11]},
        ("badnet", "safeclip"): {"zeroshot_top1": [0.80, 0.81, 0.79], "asr_backdoor": [0.30, 0.31, 0.29]}})
    ref = results_dir(tmp_path / "results" / "demo", {
        ("badnet", "none"): {"zeroshot_top1": [0.91, 0.90, 0.93], "asr_backdoor": [0.93, 0.95, 0.97]},
        ("badnet", "roclip"): {"zeroshot_top1": [0.61], "asr_backdoor": [0.40, 0.45, 0.50]},
        ("badnet", "otcclip"): {"zeroshot_top1": [0.40, 0.42, 0.41], "asr_backdoor": [0.12, 0.10, 0.11]}})
    return this, ref


def cell(table: pd.DataFrame, defense: str, metric: str) -> pd.Series:
    return table[(table["defense"] == defense) & (table["metric"] == metric)].iloc[0]


def test_compare_cells_inside_and_outside_the_spread_and_cells_in_one_table(pair: tuple[Path, Path]) -> None:
    table = compare_results(*pair)
    inside = cell(table, "none", "asr_backdoor")  # 95 ± 5 against 95 ± 2
    assert inside["present"] == "both" and inside["within"] is True and inside["rule"] == WELCH
    assert inside["diff"] == pytest.approx(0.0) and inside["p"] == pytest.approx(1.0)
    outside = cell(table, "roclip", "asr_backdoor")  # 11 ± 1 against 45 ± 5
    assert outside["within"] is False and outside["p"] < 0.05 and outside["diff"] == pytest.approx(-34.0)
    one_seed = cell(table, "roclip", "zeroshot_top1")  # the reference has one seed: 2 × this run's std decides
    assert one_seed["rule"] == TWO_STD_THIS and one_seed["within"] is True and math.isnan(one_seed["p"])
    assert one_seed["ref_n"] == 1 and one_seed["n"] == 3
    assert cell(table, "safeclip", "asr_backdoor")["present"] == "this"
    only_ref = cell(table, "otcclip", "asr_backdoor")
    assert only_ref["present"] == "reference" and only_ref["n"] == 0 and math.isnan(only_ref["mean"])
    assert only_ref["ref_n"] == 3 and math.isnan(only_ref["diff"]) and only_ref["within"] is None


def test_a_reference_row_kept_from_other_code_is_the_same_cell(pair: tuple[Path, Path]) -> None:
    # the reference's tables mark such a row "none ‡"; the comparison must still pair it with this run's "none"
    this, ref = pair
    df = pd.read_csv(ref / "summary.csv")
    df["other_code"] = ["yes" if d == "none" else "" for d in df["defense"]]
    df.to_csv(ref / "summary.csv", index=False)
    table = compare_results(this, ref)
    assert not table["defense"].str.contains("‡").any()
    none = cell(table, "none", "asr_backdoor")
    assert none["present"] == "both" and none["within"] is True


def test_report_compare_prints_the_comparison(pair: tuple[Path, Path]) -> None:
    this, ref = pair
    r = cli.invoke(app, ["report", str(this), "--compare", str(ref)])
    assert r.exit_code == 0, r.output
    assert f"### {this} against {ref}" in r.output
    assert "| badnet | none | ASR backdoor (%) ↓ | 95.0 ± 5.0 | 95.0 ± 2.0 | +0.0 | yes (Welch p = 1) |" in r.output
    assert "| badnet | roclip | ASR backdoor (%) ↓ | 11.0 ± 1.0 | 45.0 ± 5.0 | -34.0 | no (Welch p = " in r.output
    assert "| badnet | roclip | zero-shot top-1 (%) ↑ | 61.0 ± 1.0 | 61.0 | +0.0 | yes (one seed: 2 × this run's std" \
        in r.output
    assert "3 of 4 cells within the seed spread" in r.output
    assert f"- only in {this}: badnet × safeclip (zero-shot top-1, ASR backdoor)" in r.output
    assert f"- only in {ref}: badnet × otcclip (zero-shot top-1, ASR backdoor)" in r.output
    assert r.output.index("### demo\n") < r.output.index(" against ")  # after the report's own table


def test_report_compare_with_a_bad_reference_is_one_line(pair: tuple[Path, Path], tmp_path: Path) -> None:
    this, _ = pair
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "nothing", tmp_path / "empty"):
        r = cli.invoke(app, ["report", str(this), "--compare", str(bad)])
        assert r.exit_code == 2, r.output
        assert r.output.strip().splitlines() == [
            f"error: --compare {bad} is not a results directory (no summary.csv); pass a directory written by "
            "`otcbench run`"]
    r = cli.invoke(app, ["report", str(this), "--compare", str(this), "--format", "csv"])
    assert r.exit_code == 2 and "--compare prints markdown" in r.output
    with pytest.raises(UserError, match="is not a results directory"):
        compare_results(this, tmp_path / "empty")


def test_the_reference_is_compared_after_a_run_unless_it_is_the_run_itself(pair: tuple[Path, Path],
                                                                           tmp_path: Path) -> None:
    this, ref = pair
    assert "3 of 4 cells within the seed spread" in compare_with_reference(this, ref)
    assert compare_with_reference(this, this) == ""  # written over its own reference: nothing to compare
    assert compare_with_reference(this, tmp_path / "missing") == ""
    assert compare_with_reference(this, None) == ""


def test_run_writes_out_by_default_and_prints_the_comparison_with_the_recipe_reference(
        pair: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The grid itself is replaced by a stub that leaves this run's summary: what is tested is the default
    --out and the comparison printed after the table."""
    import shutil
    from types import SimpleNamespace

    import otcbench.bench.runner as runner
    from otcbench.bench.plan import plan_recipe
    from otcbench.bench.recipe import load_recipe

    this, ref = pair
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "demo.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "demo", "data": {"synth": {"n_train": 64}}, "attacks": ["badnet"], "defenses": ["none"],
        "reference": "results/demo"}))
    assert plan_recipe(load_recipe(recipe)[0]).out == Path("out") / "demo"  # never results/<name>
    shutil.rmtree(this)  # the stub copies it back where the run writes

    def fake_execute(plan: Any, **_: Any) -> Any:
        shutil.copytree(tmp_path / "keep", plan.out)
        return SimpleNamespace(table_md="### demo\n", outcomes=[], failed=[])

    results_dir(tmp_path / "keep", {("badnet", "none"): {"zeroshot_top1": [0.90, 0.91, 0.92],
                                                         "asr_backdoor": [0.90, 0.95, 1.00]}})
    monkeypatch.setattr(runner, "execute_plan", fake_execute)
    r = cli.invoke(app, ["run", str(recipe), "--no-plots"])
    assert r.exit_code == 0, r.output
    assert "### out/demo against results/demo" in r.output and "2 of 2 cells within the seed spread" in r.output
    assert (ref / "summary.csv").is_file() and not (ref / "table.md").exists()  # the reference is left alone
