"""evaluate-lora: score any LoRA file (ours or another trainer's) on this project's held-out data."""

from pathlib import Path

import typer

from sdxl_lib import paths
from sdxl_lib.config import load_params
from sdxl_lib.errors import UserError
from sdxl_lib.evaluate.run import evaluate, summary
from sdxl_lib.sources import read_lock
from stages.common import PARAMS_OPTION, run

LORA_ARGUMENT = typer.Argument(..., help="A .safetensors LoRA for SDXL, diffusers or kohya layout.")
OUTPUT_OPTION = typer.Option(None, "--output", "-o", help="Where results go (default: eval/<file name>).")


def main(
    lora: Path = LORA_ARGUMENT, output: Path | None = OUTPUT_OPTION, params_file: Path = PARAMS_OPTION
) -> None:
    """Eval loss (per timestep, against the base model) and CLIP score of LORA on this project's eval split,
    with the same timesteps, noise, prompts and seeds as `evaluate`, so LoRAs from different trainers
    compare on equal terms. Needs the project's caches (dvc repro encode_latents encode_text)."""
    if not lora.is_file() or lora.suffix != ".safetensors":
        raise UserError(f"{lora}: not a .safetensors file (only safetensors LoRAs are loaded)")
    for cache in (paths.LATENTS, paths.TEXT):
        if not (cache / "index.parquet").is_file():
            raise UserError(f"{cache}: no cache yet; run `dvc repro encode_latents encode_text` first")
    out_dir = output or Path("eval") / lora.stem
    metrics = evaluate(load_params(params_file), read_lock(paths.LOCK), out_dir, lora)["metrics"]
    typer.echo(
        f"evaluate-lora {lora.name}: {summary(metrics)} on {metrics['eval_samples']} held-out images; "
        f"written to {out_dir}"
    )


if __name__ == "__main__":
    run(main)
