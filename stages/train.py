"""train: fit a LoRA on the cached latents and text embeddings (runs under accelerate launch too)."""

from pathlib import Path

import typer

from sdxl_lib import paths
from sdxl_lib.config import load_params
from sdxl_lib.sources import read_lock
from sdxl_lib.train.loop import train
from stages.common import PARAMS_OPTION, run


def main(params_file: Path = PARAMS_OPTION) -> None:
    """Write the LoRA to models/lora, checkpoints to models/checkpoints, metrics to metrics/train."""
    result = train(load_params(params_file), read_lock(paths.LOCK))
    if result is not None:  # only the main process reports
        typer.echo(
            f"train: {result['steps']} steps on {result['processes']} process(es) in "
            f"{result['train_seconds']:.0f} s ({result['steps'] / result['step_seconds']:.2f} steps/s; "
            f"{result['train_seconds'] - result['step_seconds']:.0f} s of it eval loss, validation and "
            f"checkpoints), final loss {result['final_train_loss']:.4f}, LoRA in {paths.LORA}"
        )


if __name__ == "__main__":
    run(main)
