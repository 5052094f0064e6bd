"""``otcbench list …``: registered models, defenses, attacks, import formats and shipped recipes."""

from __future__ import annotations

from typing import Annotated

import typer

from otcbench import render
from otcbench.commands.common import console, flag, handle_errors

list_app = typer.Typer(help="List registered models, defenses, attacks and recipes.", no_args_is_help=True)


@list_app.command("models")
@handle_errors
def list_models(
    all_: Annotated[bool, flag("--all", help="Also list every open_clip architecture.")] = False,
) -> None:
    """List model architectures (bundled tiny configs first).

    Example: otcbench list models --all
    """
    from otcbench.models import bundled_model_names, list_model_names, model_summary

    bundled = bundled_model_names()
    names = bundled + ([n for n in list_model_names() if n not in bundled] if all_ else [])
    summaries = [{**model_summary(n, count_params=n in bundled), "name": n} for n in names]
    title = "models" + ("" if all_ else " (bundled; --all for every open_clip name)")
    console.print(render.models_table(summaries, title))


@list_app.command("defenses")
@handle_errors
def list_defenses() -> None:
    """List defenses, each option with its default and description (set one with --set defense.options.KEY=VALUE
    on `train`).

    A variant registered under its own name (a subclass of another defense with other defaults) is a line
    of its own, with what its defaults change from its parent's.

    Example: otcbench list defenses
    """
    from otcbench.defenses import DEFENSES
    from otcbench.defenses.labels import compact, registered_variant_of

    def variant_note(cls: type) -> str:
        of = registered_variant_of(cls)
        if of is None:
            return ""
        parent, phrases = of
        return f"variant of {parent}" + (f": {compact(phrases, max_phrases=8)}" if phrases else "")

    console.print(render.registry_table(DEFENSES, "defenses", note=variant_note))


@list_app.command("detectors")
@handle_errors
def list_detectors() -> None:
    """List poisoned-sample detectors and their options (`defend --detector NAME --set detector.NAME.KEY=V`).

    Example: otcbench list detectors
    """
    from otcbench.defenses.detectors import DETECTORS

    console.print(render.registry_table(DETECTORS, "detectors"))


@list_app.command("attacks")
@handle_errors
def list_attacks() -> None:
    """List attacks, each option with its default and description (set one with --set KEY=VALUE on `poison`).

    Example: otcbench list attacks
    """
    from otcbench.attacks import ATTACKS

    console.print(render.registry_table(ATTACKS, "attacks", with_kind=True))


@list_app.command("formats")
@handle_errors
def list_formats() -> None:
    """List `data import` formats: what SRC is, what they make, their own options.

    Example: otcbench list formats
    """
    from otcbench.data.importers import IMPORTERS, ImportOptions

    console.print(render.formats_table(IMPORTERS, set(ImportOptions.model_fields)))


@list_app.command("recipes")
@handle_errors
def list_recipes() -> None:
    """List the shipped recipes (run one with `otcbench run NAME`).

    Example: otcbench list recipes
    """
    from otcbench.bench.recipe import RECIPE_DIR, grid_size, load_recipe, recipe_names

    rows = []
    for name in recipe_names():
        rec, _ = load_recipe(name)
        needs = ["GPU"] if rec.requires.gpu else ["CPU"]
        if rec.data.path:
            needs.append(f"data: {rec.data.path}")
        rows.append((name, grid_size(rec), needs, " ".join(rec.description.split())))
    console.print(render.recipes_table(rows, str(RECIPE_DIR)))
