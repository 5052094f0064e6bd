"""Tables and plots from a hand-written summary.csv (no training): mean ± std, bolding, LaTeX, PNGs, CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from otcbench.bench.logs import DETECTION_COLUMNS, detection_curves, loss_curve
from otcbench.bench.plots import attack_markers, write_plots
from otcbench.bench.report import (
    HEAD,
    META,
    aggregate,
    latex_table,
    lower_is_better,
    markdown_table,
    overview_table,
    read_summary,
    write_report,
)
from otcbench.cli import app
from otcbench.errors import UserError

cli = CliRunner()


def row(run_id: str, attack: str, defense: str, seed: int, status: str = "done", sweep: str = "",
        sweep_value: Any = "", error: str = "", **metrics: float) -> dict[str, Any]:
    r: dict[str, Any] = {"run_id": run_id, "attack": attack, "defense": defense, "seed": seed, "status": status,
                         "seconds": 10.0, "attack_group": attack.split(" ")[0], "defense_group": defense,
                         "defense_name": defense, "sweep": sweep, "sweep_value": sweep_value, "defense_sweep": "",
                         "defense_sweep_value": "", "error": error}
    r.update(metrics)
    return r


def summary(tmp_path: Path) -> Path:
    """clean × none; badnet × {none, roclip} over 3 seeds (one roclip seed failed); a rate sweep."""
    rows = [
        row("c0", "clean", "none", 0, zeroshot_top1=0.80, linear_probe_top1=0.85),
        row("n0", "badnet", "none", 0, zeroshot_top1=0.70, linear_probe_top1=0.80, asr_backdoor=0.90,
            asr_backdoor_n=704),
        row("n1", "badnet", "none", 1, zeroshot_top1=0.72, linear_probe_top1=0.82, asr_backdoor=0.95,
            asr_backdoor_n=704),
        row("n2", "badnet", "none", 2, zeroshot_top1=0.74, linear_probe_top1=0.81, asr_backdoor=1.00,
            asr_backdoor_n=704),
        row("r0", "badnet", "roclip", 0, zeroshot_top1=0.75, linear_probe_top1=0.79, asr_backdoor=0.10,
            asr_backdoor_n=704),
        row("r1", "badnet", "roclip", 1, zeroshot_top1=0.77, linear_probe_top1=0.80, asr_backdoor=0.20,
            asr_backdoor_n=704),
        row("r2", "badnet", "roclip", 2, status="failed", error="RuntimeError: out of memory"),
        row("s1", "badnet rate=0.005", "none", 0, sweep="badnet.rate", sweep_value=0.005, zeroshot_top1=0.78,
            asr_backdoor=0.40),
        row("s2", "badnet rate=0.005", "roclip", 0, sweep="badnet.rate", sweep_value=0.005, zeroshot_top1=0.77,
            asr_backdoor=0.00),
        row("s3", "badnet rate=0.02", "none", 0, sweep="badnet.rate", sweep_value=0.02, zeroshot_top1=0.70,
            asr_backdoor=0.99),
        row("s4", "badnet rate=0.02", "roclip", 0, sweep="badnet.rate", sweep_value=0.02, zeroshot_top1=0.74,
            asr_backdoor=0.05),
    ]
    out = tmp_path / "res"
    out.mkdir()
    pd.DataFrame(rows, columns=HEAD + META + ["zeroshot_top1", "linear_probe_top1", "asr_backdoor",
                                              "asr_backdoor_n"]).to_csv(out / "summary.csv", index=False)
    (out / "results.json").write_text(json.dumps({"recipe": "demo"}))
    return out


def test_direction_of_metrics() -> None:
    assert lower_is_better("asr_backdoor") and lower_is_better("asr_targeted") and lower_is_better("clean_repaired")
    assert not lower_is_better("zeroshot_top1") and not lower_is_better("detect_auroc")


def test_aggregate_mean_std_and_counts(tmp_path: Path) -> None:
    agg = aggregate(read_summary(summary(tmp_path)))
    none = agg[(agg["attack"] == "badnet") & (agg["defense"] == "none")].iloc[0]
    assert none["n_done"] == 3 and none["n_runs"] == 3
    assert none["asr_backdoor_mean"] == pytest.approx(0.95)
    assert none["asr_backdoor_std"] == pytest.approx(0.05)  # sample std (n - 1)
    roclip = agg[(agg["attack"] == "badnet") & (agg["defense"] == "roclip")].iloc[0]
    assert (roclip["n_done"], roclip["n_runs"], roclip["n_failed"]) == (2, 3, 1)  # the failed seed is left out
    assert roclip["zeroshot_top1_mean"] == pytest.approx(0.76)
    assert list(agg["attack"]) == ["clean", "badnet", "badnet", "badnet rate=0.005", "badnet rate=0.005",
                                   "badnet rate=0.02", "badnet rate=0.02"]  # recipe order, not sorted


def test_markdown_table_formatting_and_bold(tmp_path: Path) -> None:
    md = markdown_table(read_summary(summary(tmp_path)), "demo")
    lines = md.splitlines()
    assert lines[0] == "### demo"
    assert lines[2] == "| attack | defense | seeds | zero-shot top-1 (%) ↑ | linear probe (%) ↑ | ASR backdoor (%) ↓ |"
    assert lines[3] == "|---|---|---:|---:|---:|---:|"
    # a single row in its attack: nothing to compare, nothing bold; no ASR without an attack
    assert lines[4] == "| clean | none | 1/1 | 80.0 | 85.0 | – |"
    # bold: the best of its attack (highest accuracy, lowest ASR) when it beats the runner-up beyond the seed
    # spread (linear probe 81.0 ± 1.0 against 79.5 ± 0.7 does not); mean ± sample std over the finished seeds
    assert lines[5] == "| badnet | none | 3/3 | 72.0 ± 2.0 | 81.0 ± 1.0 | 95.0 ± 5.0 |"
    assert lines[6] == "| badnet | roclip | 2/3 (1 failed) | **76.0 ± 1.4** | 79.5 ± 0.7 | **15.0 ± 7.1** |"
    # one seed: no spread, nothing bold
    assert lines[7] == "| badnet rate=0.005 | none | 1/1 | 78.0 | – | 40.0 |"
    assert lines[8] == "| badnet rate=0.005 | roclip | 1/1 | 77.0 | – | 0.0 |"
    assert "- failed: badnet × roclip (seed 2, run r2): RuntimeError: out of memory" in md
    assert "only when it beats the runner-up (the best other ranked cell) beyond the seed spread" in md
    assert "- nothing bold in linear probe: no cell beats the runner-up beyond the seed spread" in md


def test_latex_table(tmp_path: Path) -> None:
    tex = latex_table(read_summary(summary(tmp_path)), "demo")
    assert r"\begin{tabular}{llrrrr}" in tex and r"\toprule" in tex and r"\bottomrule" in tex
    assert r"badnet & roclip & 2/3 (1 failed) & \textbf{76.0 $\pm$ 1.4} & 79.5 $\pm$ 0.7 & \textbf{15.0 $\pm$ 7.1} \\" \
        in tex
    assert r"ASR backdoor (\%) $\downarrow$" in tex
    assert tex.count(r"\midrule") == 4  # after the header, then between attacks


def test_plots_are_valid_pngs(tmp_path: Path) -> None:
    out = summary(tmp_path)
    # a training log for one run: curves come from runs/<id>/log.jsonl
    (out / "runs" / "n0").mkdir(parents=True)
    (out / "runs" / "n0" / "log.jsonl").write_text(
        "\n".join(json.dumps({"type": "step", "step": s, "epoch": 0, "loss": 4.0 / s}) for s in range(1, 6))
        + '\n{"type": "epoch", "epoch": 0, "step": 5, "loss": 2.0}\n{"torn')
    files = write_plots(read_summary(out), out)
    assert sorted(p.name for p in files) == ["asr_vs_accuracy.png", "asr_vs_rate.png", "curves.png", "summary.png"]
    for p in files:
        with Image.open(p) as img:
            img.verify()
            assert img.format == "PNG" and img.size[0] > 300


def test_write_report_and_cli(tmp_path: Path) -> None:
    out = summary(tmp_path)
    md = write_report(out, plots=False)
    assert (out / "table.md").read_text() == md and (out / "table.tex").is_file()
    assert not (out / "plots").exists()
    r = cli.invoke(app, ["report", str(out), "--plots"])
    assert r.exit_code == 0, r.output
    assert md in r.output and (out / "plots" / "asr_vs_accuracy.png").is_file()
    r = cli.invoke(app, ["report", str(out), "--format", "latex"])
    assert r.exit_code == 0 and r.output == (out / "table.tex").read_text()
    r = cli.invoke(app, ["report", str(out), "--format", "csv"])
    assert r.exit_code == 0 and r.output == (out / "summary.csv").read_text()
    r = cli.invoke(app, ["report", str(out), "--format", "html"])
    assert r.exit_code == 2 and "use md, csv or latex" in r.output
    r = cli.invoke(app, ["report", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and "nothing does not exist; pass a results directory" in r.output


def test_bad_summary_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "summary.csv").write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match=r"lacks the columns run_id, attack"):
        read_summary(tmp_path)


def test_a_collapsed_model_is_marked_and_never_wins_an_asr_column(tmp_path: Path) -> None:
    """12 classes: zero-shot below 2/12 means the model recognises nothing; its 0 % ASR is not a defense
    (one seed: nothing bold; tests/test_tables_rule.py ranks the same over seeds)."""
    rows = [row("n0", "badnet", "none", 0, zeroshot_top1=0.90, asr_backdoor=0.80, n_classes=12),
            row("r0", "badnet", "roclip", 0, zeroshot_top1=0.09, asr_backdoor=0.00, n_classes=12),
            row("o0", "badnet", "otcclip", 0, zeroshot_top1=0.88, asr_backdoor=0.05, n_classes=12)]
    df = pd.DataFrame(rows, columns=HEAD + META + ["zeroshot_top1", "asr_backdoor", "n_classes"])
    lines = markdown_table(df).splitlines()
    assert lines[2] == "| badnet | none | 1/1 | 90.0 | 80.0 |"
    assert lines[3] == "| badnet | roclip † | 1/1 | 9.0 | 0.0 |"
    assert lines[4] == "| badnet | otcclip | 1/1 | 88.0 | 5.0 |"
    assert "† zero-shot below twice chance" in markdown_table(df)


def test_overview_is_attack_by_defense_with_partial_cells_marked(tmp_path: Path) -> None:
    df = read_summary(summary(tmp_path))
    lines = overview_table(df, "demo").splitlines()
    assert lines[0] == "### demo: at a glance"
    assert lines[2] == "| attack | metric | none | roclip |"
    assert lines[4] == "| clean | zero-shot top-1 ↑ | 80.0 |  |"  # the clean reference: accuracy, no ASR
    # roclip's third seed failed: its cell says 2 of 3 seeds; the row's lowest ASR beats the runner-up: bold
    assert lines[5] == "| badnet | ASR backdoor ↓ | 95.0 ± 5.0 | **15.0 ± 7.1** (2/3) |"
    assert lines[6] == "| badnet rate=0.005 | ASR backdoor ↓ | 40.0 | 0.0 |"  # one seed: not bold
    # every finished run of a defense: none (.80 .70 .72 .74 .78 .70) and roclip (.75 .77 .77 .74)
    assert lines[8] == "| *all attacks* | zero-shot top-1 ↑ | 74.0 (n=6) | 75.8 (n=4) |"


def test_overview_gives_both_asrs_of_a_combined_attack_and_never_ranks_a_collapsed_model() -> None:
    rows = [row("n0", "targeted+badnet", "none", 0, zeroshot_top1=0.90, asr_targeted=1.0, asr_backdoor=0.9,
                n_classes=12),
            row("r0", "targeted+badnet", "roclip", 0, zeroshot_top1=0.05, asr_targeted=0.0, asr_backdoor=0.0,
                n_classes=12),
            row("o0", "targeted+badnet", "otcclip", 0, zeroshot_top1=0.88, asr_targeted=0.0625,
                asr_backdoor=0.01, n_classes=12)]
    df = pd.DataFrame(rows, columns=HEAD + META + ["zeroshot_top1", "asr_targeted", "asr_backdoor", "n_classes"])
    lines = overview_table(df).splitlines()
    assert lines[4] == "| targeted+badnet | ASR targeted ↓ | 100.0 | 0.0 † | 6.2 |"  # one seed: nothing bold
    assert lines[5] == "| targeted+badnet | ASR backdoor ↓ | 90.0 | 0.0 † | 1.0 |"


def test_table_md_holds_the_overview_after_the_full_table(tmp_path: Path) -> None:
    out = summary(tmp_path)
    md = write_report(out, plots=False)
    assert md.index("### demo\n") < md.index("### demo: at a glance")
    assert (out / "table.md").read_text() == md


def test_every_synthetic_full_attack_gets_its_own_marker(tmp_path: Path) -> None:
    """The 11-marker list gave targeted and adaptive-spread the same square in synthetic-full's plot."""
    from otcbench.bench.recipe import load_recipe
    from otcbench.bench.runner import plan_recipe

    rec, _ = load_recipe("synthetic-full", [])
    attacks = list(dict.fromkeys(r.attack.label for r in plan_recipe(rec, tmp_path / "res").runs))
    assert len(attacks) == 13
    assert len(set(attack_markers(attacks).values())) == len(attacks)


