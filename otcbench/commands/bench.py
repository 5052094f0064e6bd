"""``otcbench bench …``: micro-benchmarks (``bench ot``: Sinkhorn vs POT; ``bench train``: throughput per defense)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from otcbench import render
from otcbench.commands.common import SetOpt, console, err_console, flag, handle_errors, progress_enabled, quiet_datasets
from otcbench.errors import UserError
from otcbench.progress import progress_bar

bench_app = typer.Typer(help="Micro-benchmarks: bench ot (Sinkhorn vs POT), bench train (throughput per defense).",
                        no_args_is_help=True)


@bench_app.command("ot")
@handle_errors
def bench_ot(
    sizes: Annotated[str | None, typer.Option("--sizes", help="Token-set sizes NxM (default 49x77,16x24).")] = None,
    batches: Annotated[
        str | None, typer.Option("--batches", help="Pairs per batch (default 1024,4096,16384; +65536 on CUDA).")
    ] = None,
    dims: Annotated[str | None, typer.Option("--dims", help="Feature dims (default 128,512).")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or all (CUDA skipped if absent).")] = "cpu",
    iters: Annotated[int | None, typer.Option("--iters", help="Sinkhorn iterations (default 50).")] = None,
    eps: Annotated[float, typer.Option("--eps", help="Entropic regularisation.")] = 0.05,
    repeats: Annotated[int | None, typer.Option("--repeats", help="Best of N runs (default 3).")] = None,
    loop_pairs: Annotated[
        int | None, typer.Option("--loop-pairs", help="Pairs timed in the POT per-pair loop (default 32).")
    ] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="torch CPU threads (default: torch's).")] = None,
    no_pot_batch: Annotated[bool, flag("--no-pot-batch", help="Skip POT's (slow) batch solver.")] = False,
    pot_block: Annotated[
        int | None, typer.Option("--pot-block", help="Problems per POT batch call (default: 256 on CPU, its best).")
    ] = None,
    quick: Annotated[bool, flag("--quick", help="Tiny grid (seconds), for smoke tests.")] = False,
    as_json: Annotated[bool, flag("--json", help="Print the rows as JSON.")] = False,
    no_progress: Annotated[bool, flag("--no-progress", help="No progress bars (shown on a terminal only).")] = False,
) -> None:
    """Time otcbench's batched Sinkhorn against POT's batch solver and a POT per-pair loop on the same problems.

    Cost = 1 - cos of random unit features, uniform marginals, same eps and iterations everywhere; reports
    pairs/s, speedups and the largest distance difference. The POT loop runs on --loop-pairs pairs per case and
    is extrapolated.

    Examples: otcbench bench ot; otcbench bench ot --sizes 49x77 --batches 4096 --dims 512 --json;
    otcbench bench ot --device all --batches 65536
    """
    from otcbench.bench import ot_bench as ob

    if threads is not None:
        if threads < 1:
            raise UserError("--threads must be at least 1")
        import torch

        torch.set_num_threads(threads)
    base: dict[str, Any] = dict(ob.QUICK) if quick else {}
    size_list = ob.parse_sizes(sizes) if sizes else list(base.get("sizes", ob.DEFAULT_SIZES))
    batch_list = ob.parse_ints(batches, "--batches") if batches else base.get("batches")
    dim_list = ob.parse_ints(dims, "--dims") if dims else list(base.get("dims", ob.DEFAULT_DIMS))
    devices, notes = ob.resolve_devices(device)
    given = dict(iters=iters, repeats=repeats, loop_pairs=loop_pairs)
    opts: dict[str, Any] = {k: v if v is not None else base.get(k, ob.DEFAULTS[k]) for k, v in given.items()}
    opts.update(eps=eps, pot_batch=not no_pot_batch, pot_block=pot_block)
    total = len(ob.plan_cases(size_list, batch_list, dim_list, devices))
    with progress_bar(progress_enabled(no_progress), console=err_console, transient=True) as progress:
        task = progress.add_task("bench ot", total=total)

        started = [0]

        def step(desc: str) -> None:  # called before each case: the previous one is done
            progress.update(task, description=desc, completed=started[0])
            started[0] += 1

        rows = ob.run_ot_bench(size_list, batch_list, dim_list, devices, progress=step, **opts)
        progress.update(task, completed=total)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    console.print(render.ot_bench_table(rows))
    for note in notes + ob.table_notes(rows):
        console.print(note, highlight=False)


@bench_app.command("train")
@handle_errors
def bench_train(
    defense: Annotated[
        list[str] | None, typer.Option("--defense", help="Defense to time (repeat; default all).")
    ] = None,
    model: Annotated[str, typer.Option("--model", help="open_clip model name.")] = "otc-rn-nano",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Global batch size.")] = 128,
    steps: Annotated[int, typer.Option("--steps", help="Steps per epoch of the benchmark data.")] = 12,
    epochs: Annotated[int, typer.Option("--epochs", help="Epochs per defense (data-side steps run per epoch).")] = 2,
    data: Annotated[Path | None, typer.Option("--data", help="Pair dataset (default: a synthetic world).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N.")] = "auto",
    amp: Annotated[str, typer.Option("--amp", help="auto (bf16 on CUDA), bf16, fp16 or none.")] = "auto",
    threads: Annotated[int | None, typer.Option("--threads", help="torch CPU threads.")] = None,
    set_: SetOpt = None,
    as_json: Annotated[bool, flag("--json", help="Print the rows as JSON.")] = False,
) -> None:
    """Training throughput of each defense at one model and batch: step time, images/s, data-side time, epoch ratio.

    Every defense trains through the real trainer in its steady-state regime (e.g. matching from the first
    epoch); --set NAME.key=value overrides a defense option, --set train.key=value / model.key=value a trainer
    or model option for every defense (e.g. the streamed data path: --set train.data_mode=stream
    --set train.num_workers=8).

    Examples: otcbench bench train --defense none --defense otcclip --model otc-rn-tiny;
    otcbench bench train --model RN50 --batch-size 256 --device cuda --set train.data_mode=stream
    --set train.num_workers=8 --json
    """
    from otcbench.bench.train_bench import run_train_bench, split_overrides
    from otcbench.defenses import DEFENSES

    quiet_datasets()
    names = defense or sorted(DEFENSES.names())
    if amp not in ("auto", "bf16", "fp16", "none"):
        raise UserError(f"--amp {amp!r}: use auto, bf16, fp16 or none")
    options, train_opts, model_opts = split_overrides(set_)
    rows = run_train_bench(names, model=model, batch_size=batch_size, steps_per_epoch=steps, epochs=epochs,
                           data=data, device=device, amp=amp, options=options, threads=threads, train=train_opts,
                           model_options=model_opts)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    console.print(render.train_bench_table(rows, model, batch_size))
