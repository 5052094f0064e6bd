"""Tests for ``otcbench bench ot`` (otcbench.bench.ot_bench): quick run, JSON fields, agreement, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from otcbench.bench import ot_bench
from otcbench.cli import app
from otcbench.errors import UserError

runner = CliRunner()

FIELDS = {
    "device", "device_name", "n", "m", "batch", "dim", "eps", "iters", "threads", "repeats", "torch_version",
    "pot_version", "path", "ours_s", "ours_pairs_per_s", "ours_e2e_s", "ours_e2e_pairs_per_s", "pot_batch_s",
    "pot_batch_pairs_per_s", "pot_loop_pairs", "pot_loop_s_per_pair", "pot_loop_pairs_per_s",
    "pot_loop_extrapolated", "speedup_vs_batch", "speedup_vs_loop", "max_abs_diff_batch", "max_abs_diff_loop",
    "max_abs_diff_e2e", "max_abs_diff", "load_avg_1min", "ours_cpu_s", "ours_e2e_cpu_s", "pot_batch_cpu_s",
    "pot_loop_cpu_s_per_pair", "pot_block",
}


def test_quick_json_run() -> None:
    result = runner.invoke(app, ["bench", "ot", "--quick", "--json", "--threads", "1"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    q = ot_bench.QUICK
    assert len(rows) == len(q["sizes"]) * len(q["batches"]) * len(q["dims"])
    assert [(r["n"], r["m"], r["batch"]) for r in rows] == [
        (n, m, b) for n, m in q["sizes"] for b in q["batches"]]
    for r in rows:
        assert set(r) == FIELDS
        assert r["device"] == "cpu" and r["iters"] == q["iters"] and r["path"] == "scaled" and r["threads"] == 1
        assert r["max_abs_diff"] < 1e-5 and r["max_abs_diff_batch"] < 1e-5 and r["max_abs_diff_loop"] < 1e-5
        assert r["pot_loop_pairs"] == q["loop_pairs"] and r["pot_loop_extrapolated"] is True
        for k in ("ours_pairs_per_s", "ours_e2e_pairs_per_s", "pot_batch_pairs_per_s", "pot_loop_pairs_per_s"):
            assert r[k] > 0
        assert r["ours_pairs_per_s"] == pytest.approx(r["batch"] / r["ours_s"])
        assert r["speedup_vs_batch"] == pytest.approx(r["pot_batch_s"] / r["ours_s"])
        assert r["speedup_vs_loop"] == pytest.approx(r["pot_loop_s_per_pair"] * r["batch"] / r["ours_s"])
        assert r["pot_block"] == ot_bench.POT_BLOCK_CPU and r["ours_cpu_s"] > 0 and r["pot_batch_cpu_s"] > 0


def test_table_output_and_custom_grid() -> None:
    result = runner.invoke(app, ["bench", "ot", "--sizes", "3x4", "--batches", "8", "--dims", "8", "--iters", "5",
                                 "--repeats", "1", "--loop-pairs", "2", "--no-pot-batch", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "bench ot" in result.stdout and "3×4" in result.stdout
    assert "extrapolated" in result.stdout


def test_library_rows_without_pot_batch() -> None:
    (row,) = ot_bench.run_ot_bench([(5, 3)], [6], [4], iters=3, repeats=1, loop_pairs=10, pot_batch=False)
    assert row["pot_batch_s"] is None and row["speedup_vs_batch"] is None
    assert row["pot_loop_pairs"] == 6 and row["pot_loop_extrapolated"] is False  # all pairs fit in the loop
    assert row["max_abs_diff"] < 1e-5


def test_pot_in_blocks_matches() -> None:
    (row,) = ot_bench.run_ot_bench([(4, 6)], [12], [8], iters=10, repeats=1, loop_pairs=2, pot_block=5)
    assert row["pot_block"] == 5 and row["max_abs_diff_batch"] < 1e-5


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--sizes", "49by77"], "is not NxM"),
        (["--batches", "1024,x"], "--batches"),
        (["--dims", "0"], "must be positive"),
        (["--device", "tpu"], "--device must be"),
        (["--iters", "0", "--quick"], "at least 1"),
        (["--threads", "0"], "--threads"),
        (["--pot-block", "0", "--quick"], "--pot-block"),
        (["--eps", "0", "--quick"], "--eps must be positive"),
    ],
)
def test_bad_input_one_line_error(args: list[str], fragment: str) -> None:
    result = runner.invoke(app, ["bench", "ot", *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr


def test_cuda_device_choice() -> None:
    if torch.cuda.is_available():
        assert ot_bench.resolve_devices("cuda") == (["cuda"], [])
        assert ot_bench.resolve_devices("all")[0] == ["cpu", "cuda"]
    else:
        with pytest.raises(UserError, match="no CUDA device"):
            ot_bench.resolve_devices("cuda")
        devices, notes = ot_bench.resolve_devices("all")
        assert devices == ["cpu"] and "skipped" in notes[0]


def test_parse_helpers() -> None:
    assert ot_bench.parse_sizes("49x77, 16X24") == [(49, 77), (16, 24)]
    assert ot_bench.parse_ints("1,2", "--dims") == [1, 2]
    assert len(ot_bench.plan_cases([(2, 3)], None, [8], ["cpu", "cuda"])) == (
        len(ot_bench.DEFAULT_BATCHES_CPU) + len(ot_bench.DEFAULT_BATCHES_CUDA))


def test_help() -> None:
    res = runner.invoke(app, ["bench", "ot", "--help"], env={"COLUMNS": "160"})
    assert res.exit_code == 0 and "Usage: otcbench bench ot" in res.stdout
    assert "Examples: otcbench bench ot" in res.stdout
    res = runner.invoke(app, ["bench", "--help"], env={"COLUMNS": "160"})
    assert res.exit_code == 0 and " ot " in res.stdout
