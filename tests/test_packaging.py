"""The install paths the README promises: the Dockerfile builds from what the repository holds."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


def test_dockerfile_copies_only_real_paths_of_the_repository() -> None:
    """COPY of a linked source behaves differently between builders (recipes/ is a link): copy real paths."""
    copies = [args.split()[:-1] for op, args in _instructions() if op == "COPY"]
    assert copies
    for sources in copies:
        for src in sources:
            path = ROOT / src
            assert path.exists(), f"Dockerfile copies {src}, which the repository does not hold"
            assert not path.is_symlink(), f"Dockerfile copies {src}, a symlink"


def test_dockerfile_installs_like_the_readme_and_keeps_the_recipes_path() -> None:
    runs = " && ".join(args for op, args in _instructions() if op == "RUN")
    assert "pip install -e ." in runs
    assert "pip install -e ." in (ROOT / "README.md").read_text()
    # `otcbench run recipes/quickstart.yaml` works inside the image as in a checkout
    assert re.search(r"ln -s otcbench/recipes recipes", runs)
    assert (ROOT / "recipes").resolve() == (ROOT / "otcbench" / "recipes").resolve()
    base = next(args for op, args in _instructions() if op == "FROM")
    assert base.startswith("pytorch/pytorch:") and "cuda" in base
