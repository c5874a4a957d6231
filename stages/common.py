"""What every stage command shares: the --params option and one-line errors for user mistakes."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from sdxl_lib.errors import UserError

PARAMS_OPTION = typer.Option(Path("params.yaml"), "--params", help="The params file to read.")


def quiet_libraries() -> None:
    """diffusers' loading bars, which no environment variable turns off (see stages/__init__.py);
    only if the command's module imported diffusers: importing it takes seconds, which a command
    that loads no model (bucket, configure, a refused argument) should not wait for."""
    if "diffusers" in sys.modules:
        sys.modules["diffusers"].utils.logging.disable_progress_bar()


def guarded(command: Callable[..., Any]) -> Callable[..., Any]:
    """A user mistake ends the command with `error: ...` and exit code 2, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            quiet_libraries()
            return command(*args, **kwargs)
        except UserError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def run(command: Callable[..., Any]) -> None:
    """Entry point for `python -m stages.<name>`."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(guarded(command))
    app()
