"""The product speaks of itself: no numbered occasions of work, issue numbers or outside notes in its text.

A measurement names its machine and command (docs/benchmarks.md names the machines), a change is described
by what it changed, and a design reason is explained where it applies (docs/architecture.md or the code
comment), never by pointing at a file that is not in the repository. The patterns are assembled from pieces
so that this file does not match them itself.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_S, _I = "ses" + "sion", "is" + "sue"

#: What the shipped text must not say: (pattern, what it is).
TEXT_PATTERNS = [
    (re.compile(rf"\b[Ss]{_S[1:]}s?[ -][0-9]"), "a numbered work occasion"),
    (re.compile(rf"\bthis {_S}\b", re.IGNORECASE), "a work occasion"),
    (re.compile(rf"\b{_S}s\b", re.IGNORECASE), "work occasions"),
    (re.compile(rf"\b[Ii]{_I[1:]}s? #?[0-9]"), "an issue number"),
    (re.compile(r"\b" + "le" + r"nt\b"), "a machine on loan"),
    (re.compile(r"\b[Tt]he " + "te" + r"am'?s\b"), "notes kept outside the repository"),
    (re.compile(r"\bDES" + r"IGN\b"), "a design file outside the repository"),
    (re.compile("des" + r"ign notes\b", re.IGNORECASE), "design notes outside the repository"),
    (re.compile(r"\bMETH" + r"ODS\.md\b"), "a notes file outside the repository"),
]

#: What a test's function, class or file name must not carry.
NAME_PATTERN = re.compile(rf"(?i)({_I}|{_S})s?_?[0-9]|this_{_S}")


def _shipped_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "results" / "README.md", ROOT / "Dockerfile",
             ROOT / "pyproject.toml"]
    for folder in ("docs", "otcbench", "benchmarks", ".ci"):
        base = ROOT / folder
        if base.is_dir():
            files += [p for p in sorted(base.rglob("*")) if p.is_file() and "__pycache__" not in p.parts]
    return [p for p in files if p.is_file()]


def _text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:  # images and other binary files
        return None


def _hits(text: str) -> list[str]:
    hits = []
    for number, line in enumerate(text.splitlines(), 1):
        for pattern, what in TEXT_PATTERNS:
            match = pattern.search(line)
            if match:
                hits.append(f"{number}: {what}: …{line[max(0, match.start() - 30):match.end() + 30]}…")
    return hits


@pytest.mark.parametrize("path", _shipped_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_text_speaks_of_the_product(path: Path) -> None:
    text = _text(path)
    if text is None:
        pytest.skip("binary file")
    hits = _hits(text)
    assert not hits, f"{path.relative_to(ROOT)}:\n" + "\n".join(hits)


def test_the_recipes_folder_is_covered() -> None:
    """The top-level recipes/ links to otcbench/recipes, which the scan above reads."""
    scanned = {p.resolve() for p in _shipped_files()}
    recipes = sorted((ROOT / "otcbench" / "recipes").glob("*.yaml"))
    assert recipes and all(p.resolve() in scanned for p in recipes)


def test_test_names_speak_of_the_product() -> None:
    bad = []
    for path in sorted((ROOT / "tests").rglob("*")):
        if "__pycache__" in path.parts:
            continue
        if NAME_PATTERN.search(path.name):
            bad.append(f"file {path.relative_to(ROOT)}")
        if path.suffix == ".py" and path.is_file():
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and \
                        NAME_PATTERN.search(node.name):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("line", [
    "measured on " + _S + " 10's host", "the " + _S + "-8 calibration", "before this " + _S, "(" + _S + "s 5–7)",
    _I.capitalize() + " 19's restructuring", "(" + _I + " 17)", "no GPU was " + "le" + "nt to it",
    "the " + "te" + "am's notes", "DES" + "IGN §7", "the des" + "ign notes", "see METH" + "ODS.md",
])
def test_the_patterns_catch_what_they_are_for(line: str) -> None:
    assert _hits(line)


@pytest.mark.parametrize("line", [
    "a helper function", "the test session's fixture", "`scope=\"session\"`", "an equivalent caption",
    "magenta and rose", "one issue of the format", "AMD EPYC (Zen 4, AVX-512), torch 2.14.1",
])
def test_the_patterns_leave_product_words_alone(line: str) -> None:
    assert not _hits(line)
