"""Validation images: the same prompts and seeds for every run, so runs can be compared by eye."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from tqdm import tqdm

from sdxl_lib.config import ValidationParams
from sdxl_lib.evaluate.previews import Previews
from sdxl_lib.io import write_png

GRID_CELL_HEIGHT = 256


@torch.no_grad()
def generate_validation_images(
    pipeline: StableDiffusionXLPipeline,
    params: ValidationParams,
    previews: Previews | None = None,
    training_step: int = 0,
) -> list[tuple[str, Image.Image]]:
    """(prompt, image) for each validation prompt at each validation resolution, prompt by prompt.
    Each prompt has its own fixed seed, the same at every resolution, step and run. With `previews`,
    the images forming are posted as they denoise."""
    jobs = [(i, prompt, size) for i, prompt in enumerate(params.prompts) for size in params.sizes]
    images = []
    for index, prompt, (width, height) in tqdm(jobs, desc="validation", unit="img", leave=False):
        generator = torch.Generator("cpu").manual_seed(params.validation_seed + index)
        image = pipeline(
            prompt,
            negative_prompt=params.validation_negative_prompt,
            width=width,
            height=height,
            guidance_scale=params.validation_guidance,
            num_inference_steps=params.validation_num_inference_steps,
            generator=generator,
            callback_on_step_end=previews.callback(prompt, training_step) if previews else None,
        ).images[0]
        images.append((prompt, image))
    return images


def save_images(images: list[Image.Image], directory: Path, prefix: str) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{prefix}_{i:02d}.png" for i in range(len(images))]
    for image, path in zip(images, paths, strict=True):
        write_png(image, path)
    return paths


def image_grid(images: list[Image.Image], columns: int) -> Image.Image:
    """Images in rows of `columns` (one row per prompt, one column per resolution), each scaled to
    the same height so different aspect ratios line up."""
    cells = [
        image.resize((max(1, round(image.width * GRID_CELL_HEIGHT / image.height)), GRID_CELL_HEIGHT))
        for image in images
    ]
    rows = [cells[i : i + columns] for i in range(0, len(cells), columns)]
    width = max(sum(cell.width for cell in row) for row in rows)
    grid = Image.new("RGB", (width, GRID_CELL_HEIGHT * len(rows)), "white")
    for r, row in enumerate(rows):
        left = 0
        for cell in row:
            grid.paste(cell, (left, r * GRID_CELL_HEIGHT))
            left += cell.width
    return grid
