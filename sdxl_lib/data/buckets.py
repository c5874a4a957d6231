"""SDXL aspect buckets and the exact resize-then-crop each sample gets.

Sizes follow SimpleTuner's rules so its users' settings mean the same here:
- `resolution_type: pixel`: the shorter side becomes `resolution` pixels;
- `area`: `resolution` is megapixels; `pixel_area`: `resolution` is an edge in pixels (area = R²/1e6 MP).
In area modes edge = round64(sqrt(MP·1e6)), W = round64(edge·sqrt(ar)), H = round64(edge/sqrt(ar)).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from sdxl_lib.config import BucketParams

CROP_MULTIPLE = 64


def round_to_multiple(value: float, multiple: int = CROP_MULTIPLE) -> int:
    """Nearest multiple (halves round up), never below one multiple."""
    return max(multiple, math.floor(value / multiple + 0.5) * multiple)


def area_megapixels(params: BucketParams) -> float:
    if params.resolution_type == "area":
        return params.resolution
    return params.resolution**2 / 1e6


def bucket_size(aspect: float, params: BucketParams) -> tuple[int, int]:
    """(width, height) of the bucket for an aspect ratio (width / height, rounded to 2 places)."""
    if params.resolution_type == "pixel":
        short = params.resolution
        if aspect >= 1:
            return round_to_multiple(short * aspect), round_to_multiple(short)
        return round_to_multiple(short), round_to_multiple(short / aspect)
    edge = round_to_multiple(math.sqrt(area_megapixels(params) * 1e6))
    return round_to_multiple(edge * math.sqrt(aspect)), round_to_multiple(edge / math.sqrt(aspect))


def is_too_small(width: int, height: int, params: BucketParams) -> bool:
    """Compare with `minimum_image_size`, in the unit of `resolution_type` (values > 10 are pixels)."""
    minimum = params.minimum_image_size
    if minimum is None:
        return False
    if params.resolution_type == "pixel":
        return min(width, height) < minimum
    minimum_mp = minimum**2 / 1e6 if minimum > 10 else minimum
    return width * height / 1e6 < minimum_mp


@dataclass(frozen=True)
class CropPlan:
    aspect: float
    intermediate_width: int
    intermediate_height: int
    crop_left: int
    crop_top: int
    target_width: int
    target_height: int


def plan_crop(width: int, height: int, params: BucketParams, rng_key: str) -> CropPlan:
    """Where a `width`x`height` image lands: its bucket, resize, and the crop actually used.

    `rng_key` seeds random crops per sample, so a plan is reproducible and independent of order.
    """
    aspect = 1.0 if params.crop and params.crop_aspect == "square" else round(width / height, 2)
    target_w, target_h = bucket_size(aspect, params)
    # Keep the aspect and cover the target on the constraining side.
    scale = max(target_w / width, target_h / height)
    inter_w = max(target_w, round(width * scale))
    inter_h = max(target_h, round(height * scale))
    spare_w, spare_h = inter_w - target_w, inter_h - target_h
    # Without cropping only the rounding remainder goes, taken evenly from both sides.
    style = params.crop_style if params.crop else "center"
    if style == "center":
        left, top = spare_w // 2, spare_h // 2
    elif style == "corner":  # SimpleTuner's corner crop keeps the bottom-right corner
        left, top = spare_w, spare_h
    else:
        rng = random.Random(f"{params.seed}:{rng_key}")
        left, top = rng.randint(0, spare_w), rng.randint(0, spare_h)
    return CropPlan(aspect, inter_w, inter_h, left, top, target_w, target_h)