def test_detection_curves_from_logs_and_plot(tmp_path: Path) -> None:
    """OTCCLIP's filter and SafeCLIP's risky set are read per data step; other runs and records are ignored."""
    out = summary(tmp_path)
    df = read_summary(out)
    df.loc[df["run_id"] == "r0", "defense"] = "otcclip"  # a filtering defense on two seeds of badnet
    df.loc[df["run_id"] == "r1", "defense"] = "otcclip"

    def log(run_id: str, *recs: dict[str, Any]) -> None:
        (out / "runs" / run_id).mkdir(parents=True)
        (out / "runs" / run_id / "log.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n{\"torn")

    step = {"type": "step", "step": 1, "epoch": 0, "loss": 3.0}
    log("r0", step, {"type": "otcclip_match", "epoch": 1, "poison_filtered": 0.2},
        {"type": "otcclip_match", "epoch": 3, "poison_filtered": 0.6})
    log("r1", step, {"type": "otcclip_match", "epoch": 1, "poison_filtered": 0.4},
        {"type": "otcclip_match", "epoch": 3, "poison_filtered": 0.8})
    log("n0", step, {"type": "safeclip", "epoch": 6, "risky_poison_recall": 0.9},
        {"type": "otcclip_match", "epoch": 1, "repaired": 0.3})  # a match record without poison: no point
    log("c0", step)

    curves = detection_curves(df, out)
    assert list(curves.columns) == DETECTION_COLUMNS
    got = {(r.run_id, r.epoch): r.caught for r in curves.itertuples()}
    assert got == {("r0", 1): 0.2, ("r0", 3): 0.6, ("r1", 1): 0.4, ("r1", 3): 0.8, ("n0", 6): 0.9}
    assert set(curves.loc[curves["run_id"] == "r0", "attack"]) == {"badnet"}
    mean = curves[curves["defense"] == "otcclip"].groupby("epoch")["caught"].mean()
    assert mean.to_dict() == pytest.approx({1: 0.3, 3: 0.7})
    assert loss_curve(out / "runs" / "r0" / "log.jsonl").to_dict("list") == {"step": [1], "loss": [3.0]}

    files = write_plots(df, out)
    assert out / "plots" / "detection.png" in files
    with Image.open(out / "plots" / "detection.png") as img:
        img.verify()
        assert img.format == "PNG"
    assert detection_curves(df[df["run_id"] == "c0"], out).empty  # no filtering defense: no plot


