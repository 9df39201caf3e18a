"""The ``lpr-distill`` command line: one subcommand per stage, plus demo, run, status and config.

Every command takes ``--config FILE`` and ``--set KEY=VALUE`` overrides. For commands with a run
directory the base config is ``--config`` if given, else the run directory's own ``config.yaml``,
else the defaults; the resolved config is saved back as ``RUN_DIR/config.yaml``.
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.markup import escape

from pipeline.cli import stage_commands, support_commands  # registers the commands on the app
from pipeline.cli.app import _state, app
from pipeline.errors import LprError, storage_error

__all__ = ["app", "run", "stage_commands", "support_commands"]


def run() -> None:
    """Console-script entry point: one line and a non-zero exit for every user error."""
    try:
        app(standalone_mode=False)
    except LprError as err:
        if _state["debug"]:
            raise
        Console(stderr=True).print(f"[red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        Console(stderr=True).print("[red]interrupted[/] — rerun the same command to resume")
        sys.exit(130)
    except Exception as err:
        import click

        if isinstance(err, click.exceptions.Exit):
            sys.exit(err.exit_code)
        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(err.exit_code)
        if _state["debug"]:
            raise
        if (mapped := storage_error(err)) is not None:  # a full disk or an unwritable path, however wrapped
            Console(stderr=True).print(f"[red]error:[/] {escape(str(mapped))}", highlight=False, soft_wrap=True)
            sys.exit(2)
        first = str(err).splitlines()[0] if str(err) else ""
        Console(stderr=True).print(
            f"[red]error:[/] {type(err).__name__}: {escape(first)}. Rerun with --debug for the traceback.",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)


if __name__ == "__main__":
    run()
