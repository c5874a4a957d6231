"""bf16 autocast against fp32 on a CPU: the built-in tiny SDXL pipeline rendering one validation
image, as train's validation and evaluate do (why `import-simpletuner` and `configure` warn about
SimpleTuner's default `mixed_precision: bf16` on a machine without a GPU)."""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import StableDiffusionXLPipeline

from sdxl_lib.models import TINY_SDXL
from sdxl_lib.sources import model_path, pin_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    pipeline = StableDiffusionXLPipeline.from_pretrained(
        model_path(pin_model(TINY_SDXL)), use_safetensors=True
    )
    pipeline.set_progress_bar_config(disable=True)
    for name, enabled in (("fp32", False), ("bf16 autocast", True)):
        seconds = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
                pipeline("a cat", width=args.size, height=args.size, num_inference_steps=args.steps)
            seconds.append(time.perf_counter() - started)
        print(f"{name}: median {statistics.median(seconds):.1f} s over {args.repeats} runs ({args.size} px)")


if __name__ == "__main__":
    main()
