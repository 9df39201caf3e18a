"""The typer application and the options every command shares."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Distil the router of a pretrained MoE model into a balanced Latent Prototype Router.",
)


config_app = typer.Typer(no_args_is_help=True, help="Inspect the resolved configuration.")
app.add_typer(config_app, name="config")
_state = {"debug": False}

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML run config.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a key, e.g. --set dump.max_tokens=100000.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo the stage even if its manifest matches.")]


@app.callback()
def main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False) -> None:
    """Distil the router of a pretrained MoE model into a balanced Latent Prototype Router."""
    _state["debug"] = debug
