"""One way to do each thing: eval mode (otcbench.models.mode), progress bars (otcbench.progress), devices
(otcbench.device) — each helper's behaviour, and a source check that nothing else in the package does it."""

from __future__ import annotations

import ast
import io
from pathlib import Path

import pytest
import torch

from otcbench.device import resolve_device
from otcbench.errors import UserError
from otcbench.models.mode import eval_mode
from otcbench.progress import ENV_OFF, counted, progress_bar, progress_enabled

PACKAGE = Path(__file__).resolve().parents[1] / "otcbench"
#: Models that are put in eval mode once and never trained: ``defend``'s model and the optimised patch's
#: surrogate. Everywhere a model that trains is switched to eval mode, it goes through ``eval_mode``.
EVAL_CALL_ALLOWED = {"models/mode.py", "defenses/defend.py", "attacks/peer_backdoors.py"}


def _sources() -> list[tuple[str, ast.AST]]:
    return [(p.relative_to(PACKAGE).as_posix(), ast.parse(p.read_text())) for p in sorted(PACKAGE.rglob("*.py"))]


def test_eval_mode_restores_the_mode_also_on_error() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    with eval_mode(model) as m:
        assert m is model and not model.training and not model[1].training
    assert model.training and model[1].training
    with pytest.raises(RuntimeError, match="boom"), eval_mode(model):
        raise RuntimeError("boom")
    assert model.training
    model.eval()
    with eval_mode(model):
        pass
    assert not model.training  # a model in eval mode stays there


def test_nothing_else_toggles_eval_mode() -> None:
    offenders = [f"{name}:{node.lineno}" for name, tree in _sources() if name not in EVAL_CALL_ALLOWED
                 for node in ast.walk(tree)
                 if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "eval"
                 and not node.args]
    assert not offenders, f"use `with eval_mode(model):` (otcbench.models.mode) at {offenders}"


def test_progress_is_off_when_not_asked_when_the_env_says_so_and_off_a_terminal(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    monkeypatch.delenv(ENV_OFF, raising=False)
    assert progress_enabled() and progress_enabled(True) and not progress_enabled(False)
    assert not progress_enabled(True, Console(file=io.StringIO(), force_terminal=False))
    assert progress_enabled(True, Console(force_terminal=True))
    monkeypatch.setenv(ENV_OFF, "1")
    assert not progress_enabled(True) and not progress_enabled(True, Console(force_terminal=True))
    assert progress_bar(False).disable and not progress_bar(True).disable
    names = [type(c).__name__ for c in progress_bar(True, info=True, elapsed=True).columns]
    assert names == ["TextColumn", "BarColumn", "MofNCompleteColumn", "TimeElapsedColumn", "TextColumn"]
    with counted(False, 3, "x") as advance:
        advance()  # a no-op when off


def test_nothing_else_builds_a_progress_bar_or_reads_the_env_variable() -> None:
    offenders = []
    for name, tree in _sources():
        if name == "progress.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "rich.progress":
                offenders.append(f"{name}:{node.lineno} imports rich.progress")
            if isinstance(node, ast.Constant) and node.value == ENV_OFF:
                offenders.append(f"{name}:{node.lineno} reads {ENV_OFF}")
    assert not offenders, offenders


def test_the_device_parser() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="unknown device 'gpu0'; use auto, cpu, cuda or cuda:N"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available; use --device cpu"):
            resolve_device("cuda", fix="use --device cpu")
    else:
        with pytest.raises(UserError, match="does not exist"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_nothing_else_parses_device_names() -> None:
    """One parser of a device name (models, training, eval and ``defend`` all use it); ``bench ot``'s
    ``resolve_devices`` picks a set of device kinds (cpu, cuda, all), it parses no device name."""
    offenders = []
    for name, tree in _sources():
        if name == "device.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name.lstrip("_") in ("resolve_device", "parse_device"):
                offenders.append(f"{name}:{node.lineno} defines {node.name}")
    assert not offenders, f"parse devices with otcbench.device.resolve_device: {offenders}"
