"""The package's structure: no import cycle between its modules, no file over 500 lines.

Imports are read from the source (``ast``), never executed. Every ``import`` / ``from … import`` statement
counts wherever it stands — module level, inside a function, under ``if TYPE_CHECKING:`` — because each
one is a dependency a reader has to follow and a function-level import only postpones a cycle to run time.
Importing ``a.b.c`` also runs the ``__init__`` of ``a.b`` (which may import more), so an import of a module
is an edge to it and to each package above it, except the packages that enclose the importing module itself
(Python has already started those).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "otcbench"
MAX_LINES = 500


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The package modules an import statement loads (the longest known prefix of each name)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        # `from pkg import name` loads pkg, and pkg.name too when that is a module
        names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in known else prefix for a in node.names]
    out = []
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            out.append(name)
    return out


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module → the package modules it imports (and the packages above them it runs), from the source."""
    files = {module_name(p, root): p for p in (root / package).rglob("*.py")}
    known = set(files)
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        own_packages = {".".join(mod.split(".")[:i]) for i in range(1, mod.count(".") + 1)}
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for target in _imported(node, mod, path.name == "__init__.py", known):
                    parts = target.split(".")
                    deps.update(p for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1))
                                if p in known and p not in own_packages)
        deps.discard(mod)
        graph[mod] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def _describe(graph: dict[str, set[str]], comp: list[str]) -> str:
    members = set(comp)
    return "; ".join(f"{m} → {', '.join(sorted(graph[m] & members))}" for m in comp)


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph(ROOT, "otcbench")
    assert "otcbench.train.loop" in graph and "otcbench.defenses.base" in graph  # the walk found the package
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(_describe(graph, c) for c in found)


def test_the_walker_sees_function_level_type_checking_and_package_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub import b  # registers\n")
    (pkg / "a.py").write_text("def f():\n    from pkg.sub.c import x\n")
    (pkg / "sub" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n")
    (pkg / "sub" / "c.py").write_text("from . import b\nx = 1\n")
    graph = import_graph(tmp_path, "pkg")
    # a → pkg.sub.c, and → pkg.sub (its __init__ runs first); c's relative import of b, without pkg.sub
    # (a package enclosing c itself)
    assert graph["pkg.a"] == {"pkg.sub", "pkg.sub.c"}
    assert graph["pkg.sub.c"] == {"pkg.sub.b"}
    assert graph["pkg.sub.b"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.sub", "pkg.sub.b", "pkg.sub.c"]]
    (pkg / "sub" / "b.py").write_text("import json\n")
    assert cycles(import_graph(tmp_path, "pkg")) == []


def _long_files() -> dict[str, int]:
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    return {f: n for f, n in sorted(sizes.items()) if n > MAX_LINES}


def test_no_file_of_the_package_is_over_500_lines() -> None:
    long = _long_files()
    assert not long, f"split these by job (limit {MAX_LINES} lines): {long}"



def _protocol_members(proto: type) -> set[str]:
    names: set[str] = set()
    for cls in proto.__mro__:
        if cls is object or not getattr(cls, "_is_protocol", False):
            continue
        names |= set(getattr(cls, "__annotations__", {}))
        names |= {n for n, v in vars(cls).items() if not n.startswith("_") and (callable(v) or isinstance(v, property))}
    return names


def test_the_trainer_satisfies_the_protocol_defenses_see_it_through(make_job, tmp_path: Path) -> None:
    """Defenses type their hooks against TrainerContext, never the Trainer: every member it declares exists on a
    real trainer, and a defense built by the caller is the one the trainer calls."""
    from otcbench.config import DefenseConfig
    from otcbench.defenses import build_defense
    from otcbench.defenses.protocol import DataContext, TrainerContext
    from otcbench.train.loop import Trainer

    members = _protocol_members(TrainerContext)
    assert {"model", "data", "caption_index", "autocast", "embed_batch_size"} <= members  # DataContext's
    assert _protocol_members(DataContext) < members and {"log", "gather", "global_step", "cfg"} <= members
    job = make_job()
    defense = build_defense(job.defense)
    trainer = Trainer(job, tmp_path / "run", defense=defense, show_progress=False)  # nothing is written before fit
    assert trainer.defense is defense
    missing = sorted(m for m in members if not hasattr(trainer, m))
    assert not missing, f"Trainer lacks what TrainerContext promises defenses: {missing}"
    other = build_defense(DefenseConfig(name="roclip"))
    with pytest.raises(ValueError, match="defense 'roclip' given for a job of defense 'none'"):
        Trainer(job, tmp_path / "run", defense=other, show_progress=False)
