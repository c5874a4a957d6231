"""`sdxl-lora`: every pipeline stage as a subcommand (what dvc.yaml runs)."""

import importlib
import sys
from collections.abc import Iterable

import typer

from stages.common import guarded

# `sdxl-lora <command>` imports that command's module in stages/ (its name with _ for -) only, so
# `sdxl-lora bucket` starts without loading torch and diffusers, which it does not use.
COMMANDS = [
    "download",
    "bucket",
    "encode_latents",
    "encode_text",
    "train",
    "evaluate",
    "evaluate-lora",
    "export",
    "import-simpletuner",
    "configure",
]


def build_app(names: Iterable[str] = COMMANDS) -> typer.Typer:
    """The `sdxl-lora` command with these subcommands."""
    app = typer.Typer(
        add_completion=False,
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        help="SDXL LoRA training as a DVC pipeline of stages.",
    )
    app.callback()(lambda: None)  # a group even with one subcommand: `sdxl-lora bucket` keeps its name
    for name in names:
        module = importlib.import_module(f"stages.{name.replace('-', '_')}")
        app.command(name, help=module.main.__doc__)(guarded(module.main))
    return app


def main() -> None:
    requested = [arg for arg in sys.argv[1:2] if arg in COMMANDS]
    build_app(requested or COMMANDS)()  # without a known command, --help and errors list them all


if __name__ == "__main__":
    main()