def test_match_curves_from_logs_and_plot(tmp_path: Path) -> None:
    """Match precision of OTCCLIP and RoCLIP matchings: the used assignment and both scores' picks, per epoch."""
    from otcbench.bench.logs import MATCH_COLUMNS, match_curves

    out = summary(tmp_path)
    df = read_summary(out)

    def log(run_id: str, *recs: dict[str, Any]) -> None:
        (out / "runs" / run_id).mkdir(parents=True)
        (out / "runs" / run_id / "log.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")

    log("r0", {"type": "otcclip_match", "epoch": 1, "match_precision": 0.5, "match_n": 10,
               "match_precision_ot": 0.5, "match_n_ot": 10, "match_precision_global": 0.25, "match_n_global": 8},
        {"type": "otcclip_match", "epoch": 3, "match_precision": None, "match_n": 0})  # nothing re-assigned
    log("r1", {"type": "roclip_match", "epoch": 1, "match_precision": 0.9, "match_n": 4},
        {"type": "step", "epoch": 1, "match_precision": 0.1})  # not a matching record
    curves = match_curves(df, out)
    assert list(curves.columns) == MATCH_COLUMNS
    got = {(r.run_id, r.epoch, r.score): (r.precision, r.n) for r in curves.itertuples()}
    assert got == {("r0", 1, "used"): (0.5, 10), ("r0", 1, "ot"): (0.5, 10), ("r0", 1, "global"): (0.25, 8),
                   ("r1", 1, "used"): (0.9, 4)}
    files = write_plots(df, out)
    assert out / "plots" / "match_precision.png" in files
    with Image.open(out / "plots" / "match_precision.png") as img:
        img.verify()


