"""Validation images: the same prompts and seeds for every run, so runs can be compared by eye."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from tqdm import tqdm

from sdxl_lib.config import ValidationParams


@torch.no_grad()
def generate_validation_images(
    pipeline: StableDiffusionXLPipeline, params: ValidationParams
) -> list[Image.Image]:
    """One image per validation prompt, each from its own fixed seed."""
    width, height = params.size
    images = []
    for index, prompt in enumerate(tqdm(params.validation_prompts, desc="validation", unit="img")):
        generator = torch.Generator("cpu").manual_seed(params.validation_seed + index)
        images += pipeline(
            prompt,
            width=width,
            height=height,
            guidance_scale=params.validation_guidance,
            num_inference_steps=params.validation_num_inference_steps,
            generator=generator,
        ).images
    return images


def save_images(images: list[Image.Image], directory: Path, prefix: str) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{prefix}_{i:02d}.png" for i in range(len(images))]
    for image, path in zip(images, paths, strict=True):
        image.save(path)
    return paths
