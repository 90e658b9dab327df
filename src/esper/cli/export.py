"""`esper export RUN_DIR --out DIR`: a run's final model as safetensors, a JSON spec and a model card.

Kept in its own module so that the command line's layout can change around it: `register(app)` adds the
command to any Typer application.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console


def register(app: typer.Typer) -> None:
    """Add `export` to `app`."""
    app.command("export")(export)


def export(
    run_dir: Annotated[Path, typer.Argument(help="The run directory (the one `esper run` wrote).")],
    out: Annotated[Path, typer.Option("--out", help="Directory to write the exported model to.")],
) -> None:
    """Write the run's final model (fossilised seeds and merged widens folded in, no seed machinery) to
    OUT as model.safetensors, model.json and model_card.json; `esper.portable.load(OUT)` rebuilds it
    with plain PyTorch."""
    from esper.leyline import EsperError
    from esper.tolaria.export import export_run

    try:
        written = export_run(run_dir, out)
    except EsperError as exc:
        Console(stderr=True).print(f"[bold red]esper export failed[/]: {exc}")
        raise typer.Exit(1) from exc
    Console().print(f"exported the final model of {run_dir} to {written}")
