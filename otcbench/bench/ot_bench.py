"""``otcbench bench ot``: our batched Sinkhorn against POT's batch solver and a POT per-pair loop.

Every case is a batch of OT problems between random token sets: ``x`` [B, n, d] and ``y`` [B, m, d] with
i.i.d. Gaussian entries, normalised, cost ``C = 1 - cos`` (float32), uniform marginals, the same ``eps`` and
the same fixed number of iterations for every solver:

* **ours** — :func:`otcbench.ot.transport_cost` on the cost matrices (``<T*, C>`` per problem), and
  **ours end-to-end** — :func:`otcbench.ot.ot_distance` from the features (normalisation + cost GEMM + solve),
  which is what OTCCLIP calls;
* **POT batch** — ``ot.batch.solve_batch(M=C, reg=eps, method="log_sinkhorn", max_iter=iters, tol=0)``
  (``tol=0`` never stops early, so exactly ``iters`` iterations), ``value_linear``;
* **POT loop** — ``ot.sinkhorn(..., method="sinkhorn_log", numItermax=iters, stopThr=0)`` pair by pair in a
  Python loop (torch backend on the same device, the faster POT backend here), timed on the first
  ``loop_pairs`` problems only and extrapolated to the batch. It is called on the transposed problem so that
  its update order (v first) matches the batch solvers' (u first) and the distances agree to rounding.

Cost matrices are built in blocks of at most ``BLOCK_ELEMS`` entries so that large batches (65536 x 49 x 77
floats = 1 GB per tensor) fit in memory; our solver chunks internally. POT's batch solver gets blocks of
``pot_block`` problems: on CPU the default (256) is its fastest setting here (measured 560 problems per
CPU-second at 128-256 problems per call vs 280 at 4096, where page faults from its per-iteration temporaries
dominate), so "vs batch" compares with POT at its best; on CUDA it gets whole memory blocks.

Times are the best of ``repeats`` runs (a run longer than ``repeat_budget_s`` is not repeated), as wall clock
(CUDA synchronised) and as process CPU time (``*_cpu_s``: robust on a shared machine when ``threads == 1``); the
1-minute load average is recorded with each case.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from otcbench.errors import UserError

#: Cost entries per block for the cost matrices (256 MB per float32 tensor).
BLOCK_ELEMS = 1 << 26
#: Problems per call of POT's batch solver on CPU (its fastest block size here, see the module docstring).
POT_BLOCK_CPU = 256

DEFAULT_SIZES = ((49, 77), (16, 24))
DEFAULT_DIMS = (128, 512)
DEFAULT_BATCHES_CPU = (1024, 4096, 16384)
DEFAULT_BATCHES_CUDA = (1024, 4096, 16384, 65536)
DEFAULTS = dict(iters=50, repeats=3, loop_pairs=32)
QUICK = dict(sizes=((6, 9), (4, 5)), batches=(32, 96), dims=(16,), iters=20, repeats=1, loop_pairs=4)


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"49x77,16x24"`` -> ``[(49, 77), (16, 24)]``."""
    out = []
    for part in text.split(","):
        try:
            n, m = (int(v) for v in part.strip().lower().split("x"))
        except ValueError:
            raise UserError(f"--sizes: {part.strip()!r} is not NxM (e.g. --sizes 49x77,16x24)") from None
        if n < 1 or m < 1:
            raise UserError(f"--sizes: {part.strip()!r} needs positive sizes")
        out.append((n, m))
    return out


def parse_ints(text: str, flag: str) -> list[int]:
    """``"1024,4096"`` -> ``[1024, 4096]`` (all positive)."""
    try:
        vals = [int(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"{flag}: {text!r} is not a comma-separated list of integers (e.g. {flag} 1024,4096)") from None
    if any(v < 1 for v in vals):
        raise UserError(f"{flag}: values must be positive, got {text!r}")
    return vals


def resolve_devices(device: str) -> tuple[list[str], list[str]]:
    """(devices to run, notes): ``cpu``, ``cuda`` (an error without CUDA) or ``all`` (CUDA skipped if absent)."""
    if device not in ("cpu", "cuda", "all"):
        raise UserError(f"--device must be cpu, cuda or all, got {device!r}")
    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        raise UserError("--device cuda: no CUDA device is available here; use --device cpu (or all)")
    if device == "cpu":
        return ["cpu"], []
    if device == "cuda":
        return ["cuda"], []
    return (["cpu", "cuda"], []) if has_cuda else (["cpu"], ["CUDA not available: skipped the cuda cases"])


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn: Callable[[], Any], device: str, repeats: int, budget_s: float) -> tuple[float, float, Any]:
    """(best wall time, best CPU time, output) of up to ``repeats`` runs (no repeat after a run > ``budget_s``)."""
    best, best_cpu, out = float("inf"), float("inf"), None
    for _ in range(max(1, repeats)):
        _sync(device)
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        _sync(device)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        best, best_cpu = min(best, dt), min(best_cpu, dc)
        if dt > budget_s:
            break
    return best, best_cpu, out


