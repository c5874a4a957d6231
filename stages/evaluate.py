"""evaluate: stable eval loss and CLIP score, for the base model and for base + LoRA."""

from pathlib import Path

import typer

from sdxl_lib import paths
from sdxl_lib.config import load_params
from sdxl_lib.evaluate.run import evaluate, summary
from sdxl_lib.export import lora_file
from sdxl_lib.sources import read_lock
from stages.common import PARAMS_OPTION, run


def main(params_file: Path = PARAMS_OPTION) -> None:
    """Write metrics/evaluate/metrics.json, per-timestep losses and the validation images."""
    lora = lora_file(paths.LORA)  # the diffusers-layout file, or the kohya one (lora_format kohya)
    result = evaluate(load_params(params_file), read_lock(paths.LOCK), paths.EVAL_METRICS, lora)
    typer.echo(f"evaluate: {summary(result['metrics'])}")


if __name__ == "__main__":
    run(main)
