"""benchmarks/gpu_check.sh: valid bash, a clean skip without CUDA, and its CPU dry run end to end (every step's
command line really runs: bench train of two models with none and otcclip, bench ot, the open_clip trainer
ratio with open_clip's checkpoint evaluated by otcbench, a one-process torchrun)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PY": sys.executable, "OTCBENCH_NO_PROGRESS": "1", "TMPDIR": str(tmp_path),
            "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(["bash", str(SCRIPT), str(tmp_path / "check.json")], capture_output=True, text=True,
                          env=full, cwd=tmp_path, timeout=1800)


def test_the_script_is_valid_bash() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


@pytest.mark.slow  # starts the script twice (bash and python subprocesses)
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_without_cuda_it_skips_cleanly(tmp_path: Path) -> None:
    proc = run(tmp_path)
    assert proc.returncode == 0 and "no CUDA device" in proc.stderr
    assert json.loads((tmp_path / "check.json").read_text()) == {"skipped": True, "reason": "no CUDA device"}
    assert run(tmp_path, GPU_CHECK_REQUIRE="1").returncode == 1


@pytest.mark.slow
def test_the_cpu_dry_run_runs_every_step(tmp_path: Path) -> None:
    proc = run(tmp_path, GPU_CHECK_DRY_RUN="1")
    result = json.loads((tmp_path / "check.json").read_text())
    assert proc.returncode == 0 and result["ok"], json.dumps(result)[-3000:]
    assert set(result["steps"]) == {"train-otc-rn-nano", "train-otc-vit-tiny", "bench-ot", "openclip-ratio",
                                    "torchrun"}
    for model in ("otc-rn-nano", "otc-vit-tiny"):
        rows = result["steps"][f"train-{model}"]["result"]
        assert [r["defense"] for r in rows] == ["none", "otcclip"] and all(r["images_per_s"] > 0 for r in rows)
    ratio = result["steps"]["openclip-ratio"]["result"]
    assert ratio["ratio_otcbench_over_open_clip"] > 0 and ratio["open_clip"]["images_per_s"] > 0
    assert 0 <= ratio["open_clip_checkpoint_eval"]["zeroshot_top1"] <= 1
    assert result["env"]["torch"] == torch.__version__
