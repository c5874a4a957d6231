"""import-simpletuner: a SimpleTuner config.json (and multidatabackend.json) as params.yaml."""

from pathlib import Path

import torch
import typer

from sdxl_lib.config import dump_params, sanity_warnings
from sdxl_lib.data.images import count_images
from sdxl_lib.interop.simpletuner import OUR_CHOICES, import_config
from stages.common import run


def main(
    config: Path = typer.Argument(..., help="SimpleTuner's config.json."),
    backend: Path = typer.Argument(
        None, help="multidatabackend.json (default: the config's data_backend_config)."
    ),
    output: Path = typer.Option(Path("params.yaml"), "-o", "--output", help="The params file to write."),
) -> None:
    """Translate a SimpleTuner SDXL LoRA setup into params.yaml, saying what was left out and why."""
    imported = import_config(config, backend)
    for key, value in imported.defaults:
        typer.echo(f"SimpleTuner default (the file is silent, ours differs): {key} = {value}")
    for key, why in OUR_CHOICES.items():
        typer.echo(f"kept ours: {key} = {why}")
    for key, why in imported.ignored:
        typer.echo(f"ignored {key}: {why}")
    if backend is None and imported.params.download.datasets[0].source == "builtin:demo":
        typer.echo("no dataloader file given: the built-in demo dataset stays (pass MULTIDATABACKEND_JSON)")
    sources = [Path(d.source) for d in imported.params.download.datasets]
    images = sum(count_images(s) for s in sources) if all(s.is_dir() for s in sources) else None
    for warning in sanity_warnings(imported.params, images, torch.cuda.is_available()):
        typer.echo(f"warning: {warning}")
    header = (
        f"Imported from {config}{f' and {backend}' if backend else ''} by `sdxl-lora import-simpletuner`."
    )
    output.write_text(dump_params(imported.params, header))
    typer.echo(f"import-simpletuner: wrote {output}; run it with `dvc repro`")


if __name__ == "__main__":
    run(main)