def test_report_tabulates_match_precision_and_keeps_it_without_logs(tmp_path: Path) -> None:
    from otcbench.bench.report import MATCH_FILE, write_report

    out = summary(tmp_path)
    (out / "runs" / "r0").mkdir(parents=True)
    (out / "runs" / "r0" / "log.jsonl").write_text(json.dumps(
        {"type": "otcclip_match", "epoch": 1, "match_precision": 0.5, "match_n": 10, "match_precision_ot": 0.5,
         "match_n_ot": 10, "match_precision_global": 0.25, "match_n_global": 8}) + "\n")
    md = write_report(out, plots=False)
    assert "match precision" in md and "| 2 | 50.0 | 50.0 | 25.0 | – | 10 |" in md  # epoch 1 is the 2nd epoch
    assert "binding overlap" not in md  # no content in these rows: no overlap table
    assert (out / MATCH_FILE).is_file()
    import shutil

    shutil.rmtree(out / "runs")  # a committed results directory without its logs reports the same
    assert write_report(out, plots=False) == md


def test_report_tabulates_binding_overlap_and_random_reference(tmp_path: Path) -> None:
    from otcbench.bench.logs import match_curves
    from otcbench.bench.report import write_report

    out = summary(tmp_path)
    (out / "runs" / "r0").mkdir(parents=True)
    (out / "runs" / "r0" / "log.jsonl").write_text(json.dumps(
        {"type": "otcclip_match", "epoch": 1, "match_precision": 0.0, "match_n": 10, "match_overlap": 0.5,
         "match_shape_overlap": 0.75, "match_precision_ot": 0.1, "match_n_ot": 10, "match_overlap_ot": 0.4,
         "match_shape_overlap_ot": 0.6, "match_precision_random": 0.0, "match_n_random": 12,
         "match_overlap_random": 0.125, "match_shape_overlap_random": 0.25}) + "\n")
    curves = match_curves(read_summary(out), out)
    rnd = curves[curves["score"] == "random"].iloc[0]
    assert (rnd.precision, rnd.n, rnd.overlap, rnd.shape_overlap) == (0.0, 12, 0.125, 0.25)
    md = write_report(out, plots=True)
    assert "| 2 | 0.0 | 10.0 | – | 0.0 | 10 |" in md
    assert "binding overlap" in md and "| 2 | 50.0 | 40.0 | – | 12.5 | 75.0 | 60.0 | – | 25.0 |" in md
    assert (out / "plots" / "match_overlap.png").is_file()
