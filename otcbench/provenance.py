"""What made a result: the code that computes it, the library versions, the CPU class and the thread count.

A run's numbers depend on more than its options. The code fingerprint (:func:`code_fingerprint`) is a
hash of the package source that can change a run's outputs, normalised so that comment, docstring,
trailing-whitespace and blank-line edits leave it alone; the recipe runner keys its cache on it, so a run
made by other code is never silently reused (docs/architecture.md, "Provenance and the run cache").
Float results are bit-identical only on the same CPU class (``isa``: ATen and oneDNN pick their vector
kernels from it) and the same torch thread count (it sets the summation order), so both are recorded too.

Nothing here holds an absolute path: these records are committed with results.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import io
import platform
import subprocess
import tokenize
from pathlib import Path
from typing import Any

import otcbench

#: The package's own directory: what :func:`code_fingerprint` hashes by default.
PACKAGE_DIR = Path(otcbench.__file__).resolve().parent

#: Package paths (relative, posix; a trailing ``/`` names a folder) left out of the code fingerprint: they
#: only present results or drive commands and cannot change what a run computes, so editing them must not
#: re-run a grid. The CLI and its commands parse arguments into options, and options already enter run ids;
#: ``render``/``progress`` print; the report modules read finished runs; ``ot_bench``/``train_bench`` are
#: micro-benchmarks no run imports; ``train/reporting`` mirrors log records to TensorBoard/wandb;
#: this module describes runs. Names that do not exist are harmless.
FINGERPRINT_EXCLUDED = (
    "cli.py",
    "commands/",
    "render.py",
    "progress.py",
    "provenance.py",
    "bench/tables.py",
    "bench/plots.py",
    "bench/report.py",
    "bench/summary.py",
    "bench/logs.py",
    "bench/detector_table.py",
    "bench/compare.py",
    "bench/ranking.py",
    "bench/launch.py",
    "bench/ot_bench.py",
    "bench/train_bench.py",
    "train/reporting.py",
)

#: Hex digits kept of the fingerprint (as run ids keep 12).
FINGERPRINT_CHARS = 12


def _excluded(rel: str) -> bool:
    return any(rel.startswith(e) if e.endswith("/") else rel == e for e in FINGERPRINT_EXCLUDED)


def fingerprint_files(root: Path) -> list[tuple[str, Path]]:
    """The files the fingerprint covers under package directory ``root``, as (relative posix path, file),
    sorted by that path: every ``**/*.py`` and ``models/configs/*.json`` not in :data:`FINGERPRINT_EXCLUDED`.
    Recipes are not hashed: their options already enter run ids."""
    files = [*root.rglob("*.py"), *(root / "models" / "configs").glob("*.json")]
    out = [(f.relative_to(root).as_posix(), f) for f in files if f.is_file()]
    return sorted((rel, f) for rel, f in out if not _excluded(rel) and "__pycache__" not in rel)


def _char_col(line: str, byte_col: int) -> int:
    """``ast`` counts columns in UTF-8 bytes, ``tokenize`` in characters: convert the former."""
    return len(line.encode("utf-8")[:byte_col].decode("utf-8", errors="ignore"))


def _spans(src: str, lines: list[str]) -> list[tuple[int, int, int, int]]:
    """(row0, col0, row1, col1) of every comment and docstring, 1-based rows and character columns."""
    spans = [(*t.start, *t.end) for t in tokenize.generate_tokens(io.StringIO(src).readline)
             if t.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(src)):
        if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        first = node.body[0] if node.body else None
        if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str) and first.end_lineno is not None
                and first.end_col_offset is not None):
            r0, r1 = first.lineno, first.end_lineno
            spans.append((r0, _char_col(lines[r0 - 1], first.col_offset),
                          r1, _char_col(lines[r1 - 1], first.end_col_offset)))
    return spans


def normalise_source(src: str) -> str:
    """Python source without its comments and docstrings, trailing whitespace and empty lines.

    Comments come from ``tokenize`` and docstrings from ``ast``, both by their positions, so the result does
    not depend on how a Python version tokenises the rest (f-strings changed in 3.12). Source that does not
    parse is returned as it is, apart from the whitespace rules.
    """
    src = src.replace("\r\n", "\n").replace("\r", "\n")
    lines = src.split("\n")
    try:
        spans = _spans(src, lines)
    except (SyntaxError, tokenize.TokenError, ValueError):
        spans = []
    cut: dict[int, list[tuple[int, int]]] = {}
    for r0, c0, r1, c1 in spans:
        for r in range(r0, r1 + 1):
            cut.setdefault(r, []).append((c0 if r == r0 else 0, c1 if r == r1 else len(lines[r - 1])))
    out = []
    for i, line in enumerate(lines, 1):
        for c0, c1 in sorted(cut.get(i, []), reverse=True):
            line = line[:c0] + line[c1:]
        line = line.rstrip()
        if line:
            out.append(line)
    return "\n".join(out)


def _fingerprint(root: Path) -> str:
    h = hashlib.sha256()
    for rel, f in fingerprint_files(root):
        text = f.read_text(encoding="utf-8")
        body = normalise_source(text) if rel.endswith(".py") else "\n".join(
            s for s in (x.rstrip() for x in text.splitlines()) if s)
        h.update(rel.encode() + b"\0" + body.encode("utf-8") + b"\0")
    return h.hexdigest()[:FINGERPRINT_CHARS]


@functools.lru_cache(maxsize=1)
def _package_fingerprint() -> str:
    return _fingerprint(PACKAGE_DIR)


def code_fingerprint(root: str | Path | None = None) -> str:
    """A short SHA-256 hex over the package source that can change a run's numbers (:func:`fingerprint_files`,
    each file through :func:`normalise_source`). ``root``: another copy of the package directory (tests);
    the installed package's value is computed once per process."""
    return _package_fingerprint() if root is None else _fingerprint(Path(root))


def _git(*args: str) -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(PACKAGE_DIR), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git work tree the package runs from; (None, None) when it is not in one, or
    when its files are not tracked there (an installed copy inside another repository's virtualenv)."""
    if (_git("rev-parse", "--is-inside-work-tree") or "").strip() != "true":
        return None, None
    if not (_git("ls-files", "--", "__init__.py") or "").strip():
        return None, None
    commit = (_git("rev-parse", "HEAD") or "").strip() or None
    status = _git("status", "--porcelain", "--", ".")  # the package's own files: what runs
    return commit, (None if status is None else bool(status.strip()))


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def _cpu_model(fields: dict[str, str]) -> str:
    model = fields.get("model name", "")
    if not model and platform.system() == "Darwin":
        try:
            model = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                   timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            model = ""
    return model or platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict[str, str]:
    """``cpu`` (model name), ``capability`` (ATen's choice of vector kernels, e.g. AVX512, AVX2, DEFAULT) and
    ``isa``: AMX when the CPU has AMX tiles (oneDNN then uses them for bf16/int8), else AVX-512, AVX2, or the
    capability. Results are bit-identical only within one ``isa`` class."""
    import torch

    fields = _cpuinfo()
    get_cap = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    capability = str(get_cap()) if get_cap is not None else ""
    flags = set(fields.get("flags", "").split())
    if "amx_tile" in flags:
        isa = "AMX"
    elif "avx512f" in flags:
        isa = "AVX-512"
    elif "avx2" in flags:
        isa = "AVX2"
    else:
        isa = capability
    return {"cpu": _cpu_model(fields), "capability": capability, "isa": isa}


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def provenance(device: Any = None, threads: int | None = None, *, code: str | None = None) -> dict[str, Any]:
    """What a process computes with: otcbench version, git ``commit`` and ``dirty`` (null outside a git
    checkout), ``code`` fingerprint (``code``: a value computed earlier, e.g. when a grid was planned),
    python/torch/open_clip/POT versions, ``cpu``, ``capability``, ``isa``, ``gpu`` and ``cuda`` when
    ``device`` is a CUDA device, and ``threads``. No absolute paths."""
    import torch

    commit, dirty = git_state()
    info: dict[str, Any] = {
        "otcbench": otcbench.__version__,
        "commit": commit,
        "dirty": dirty,
        "code": code or code_fingerprint(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": _version("open_clip_torch"),
        "pot": _version("POT"),
        **cpu_info(),
        "gpu": None,
        "cuda": None,
        "threads": threads,
    }
    if device is not None and torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


def cpu_seconds() -> float | None:
    """User + system CPU seconds of this process and its waited-for children so far (None where the
    ``resource`` module is missing): a run's ``cpu_s`` is the difference of two readings."""
    try:
        import resource
    except ImportError:
        return None
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total


def short_commit(commit: str | None, dirty: bool | None) -> str:
    """``1a2b3c4`` (``1a2b3c4-dirty`` with uncommitted package changes); "" without a commit."""
    if not commit:
        return ""
    return commit[:7] + ("-dirty" if dirty else "")


def portable_path(path: str | Path) -> str:
    """A path fit for a committed record: as given when relative, relative to the working directory when
    inside it, else its file name alone (never absolute)."""
    p = Path(path)
    if not p.is_absolute():
        return p.as_posix()
    try:
        return p.resolve().relative_to(Path.cwd().resolve()).as_posix() or "."
    except ValueError:
        return p.name


def command_line(args: list[str]) -> str:
    """``otcbench`` + ``args`` as a shell line, each absolute path (also as the value of ``key=value``) made
    portable (:func:`portable_path`)."""
    import shlex

    def clean(arg: str) -> str:
        key, sep, value = arg.partition("=")
        if sep and Path(value).is_absolute():
            return f"{key}={portable_path(value)}"
        return portable_path(arg) if Path(arg).is_absolute() else arg

    return " ".join(["otcbench", *(shlex.quote(clean(a)) for a in args)])
