"""benchmarks/gpu_check.sh: valid bash and a clean skip without CUDA."""

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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_without_cuda_it_skips_cleanly(tmp_path: Path) -> None:
    proc = run(tmp_path)
    assert proc.returncode == 0 and "no CUDA device" in proc.stderr
    assert json.loads((tmp_path / "check.json").read_text()) == {"skipped": True, "reason": "no CUDA device"}
    assert run(tmp_path, GPU_CHECK_REQUIRE="1").returncode == 1
