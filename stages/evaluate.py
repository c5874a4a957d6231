"""evaluate: stable eval loss and CLIP score, for the base model and for base + LoRA."""

from pathlib import Path

import typer

from sdxl_lib import paths
from sdxl_lib.config import load_params
from sdxl_lib.evaluate.run import evaluate
from sdxl_lib.export import lora_file
from sdxl_lib.io import write_json
from sdxl_lib.sources import read_lock
from stages.common import PARAMS_OPTION, run


def main(params_file: Path = PARAMS_OPTION) -> None:
    """Write metrics/evaluate/metrics.json, per-timestep losses and the validation images."""
    lora = lora_file(paths.LORA)  # the diffusers-layout file, or the kohya one (lora_format kohya)
    result = evaluate(load_params(params_file), read_lock(paths.LOCK), paths.EVAL_METRICS, lora)
    write_json(result["metrics"], paths.EVAL_METRICS / "metrics.json")
    write_json(result["by_timestep"], paths.EVAL_METRICS / "eval_loss_by_timestep.json")
    m = result["metrics"]
    typer.echo(
        f"evaluate: eval_loss {m['eval_loss']:.4f} (base {m['eval_loss_base']:.4f}), "
        f"clip_score {m['clip_score']:.2f} (base {m['clip_score_base']:.2f})"
    )


if __name__ == "__main__":
    run(main)