def _problems(batch: int, n: int, m: int, dim: int, device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, dim, generator=g).to(device)
    y = torch.randn(batch, m, dim, generator=g).to(device)
    return x, y


def _cost_blocks(x: torch.Tensor, y: torch.Tensor, block: int) -> list[torch.Tensor]:
    from otcbench.ot import cosine_cost

    def norm(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(t, dim=-1)

    return [cosine_cost(norm(x[s:s + block]), norm(y[s:s + block])) for s in range(0, x.shape[0], block)]


def bench_case(n: int, m: int, batch: int, dim: int, device: str, *, eps: float = 0.05, iters: int = 50,
               repeats: int = 3, loop_pairs: int = 32, seed: int = 0, repeat_budget_s: float = 10.0,
               pot_batch: bool = True, pot_block: int | None = None) -> dict[str, Any]:
    """Time one case (see the module docstring) and return its row."""
    import ot
    import ot.batch

    from otcbench.ot import SolveInfo, ot_distance, transport_cost

    x, y = _problems(batch, n, m, dim, device, seed)
    block = max(1, BLOCK_ELEMS // (n * m))
    costs = _cost_blocks(x, y, block)

    def ours() -> torch.Tensor:
        return torch.cat([transport_cost(C, eps=eps, n_iters=iters) for C in costs])

    def ours_e2e() -> torch.Tensor:
        return ot_distance(x, y, eps=eps, n_iters=iters)

    pot_block = pot_block or (POT_BLOCK_CPU if device == "cpu" else block)

    def pot() -> torch.Tensor:
        return torch.cat([
            ot.batch.solve_batch(M=C[s:s + pot_block], reg=eps, max_iter=iters, tol=0.0, method="log_sinkhorn",
                                 grad="detach").value_linear
            for C in costs for s in range(0, C.shape[0], pot_block)
        ])

    k = min(loop_pairs, batch)
    flat = [C[i] for C in costs for i in range(C.shape[0])][:k]
    wa = torch.full((n,), 1.0 / n, device=device)
    wb = torch.full((m,), 1.0 / m, device=device)

    def loop() -> torch.Tensor:
        out = []
        for C in flat:
            # Transposed problem: POT's per-pair solver updates v first; this makes it update our u first.
            plan = ot.sinkhorn(wb, wa, C.T, eps, method="sinkhorn_log", numItermax=iters, stopThr=0.0, warn=False)
            out.append((plan.T * C).sum())
        return torch.stack(out)

    # Warm-up (first-call allocations, lazy CUDA/BLAS initialisation) on a small slice.
    warm = costs[0][: min(8, batch)]
    transport_cost(warm, eps=eps, n_iters=2)
    ot_distance(x[:8], y[:8], eps=eps, n_iters=2)
    ot.batch.solve_batch(M=warm, reg=eps, max_iter=2, tol=0.0, method="log_sinkhorn", grad="detach")

    info = SolveInfo()
    transport_cost(costs[0][:1], eps=eps, n_iters=1, info=info)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    t_ours, c_ours, d_ours = _time(ours, device, repeats, repeat_budget_s)
    t_e2e, c_e2e, d_e2e = _time(ours_e2e, device, repeats, repeat_budget_s)
    t_loop, c_loop, d_loop = _time(loop, device, repeats, repeat_budget_s)
    row: dict[str, Any] = dict(
        device=device, device_name=_device_name(device), n=n, m=m, batch=batch, dim=dim, eps=eps, iters=iters,
        threads=torch.get_num_threads(), repeats=repeats, torch_version=torch.__version__, pot_version=ot.__version__,
        path=info.paths[0], load_avg_1min=load,
        ours_s=t_ours, ours_cpu_s=c_ours, ours_pairs_per_s=batch / t_ours,
        ours_e2e_s=t_e2e, ours_e2e_cpu_s=c_e2e, ours_e2e_pairs_per_s=batch / t_e2e,
        pot_loop_pairs=k, pot_loop_s_per_pair=t_loop / k, pot_loop_cpu_s_per_pair=c_loop / k,
        pot_loop_extrapolated=k < batch,
        pot_loop_pairs_per_s=k / t_loop, speedup_vs_loop=(t_loop / k * batch) / t_ours,
        max_abs_diff_loop=float((d_ours[:k] - d_loop).abs().max()),
        max_abs_diff_e2e=float((d_ours - d_e2e).abs().max()),
    )
    if pot_batch:
        t_pot, c_pot, d_pot = _time(pot, device, repeats, repeat_budget_s)
        row.update(pot_block=pot_block, pot_batch_s=t_pot, pot_batch_cpu_s=c_pot, pot_batch_pairs_per_s=batch / t_pot,
                   speedup_vs_batch=t_pot / t_ours, max_abs_diff_batch=float((d_ours - d_pot).abs().max()))
    else:
        row.update(pot_block=None, pot_batch_s=None, pot_batch_cpu_s=None, pot_batch_pairs_per_s=None,
                   speedup_vs_batch=None, max_abs_diff_batch=None)
    diffs = [row["max_abs_diff_loop"], row["max_abs_diff_e2e"], row["max_abs_diff_batch"]]
    row["max_abs_diff"] = max(d for d in diffs if d is not None)
    return row


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def plan_cases(sizes: Sequence[tuple[int, int]], batches: Sequence[int] | None, dims: Sequence[int],
               devices: Sequence[str]) -> list[tuple[str, int, int, int, int]]:
    """The grid as (device, n, m, batch, dim); ``batches=None`` means the per-device default."""
    cases = []
    for device in devices:
        dev_batches = batches or (DEFAULT_BATCHES_CUDA if device == "cuda" else DEFAULT_BATCHES_CPU)
        cases += [(device, n, m, batch, dim) for n, m in sizes for batch in dev_batches for dim in dims]
    return cases


def run_ot_bench(sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES, batches: Sequence[int] | None = None,
                 dims: Sequence[int] = DEFAULT_DIMS, devices: Sequence[str] = ("cpu",), *, eps: float = 0.05,
                 iters: int = 50, repeats: int = 3, loop_pairs: int = 32, seed: int = 0, pot_batch: bool = True,
                 pot_block: int | None = None, progress: Callable[[str], None] | None = None
                 ) -> list[dict[str, Any]]:
    """Run the grid sizes x batches x dims on each device; one row (dict) per case, in :func:`plan_cases` order.

    ``batches=None`` uses the per-device default (up to 16384 on CPU, 65536 on CUDA). ``progress`` is called
    with a description before each case.
    """
    if not eps > 0:
        raise UserError(f"--eps must be positive, got {eps}")
    if iters < 1 or repeats < 1 or loop_pairs < 1 or (pot_block is not None and pot_block < 1):
        raise UserError("--iters, --repeats, --loop-pairs and --pot-block must be at least 1")
    rows = []
    for device, n, m, batch, dim in plan_cases(sizes, batches, dims, devices):
        if progress is not None:
            progress(f"{device} {n}x{m} batch {batch} dim {dim}")
        rows.append(bench_case(n, m, batch, dim, device, eps=eps, iters=iters, repeats=repeats,
                               loop_pairs=loop_pairs, seed=seed, pot_batch=pot_batch, pot_block=pot_block))
    return rows


def _load_range(rows: Sequence[dict[str, Any]]) -> str:
    loads = [r["load_avg_1min"] for r in rows if r.get("load_avg_1min") is not None]
    return "n/a" if not loads else f"{min(loads):.1f}-{max(loads):.1f}"


def table_notes(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Footnotes for the table: what was measured and how."""
    if not rows:
        return []
    r = rows[0]
    loops = sorted({x["pot_loop_pairs"] for x in rows})
    blocks = sorted({x["pot_block"] for x in rows if x["pot_block"] is not None})
    return [
        f"eps {r['eps']}, {r['iters']} iterations for every solver, best of {r['repeats']} runs; "
        f"torch {r['torch_version']} ({r['threads']} CPU threads), POT {r['pot_version']}; load average "
        f"{_load_range(rows)}.",
        "ours = otcbench.ot.transport_cost on the cost matrices (path: "
        f"{', '.join(sorted({x['path'] for x in rows}))}); e2e = otcbench.ot.ot_distance from the features "
        "(normalise + cost GEMM + solve); POT batch = "
        + (f"ot.batch.solve_batch(method='log_sinkhorn') on blocks of {'/'.join(map(str, blocks))} problems."
           if blocks else "skipped (--no-pot-batch)."),
        f"* POT loop = ot.sinkhorn(method='sinkhorn_log') pair by pair, timed on {'/'.join(map(str, loops))} "
        "pairs per case and extrapolated to the batch; 'vs loop' uses the extrapolated time.",
        "max |Δd| = largest difference between our distances and POT's (batch and loop) and our e2e ones.",
    ]
