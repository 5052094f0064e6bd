"""``otcbench run`` and ``otcbench report``: a recipe's grid of runs and its tables (registered by otcbench.cli)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Any

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
    dry_run: Annotated[bool, flag("--dry-run", help="Validate and list the grid; run nothing (with --launcher "
                                  "slurm: each run's job and what would be submitted).")] = False,
    no_plots: Annotated[bool, flag("--no-plots", help="Skip the PNG plots.")] = False,
    no_progress: Annotated[bool, flag("--no-progress", help="No progress bars (shown on a terminal only).")] = False,
    launcher: Annotated[str | None, typer.Option(
        "--launcher", help="local (default: this machine, --jobs at a time) or slurm (one job per run through "
        "submitit; the recipe's launcher: keys, docs/scale.md).")] = None,
    print_commands: Annotated[bool, flag(
        "--print-commands", help="Print one otcbench command per pending step (data first, a run after the run "
        "it starts from) for any scheduler; run nothing.")] = False,
    stage: Annotated[str | None, typer.Option(
        "--stage", help="data: build the world and the poisoned datasets the pending runs need, nothing else.")] = None,
    only: Annotated[list[str] | None, typer.Option(
        "--only", help="Train and evaluate just this run (repeatable; ids from --dry-run); other runs of the grid "
        "may be in progress elsewhere.")] = None,
) -> None:
    """Run a recipe: the attacks × defenses × seeds grid, cached and resumable; prints the results table and,
    when the recipe names a `reference` results directory that exists, the comparison with it (`report --compare`).

    Examples: otcbench run recipes/quickstart.yaml; otcbench run quickstart --set train.epochs=2 --out
    results/short; otcbench run quickstart --set defenses.cleanclip.train.epochs=5; otcbench run quickstart
    --resume (after an interruption); otcbench run quickstart --jobs 2 (two runs at once); otcbench run cc3m-rn50
    --launcher slurm --set launcher.partition=gpu (a job per run); otcbench run quickstart --print-commands
    """
    from otcbench.bench.recipe import load_recipe
    from otcbench.bench.runner import execute_plan

    quiet_datasets()
    if jobs is not None and jobs < 1:
        raise UserError(f"--jobs {jobs}: give at least 1")
    _check_modes(launcher, print_commands, stage, only, dry_run)
    if launcher == "slurm":
        from otcbench.commands.jobs import require_submitit

        require_submitit()
    rec, path = load_recipe(recipe, set_)
    if launcher == "slurm" or print_commands or stage or only:
        from otcbench.commands.jobs import launcher_options

        opts = launcher_options(rec) if launcher == "slurm" else None
        step_plan = _step_plan(rec, out, resume=resume or launcher == "slurm" or bool(stage or only),
                               keep_other_code=keep_other_code, trains=bool(only))
        _run_step(step_plan, recipe, set_, resume, keep_other_code, path, opts, print_commands, stage, only,
                  dry_run, no_progress)
        return
    command = _run_command(recipe, set_, out, resume, keep_other_code, jobs, no_plots)
    jobs = rec.jobs if jobs is None else jobs
    plan = _local_plan(rec, out, resume=resume, keep_other_code=keep_other_code, dry_run=dry_run)
    if dry_run:
        console.print(render.plan_table(plan, jobs))
        return
    _refuse_in_flight(plan, recipe)
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
                 jobs: int | None, no_plots: bool, launcher: str | None = None) -> str:
    """The invocation as results.json records it: the options that shape the results, no absolute path."""
    from otcbench.provenance import command_line

    args = ["run", recipe, *(a for item in set_ or [] for a in ("--set", item))]
    args += ["--out", str(out)] if out is not None else []
    args += ["--resume"] * resume + ["--keep-other-code"] * keep_other_code + ["--no-plots"] * no_plots
    args += ["--jobs", str(jobs)] if jobs is not None else []
    args += ["--launcher", launcher] if launcher is not None else []
    return command_line(args)


def _check_modes(launcher: str | None, print_commands: bool, stage: str | None, only: list[str] | None,
                 dry_run: bool) -> None:
    """Options that cannot go together, each refused in one line before the recipe is read."""
    from otcbench.bench.launch import STAGES
    from otcbench.commands.jobs import LAUNCHERS

    if launcher is not None and launcher not in LAUNCHERS:
        raise UserError(f"--launcher {launcher!r}: use local (this machine, the default) or slurm (one job per "
                        "run, through submitit)")
    if print_commands and launcher is not None:
        raise UserError("--print-commands prints the steps for any scheduler and submits nothing; drop --launcher "
                        f"{launcher} (or --print-commands)")
    if stage is not None and stage not in STAGES:
        raise UserError(f"--stage {stage!r}: the one stage is data (a run is --only RUN_ID)")
    if stage and only:
        raise UserError("give --stage data or --only RUN_ID, not both (the data step comes first)")
    if (stage or only) and (launcher == "slurm" or print_commands):
        raise UserError("--stage and --only run one step on this machine; drop --launcher slurm / --print-commands")
    if dry_run and (stage or only or print_commands):
        raise UserError("--dry-run lists the grid; drop it, or drop --stage/--only/--print-commands")


def _step_plan(rec: Any, out: Path | None, *, resume: bool, keep_other_code: bool, trains: bool) -> Any:
    """The plan of a step. Steps run where other runs of the grid may be in progress, so ``resume`` is passed
    for them and each checks its own runs' states. A GPU recipe (``requires.gpu``) is checked for CUDA only
    where a step trains (``--only``): a login node prints, submits and builds data without one (the launcher
    gives each job its GPUs instead); ``requires`` is in no run id, so the plan is the same."""
    from otcbench.bench.plan import plan_recipe

    planned = rec
    if rec.requires.gpu and not trains:
        planned = rec.model_copy(update={"requires": rec.requires.model_copy(update={"gpu": False})})
    plan = plan_recipe(planned, out, resume=resume, keep_other_code=keep_other_code)
    plan.recipe = rec  # recipe.yaml and the launcher's checks see the recipe as given
    return plan


def _local_plan(rec: Any, out: Path | None, *, resume: bool, keep_other_code: bool, dry_run: bool) -> Any:
    """The plan `otcbench run` executes here. A GPU recipe whose runs are all done (jobs finished them on a
    cluster) is collected without CUDA: nothing trains; anything pending needs the GPU check."""
    from otcbench.bench.launch import pending_runs
    from otcbench.bench.plan import plan_recipe

    if rec.requires.gpu and not dry_run:
        plan = _step_plan(rec, out, resume=resume, keep_other_code=keep_other_code, trains=False)
        if not pending_runs(plan):
            return plan
    return plan_recipe(rec, out, resume=resume, keep_other_code=keep_other_code)


def _run_step(plan: Any, recipe: str, set_: list[str] | None, resume: bool, keep_other_code: bool,
              recipe_file: Path, opts: Any, print_commands: bool, stage: str | None,
              only: list[str] | None, dry_run: bool, no_progress: bool) -> None:
    """--print-commands, --stage data, --only RUN_ID and --launcher slurm (``opts``: its launcher options): the
    grid as steps."""
    from otcbench.bench.launch import Invocation, build_data, step_commands

    inv = Invocation(recipe, plan.out, list(set_ or []), keep_other_code, resume)
    # a step records the grid's command line (results.json), not its own
    command = _run_command(recipe, set_, plan.out, False, keep_other_code, None, False,
                           "slurm" if opts is not None else None)
    if print_commands:
        for line in step_commands(plan, inv):
            typer.echo(line)
        return
    if stage:
        built = build_data(plan, recipe_file=recipe_file, command=command, console=err_console,
                           show_progress=progress_enabled(no_progress))
        console.print(f"data of {plan.recipe.name}: {len(built)} dataset(s) built in {plan.out}", highlight=False)
        return
    if only:
        _run_only(plan, inv, only, resume, recipe_file, command, no_progress)
        return
    from otcbench.commands.jobs import submit_grid

    typer.echo(submit_grid(plan, opts, inv, recipe_file=recipe_file, command=command, log=typer.echo,
                           dry_run=dry_run))
    if not dry_run:
        collect = shlex.join(["otcbench", *inv.args("--resume")])
        typer.echo(f"when the jobs have ended: otcbench report {plan.out} (the table), or {collect} (the same "
                   "with plots, after re-running here what failed)")


def _run_only(plan: Any, inv: Any, only: list[str], resume: bool, recipe_file: Path, command: str,
              no_progress: bool) -> None:
    from otcbench.bench.launch import run_only
    from otcbench.train.distributed import env_dist_info

    outcomes = run_only(plan, list(only), resume=resume, recipe_file=recipe_file, command=command,
                        data_step=inv.shell(inv.data_args()), console=err_console,
                        show_progress=progress_enabled(no_progress))
    if not env_dist_info().is_main:
        return
    counts = {a: sum(o.action == a for o in outcomes) for a in ("trained", "resumed", "cached", "failed")}
    done = ", ".join(f"{n} {a}" for a, n in counts.items() if n)
    console.print(f"{len(outcomes)} run(s) of {plan.recipe.name} ({done}); summary in {plan.out}/summary.csv",
                  highlight=False)
    if counts["failed"]:
        raise typer.Exit(code=1)


def _refuse_in_flight(plan: Any, recipe: str) -> None:
    """`otcbench run` here while jobs of the same runs are queued or running would train them twice."""
    from otcbench.commands.jobs import in_flight

    flying = in_flight(plan)
    if flying:
        rid, (rec, state) = next(iter(flying.items()))
        raise UserError(f"run {rid} has job {rec['job_id']} {state} ({len(flying)} run(s) with a queued or running "
                        f"job); wait for them (`otcbench run {recipe} --launcher slurm --dry-run` lists them) or "
                        f"read the results so far with `otcbench report {plan.out}`")


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
