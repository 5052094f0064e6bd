"""``otcbench run`` and ``otcbench report``: a recipe's grid of runs and its tables (registered by otcbench.cli)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from otcbench import render
from otcbench.commands.common import SetOpt, console, err_console, flag, handle_errors, progress_enabled, quiet_datasets
from otcbench.errors import UserError


@handle_errors
def run_cmd(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML file, or the name of a shipped recipe.")],
    set_: SetOpt = None,
    out: Annotated[Path | None, typer.Option(
        "--out", help="Results directory (default out/<name>; the committed results/ are references).")] = None,
    resume: Annotated[bool, flag("--resume", help="Continue interrupted or failed runs.")] = False,
    keep_other_code: Annotated[bool, flag(
        "--keep-other-code", help="Keep finished runs made by other code (another code fingerprint) instead of "
        "re-running them; the tables mark their rows ‡.")] = False,
    jobs: Annotated[int | None, typer.Option(
        "--jobs", "-j", help="Runs trained at once (worker processes; default: the recipe's `jobs`).")] = None,
    dry_run: Annotated[bool, flag("--dry-run", help="Validate and list the grid; run nothing.")] = False,
    no_plots: Annotated[bool, flag("--no-plots", help="Skip the PNG plots.")] = False,
    no_progress: Annotated[bool, flag("--no-progress", help="No progress bars (shown on a terminal only).")] = False,
) -> None:
    """Run a recipe: the attacks × defenses × seeds grid, cached and resumable; prints the results table and,
    when the recipe names a `reference` results directory that exists, the comparison with it (`report --compare`).

    Examples: otcbench run recipes/quickstart.yaml; otcbench run quickstart --set train.epochs=2 --out
    results/short; otcbench run quickstart --set defenses.cleanclip.train.epochs=5; otcbench run quickstart
    --resume (after an interruption); otcbench run quickstart --jobs 2 (two runs at once)
    """
    from otcbench.bench.plan import plan_recipe
    from otcbench.bench.recipe import load_recipe
    from otcbench.bench.runner import execute_plan

    quiet_datasets()
    if jobs is not None and jobs < 1:
        raise UserError(f"--jobs {jobs}: give at least 1")
    rec, path = load_recipe(recipe, set_)
    command = _run_command(recipe, set_, out, resume, keep_other_code, jobs, no_plots)
    jobs = rec.jobs if jobs is None else jobs
    plan = plan_recipe(rec, out, resume=resume, keep_other_code=keep_other_code)
    if dry_run:
        console.print(render.plan_table(plan, jobs))
        return
    result = execute_plan(plan, jobs=jobs, show_progress=progress_enabled(no_progress), console=err_console,
                          recipe_file=path, plots=not no_plots, command=command)
    typer.echo(result.table_md)
    _print_reference(plan.out, rec.reference)
    counts = {a: sum(o.action == a for o in result.outcomes) for a in ("trained", "resumed", "cached", "failed")}
    done = ", ".join(f"{n} {a}" for a, n in counts.items() if n)
    console.print(f"{len(result.outcomes)} runs ({done}); results in [bold]{plan.out}[/] "
                  "(summary.csv, table.md, table.tex, plots/)", highlight=False)
    if result.failed:
        raise typer.Exit(code=1)


def _run_command(recipe: str, set_: list[str] | None, out: Path | None, resume: bool, keep_other_code: bool,
                 jobs: int | None, no_plots: bool) -> str:
    """The invocation as results.json records it: the options that shape the results, no absolute path."""
    from otcbench.provenance import command_line

    args = ["run", recipe, *(a for item in set_ or [] for a in ("--set", item))]
    args += ["--out", str(out)] if out is not None else []
    args += ["--resume"] * resume + ["--keep-other-code"] * keep_other_code + ["--no-plots"] * no_plots
    args += ["--jobs", str(jobs)] if jobs is not None else []
    return command_line(args)


def _print_reference(out: Path, reference: str | None) -> None:
    """The comparison with the recipe's reference after a run; a bad reference is a warning, not a failed run
    (the results are written by then)."""
    from otcbench.bench.compare import compare_with_reference

    try:
        text = compare_with_reference(out, reference)
    except UserError as err:
        err_console.print(f"[yellow]warning:[/] no comparison with the reference: {err}", highlight=False,
                          soft_wrap=True)
        return
    if text:
        typer.echo(text)
    elif reference is not None and not Path(reference).exists():
        err_console.print(f"reference {reference} does not exist here: no comparison", highlight=False,
                          soft_wrap=True)


@handle_errors
def report_cmd(
    results: Annotated[Path, typer.Argument(help="Results directory written by `otcbench run`.")],
    fmt: Annotated[str, typer.Option("--format", help="What to print: md, csv or latex.")] = "md",
    plots: Annotated[bool, flag("--plots", help="Also rebuild the PNG plots.")] = False,
    compare: Annotated[Path | None, typer.Option(
        "--compare", help="Another results directory (a reference): print each shared cell of both, their "
        "difference and whether it lies within the seed spread (markdown only).")] = None,
) -> None:
    """Rebuild table.md and table.tex (and with --plots the PNGs) from RESULTS/summary.csv; print a table.

    Examples: otcbench report results/quickstart --format latex --plots; otcbench report out/quickstart
    --compare results/quickstart
    """
    from otcbench.bench.layout import SUMMARY, TABLE_TEX
    from otcbench.bench.report import write_report

    if fmt not in ("md", "csv", "latex"):
        raise UserError(f"--format {fmt!r}: use md, csv or latex")
    if compare is not None and fmt != "md":
        raise UserError(f"--compare prints markdown; drop --format {fmt} (compare_results in "
                        "otcbench.bench.compare gives the same as a DataFrame)")
    comparison = ""
    if compare is not None:  # before any file is rewritten: a bad reference changes nothing
        from otcbench.bench.compare import compare_markdown, compare_results

        comparison = compare_markdown(compare_results(results, compare), results, compare)
    md = write_report(results, plots=plots)
    if fmt == "md":
        typer.echo(md)
        if comparison:
            typer.echo(comparison)
    elif fmt == "csv":
        typer.echo((results / SUMMARY).read_text(), nl=False)  # what made each run is in its columns
    else:
        typer.echo((results / TABLE_TEX).read_text(), nl=False)


@handle_errors
def detect_cmd(
    results: Annotated[Path, typer.Argument(help="Results directory of `otcbench run` (with its runs/ and data/).")],
    detector: Annotated[list[str] | None, typer.Option(
        "--detector", help="Embedding detectors to compare (default: knn and dao; repeatable).")] = None,
    defense: Annotated[list[str] | None, typer.Option(
        "--defense", help="Data-side steps whose scores are compared (default: otcclip and safeclip; repeatable; "
        "safeclip alone also shows its own-pair cosine, the cheapest global score).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N.")] = "auto",
    redo: Annotated[bool, flag("--redo", help="Recompute defend outputs that already exist.")] = False,
) -> None:
    """The detector table: every undefended run's model scores its own training pairs with OTCCLIP's OT and
    global scores, SafeCLIP's GMM and the embedding detectors (`defend`); AUROC and precision@poison-count per
    score and attack in RESULTS/detectors.csv, detectors.md and plots/detectors.png.

    Example: otcbench detect results/peers --detector knn --detector dao
    """
    from otcbench.bench.detector_table import (
        DEFAULT_DETECTORS,
        DEFAULT_STEPS,
        run_detector_grid,
        steps_for,
        write_detector_report,
    )
    from otcbench.defenses.defend import detector_specs

    quiet_datasets()
    specs = detector_specs(detector, None) if detector else list(DEFAULT_DETECTORS)
    steps = steps_for(defense) if defense else list(DEFAULT_STEPS)
    run_detector_grid(results, steps=steps, detectors=specs, device=device, redo=redo, log=console.print)
    typer.echo(write_detector_report(results))
