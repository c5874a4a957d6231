"""export: the trained LoRA in diffusers and/or kohya layout, with its metadata and model card."""

import json
from pathlib import Path
from typing import Any, get_args

import typer

from sdxl_lib import paths
from sdxl_lib.config import load_params
from sdxl_lib.errors import UserError
from sdxl_lib.export import LoraFormat, export_lora
from sdxl_lib.interop.hub import push_to_hub
from sdxl_lib.models.loading import load_unet_config
from sdxl_lib.sources import read_lock
from stages.common import PARAMS_OPTION, run


def run_metrics() -> dict[str, Any]:
    """The run's numbers for the model card: final train loss, and eval loss and CLIP score once
    evaluate has run."""
    metrics: dict[str, Any] = {}
    for file in (paths.TRAIN_METRICS / "metrics.json", paths.EVAL_METRICS / "metrics.json"):
        if file.is_file():
            metrics |= {k: v for k, v in json.loads(file.read_text()).items() if k != "step"}
    return metrics


def main(
    output: Path = typer.Argument(..., help="The folder to write the LoRA files and README.md to."),
    lora: Path = typer.Option(
        paths.LORA, "--lora", help="What train wrote: models/lora, or models/lora/ema."
    ),
    lora_format: str = typer.Option("both", "--format", help="both | diffusers | kohya"),
    push: str = typer.Option(
        None, "--push-to-hub", help="Then upload OUTPUT to this Hub model repo (owner/name), private if new."
    ),
    params_file: Path = PARAMS_OPTION,
) -> None:
    """Write the LoRA to OUTPUT in diffusers and/or kohya layout, metadata and model card included."""
    if lora_format not in get_args(LoraFormat):
        raise UserError(f"--format {lora_format}: use one of {', '.join(get_args(LoraFormat))}")
    params = load_params(params_file)
    unet_config = load_unet_config(read_lock(paths.LOCK))
    guidance = params.validation.validation_guidance
    for file in export_lora(lora, output, lora_format, unet_config, run_metrics(), guidance):
        typer.echo(f"export: wrote {file}")
    typer.echo(f"export: wrote {output / 'README.md'}")
    if push:
        typer.echo(f"export: pushed to {push_to_hub(output, push)}")


if __name__ == "__main__":
    run(main)
