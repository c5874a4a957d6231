"""The evaluate stage's work: eval loss and CLIP score for the base model and for base + LoRA."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from sdxl_lib import paths
from sdxl_lib.cache.latents import open_latents
from sdxl_lib.cache.text import TextCache
from sdxl_lib.config import Params
from sdxl_lib.errors import UserError
from sdxl_lib.evaluate.clip_score import ClipScorer
from sdxl_lib.evaluate.eval_loss import conditioning_of, eval_loss_by_timestep, eval_timesteps
from sdxl_lib.evaluate.images import generate_validation_images, save_images
from sdxl_lib.export import lora_components
from sdxl_lib.io import write_json
from sdxl_lib.models.loading import latent_scaling, load_noise_scheduler, load_pipeline
from sdxl_lib.sources import model_path, pin_model


def _stats(prefix: str, scores: torch.Tensor) -> dict[str, float]:
    return {
        prefix: scores.mean().item(),
        f"{prefix}_min": scores.min().item(),
        f"{prefix}_max": scores.max().item(),
        f"{prefix}_std": scores.std().item() if len(scores) > 1 else 0.0,
    }


def evaluate(params: Params, lock: dict[str, Any], out_dir: Path, lora: Path) -> dict[str, Any]:
    """Score the base model and base + the LoRA file `lora` (diffusers or kohya layout, any trainer)
    on identical inputs; writes metrics.json, eval_loss_by_timestep.json and the validation images
    to `out_dir`, and returns the first two."""
    rows = [r for r in pq.read_table(paths.PLAN).to_pylist() if r["split"] == "eval"]
    if not rows:
        raise UserError("the eval split is empty: set bucket.eval_fraction above 0 (e.g. 0.1)")
    # On a GPU when there is one: a real SDXL's eval loss and 1 MP renders would take hours on a CPU.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    latents = open_latents(params.encode, lock, rows, device)
    scheduler = load_noise_scheduler(lock, **params.train.scheduler_overrides)
    timesteps = eval_timesteps(scheduler, params.evaluate.eval_timesteps)
    scorer = ClipScorer(model_path(pin_model(params.evaluate.clip_model)))
    pipeline = load_pipeline(lock, scheduler_overrides=params.train.scheduler_overrides).to(device)
    # A LoRA with text-encoder weights: captions go through the pipeline's encoders as they stand
    # (base, then with the LoRA loaded), for base and LoRA alike.
    online = bool(lora_components(lora) - {"unet"})
    conditioning = conditioning_of(
        None if online else TextCache.open(paths.TEXT),
        [pipeline.tokenizer, pipeline.tokenizer_2],
        [pipeline.text_encoder, pipeline.text_encoder_2],
    )

    results: dict[str, torch.Tensor] = {}
    for name in ("base", "lora"):
        if name == "lora":  # the same public API users load our LoRA with
            pipeline.load_lora_weights(str(lora.parent), weight_name=lora.name)
        results[f"loss_{name}"] = eval_loss_by_timestep(
            pipeline.unet,
            scheduler,
            rows,
            latents,
            conditioning,
            latent_scaling(lock),
            timesteps,
            params.evaluate.eval_seed,
            params.evaluate.eval_batch_size,
        )
        prompts, images = zip(*generate_validation_images(pipeline, params.validation), strict=True)
        save_images(list(images), out_dir / "images", name)
        results[f"clip_{name}"] = scorer.scores(list(images), list(prompts))

    metrics = {
        "eval_loss": results["loss_lora"].mean().item(),
        "eval_loss_base": results["loss_base"].mean().item(),
        **_stats("clip_score", results["clip_lora"]),
        **_stats("clip_score_base", results["clip_base"]),
        "eval_samples": len(rows),
    }
    by_timestep = [
        {"timestep": int(t), "eval_loss_base": float(b), "eval_loss": float(lo)}
        for t, b, lo in zip(timesteps, results["loss_base"], results["loss_lora"], strict=True)
    ]
    write_json(metrics, out_dir / "metrics.json")
    write_json(by_timestep, out_dir / "eval_loss_by_timestep.json")
    return {"metrics": metrics, "by_timestep": by_timestep}


def summary(metrics: dict[str, Any]) -> str:
    """The line the evaluate commands print."""
    return (
        f"eval_loss {metrics['eval_loss']:.4f} (base {metrics['eval_loss_base']:.4f}), "
        f"clip_score {metrics['clip_score']:.2f} (base {metrics['clip_score_base']:.2f})"
    )
