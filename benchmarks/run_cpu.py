"""Per-run CPU seconds of a recipe's runs, one run at a time in this process, for code that predates ``cpu_s``.

    PYTHONPATH=<checkout> python benchmarks/run_cpu.py RECIPE OUT DEST.json [KEY=VALUE ...]

Plans RECIPE into OUT (resuming what is there) and runs it with one job, wrapping each run in
``resource.getrusage`` (this process and its children, user + system); DEST.json is rewritten after every run.
Since otcbench records ``cpu_s`` in every run.json, this is only needed to measure an older commit on the same
machine (docs/benchmarks.md: the main job's per-run CPU before and after).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import otcbench.bench.runner as runner
from otcbench.bench.plan import plan_recipe
from otcbench.bench.recipe import load_recipe


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    recipe, out, dest = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    rec, _ = load_recipe(recipe, sys.argv[4:])
    plan = plan_recipe(rec, out, resume=True)
    rows: list[dict[str, Any]] = []
    execute_run = runner._execute_run

    def timed(run: Any, *args: Any, **kwargs: Any) -> Any:
        c0, t0 = cpu_seconds(), time.perf_counter()
        result = execute_run(run, *args, **kwargs)
        rows.append({"title": run.title, "attack": run.attack.label, "defense": run.defense.label, "seed": run.seed,
                     "cpu_s": round(cpu_seconds() - c0, 1), "wall_s": round(time.perf_counter() - t0, 1)})
        dest.write_text(json.dumps(rows, indent=1))
        return result

    runner._execute_run = timed  # every run of the plan goes through it (jobs=1: in this process)
    c0, t0 = cpu_seconds(), time.perf_counter()
    runner.execute_plan(plan, jobs=1, show_progress=False, plots=False)
    rows.append({"title": "TOTAL", "cpu_s": round(cpu_seconds() - c0, 1), "wall_s": round(time.perf_counter() - t0, 1)})
    dest.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
