"""Which caption does each matching score pick, given a trained model? (OT vs global, offline)

Runs OTCCLIP's data-side step (``otcbench defend``: every image re-paired with the best of its ``top_k``
global-cosine candidates, its own caption excluded) once per (checkpoint, alpha, top_k), and prints, for the
OT score's pick, the global cosine's pick and a random caption, the share of exact compositions, the binding
overlap and the shape overlap (``otcbench/eval/matching.py``). The data must carry ``content`` (the
compositional world). Used for docs/otcclip.md §9:

    python benchmarks/match_scores.py WORLD OUT --checkpoint RUN_A --checkpoint RUN_B \\
        --setting 0.5,5 --setting 0,5 --setting 0,50 [--csv match_scores.csv]

``--csv`` writes the rows (one per checkpoint and setting: the run's attack, defense and seed when it is a
grid's run, then ``exact_*``, ``binding_*`` and ``shape_*`` of each pick, in %) for a results directory; a
finished setting is read back from OUT instead of recomputed.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from otcbench.defenses.defend import run_defend

#: (label, summary key suffix) of the three picks every matching logs
PICKS = (("OT score", "ot"), ("global", "global"), ("random", "random"))


def run_label(run_dir: Path) -> dict[str, Any]:
    """attack, defense and seed of an `otcbench run` grid's run (from its run.json); empty strings otherwise."""
    info = run_dir / "run.json"
    meta = json.loads(info.read_text()) if info.is_file() else {}
    return {key: meta.get(key, "") for key in ("attack", "defense", "seed")}


def score_settings(world: Path, out: Path, checkpoints: list[Path], settings: list[tuple[float, int]],
                   keep: bool = False) -> list[dict[str, Any]]:
    """One defend run per checkpoint × (alpha, top_k); rows of the three picks' match statistics (in %).

    Each run's report stays in ``OUT/<checkpoint>-a<alpha>-k<top_k>/defend.json``; its re-paired dataset is
    deleted unless ``keep``.
    """
    rows = []
    for ck in checkpoints:
        for alpha, top_k in settings:
            dest = out / f"{ck.name}-a{alpha:g}-k{top_k}"
            report_file = dest / "defend.json"
            if report_file.is_file():  # resumable: a finished setting is read back
                report = json.loads(report_file.read_text())
            else:
                report = run_defend(world, dest, defense="otcclip", checkpoint=ck,
                                    options={"alpha": alpha, "top_k": top_k}, show_progress=False)
                if not keep:  # the re-paired dataset is a copy of the world: keep only the reports
                    for item in dest.iterdir():
                        if item.suffix != ".json":
                            shutil.rmtree(item) if item.is_dir() else item.unlink()
            s = report["summary"]
            row: dict[str, Any] = {"checkpoint": ck.name, **run_label(ck), "alpha": alpha, "top_k": top_k}
            for _, key in PICKS:
                row[f"exact_{key}"] = 100 * s[f"match_precision_{key}"]
                row[f"binding_{key}"] = 100 * s[f"match_overlap_{key}"]
                row[f"shape_{key}"] = 100 * s[f"match_shape_overlap_{key}"]
            rows.append(row)
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """The rows as CSV: checkpoint, alpha, top_k, then exact / binding / shape overlap of each pick (in %)."""
    cols = ["checkpoint", "attack", "defense", "seed", "alpha", "top_k",
            *(f"{stat}_{key}" for stat in ("exact", "binding", "shape") for _, key in PICKS)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({c: (f"{r[c]:.4f}" if isinstance(r[c], float) and c != "alpha" else r[c]) for c in cols})


def table(rows: list[dict[str, Any]]) -> Table:
    """The rows as one rich table: binding overlap (exact composition, shape overlap) per pick."""
    t = Table(title="caption picks: binding overlap % (exact composition %, shape overlap %)")
    for col in ("checkpoint", "alpha", "top_k", *(label for label, _ in PICKS)):
        t.add_column(col, justify="right")
    for r in rows:
        cells = [f"{r[f'binding_{k}']:.1f} ({r[f'exact_{k}']:.1f}, {r[f'shape_{k}']:.1f})" for _, k in PICKS]
        t.add_row(r["checkpoint"], f"{r['alpha']:g}", str(r["top_k"]), *cells)
    return t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("world", type=Path, help="pair dataset with a content column (the compositional world)")
    p.add_argument("out", type=Path, help="directory for the defend outputs (one sub-directory per setting)")
    p.add_argument("--checkpoint", type=Path, action="append", required=True, help="run directory (repeat)")
    p.add_argument("--setting", action="append", default=None, help="ALPHA,TOP_K (repeat; default 0.5,5)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--csv", type=Path, default=None, help="also write the rows to this CSV file")
    p.add_argument("--keep", action="store_true", help="keep each setting's re-paired dataset (a copy of WORLD)")
    a = p.parse_args()
    settings = []
    for item in a.setting or ["0.5,5"]:
        alpha, _, k = item.partition(",")
        try:
            settings.append((float(alpha), int(k)))
        except ValueError:
            p.error(f"--setting {item!r}: use ALPHA,TOP_K, e.g. 0.5,5")
    rows = score_settings(a.world, a.out, a.checkpoint, settings, keep=a.keep)
    if a.csv is not None:
        write_csv(rows, a.csv)
    if a.json:
        print(json.dumps(rows, indent=2))
    else:
        Console().print(table(rows))


if __name__ == "__main__":
    main()
