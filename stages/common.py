"""What every stage command shares: the --params option and one-line errors for user mistakes."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from sdxl_lib.errors import UserError

PARAMS_OPTION = typer.Option(Path("params.yaml"), "--params", help="The params file to read.")


def quiet_libraries() -> None:
    """Our own progress bars say what runs; the libraries' loading chatter would bury them."""
    import diffusers
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


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
