"""SDXL aspect buckets and the exact resize-then-crop each sample gets.

Sizes follow SimpleTuner's rules so its users' settings mean the same here:
- `resolution_type: pixel`: the shorter side becomes `resolution` pixels;
- `area`: `resolution` is megapixels; `pixel_area`: `resolution` is an edge in pixels (area = R²/1e6 MP).
In area modes edge = round64(sqrt(MP·1e6)), W = round64(edge·sqrt(ar)), H = round64(edge/sqrt(ar)).
Size limits (`minimum_image_size`, `maximum_image_size`, `target_downsample_size`) use the same unit;
in area modes a value above 10 is read as an edge in pixels (edge²/1e6 MP).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

from sdxl_lib.config import DatasetSettings

CROP_MULTIPLE = 64


def round_to_multiple(value: float, multiple: int = CROP_MULTIPLE) -> int:
    """Nearest multiple (halves round up), never below one multiple."""
    return max(multiple, math.floor(value / multiple + 0.5) * multiple)


def as_megapixels(value: float, settings: DatasetSettings) -> float:
    """A size setting in megapixels (area modes); values above 10 are edges in pixels."""
    if settings.resolution_type == "pixel_area" or value > 10:
        return value**2 / 1e6
    return value


def bucket_size(aspect: float, settings: DatasetSettings) -> tuple[int, int]:
    """(width, height) of the bucket for an aspect ratio (width / height, rounded to 2 places)."""
    if settings.resolution_type == "pixel":
        short = settings.resolution
        if aspect >= 1:
            return round_to_multiple(short * aspect), round_to_multiple(short)
        return round_to_multiple(short), round_to_multiple(short / aspect)
    edge = round_to_multiple(math.sqrt(as_megapixels(settings.resolution, settings) * 1e6))
    return round_to_multiple(edge * math.sqrt(aspect)), round_to_multiple(edge / math.sqrt(aspect))


def _size_measure(width: int, height: int, settings: DatasetSettings) -> float:
    """What size limits compare against: the shorter side (pixel mode) or megapixels."""
    if settings.resolution_type == "pixel":
        return min(width, height)
    return width * height / 1e6


def _limit(value: float, settings: DatasetSettings) -> float:
    return value if settings.resolution_type == "pixel" else as_megapixels(value, settings)


def is_too_small(width: int, height: int, settings: DatasetSettings) -> bool:
    minimum = settings.minimum_image_size
    return minimum is not None and _size_measure(width, height, settings) < _limit(minimum, settings)


def aspect_out_of_range(width: int, height: int, settings: DatasetSettings) -> bool:
    aspect = width / height
    low, high = settings.minimum_aspect_ratio, settings.maximum_aspect_ratio
    return (low is not None and aspect < low) or (high is not None and aspect > high)


def downsampled_size(width: int, height: int, settings: DatasetSettings) -> tuple[int, int] | None:
    """The size an image above `maximum_image_size` is shrunk to (`target_downsample_size`), or None."""
    maximum, target = settings.maximum_image_size, settings.target_downsample_size
    if maximum is None or target is None:
        return None
    if _size_measure(width, height, settings) <= _limit(maximum, settings):
        return None
    if settings.resolution_type == "pixel":
        scale = target / min(width, height)
    else:
        scale = math.sqrt(as_megapixels(target, settings) * 1e6 / (width * height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def choose_aspect(width: int, height: int, settings: DatasetSettings, rng: random.Random) -> float:
    """The bucket aspect an image is cropped to, by `crop` / `crop_aspect`."""
    own = max(0.01, round(width / height, 2))  # a 1:200 strip would otherwise round to 0
    if not settings.crop or settings.crop_aspect == "preserve":
        return own
    if settings.crop_aspect == "square":
        return 1.0
    choices = settings.aspect_choices
    if settings.crop_aspect == "closest":  # closest on a log scale: 2:1 and 1:2 are equally far from 1:1
        return min(choices, key=lambda b: (abs(math.log(b.aspect / own)), b.aspect)).aspect
    return rng.choices([b.aspect for b in choices], weights=[b.weight for b in choices])[0]


@dataclass(frozen=True)
class CropPlan:
    aspect: float
    intermediate_width: int
    intermediate_height: int
    crop_left: int
    crop_top: int
    target_width: int
    target_height: int
    flip: bool = False


def plan_crop(
    width: int, height: int, settings: DatasetSettings, seed: int, rng_key: str, aspect: float | None = None
) -> CropPlan:
    """Where a `width`x`height` image lands: its bucket, resize, and the crop actually used.

    Random choices are seeded by (`seed`, `rng_key`), so a plan is reproducible and does not depend
    on the order images are seen. `aspect` forces the bucket (used when merging small buckets).
    """
    rng = random.Random(f"{seed}:{rng_key}")
    if aspect is None:
        aspect = choose_aspect(width, height, settings, rng)
    target_w, target_h = bucket_size(aspect, settings)
    # Large images are first shrunk to target_downsample_size and the crop is taken from that
    # (SimpleTuner's meaning: it sets how much of the scene a crop keeps). Otherwise the image is
    # resized to just cover the bucket on its constraining side.
    downsampled = downsampled_size(width, height, settings)
    if downsampled and downsampled[0] >= target_w and downsampled[1] >= target_h:
        inter_w, inter_h = downsampled
    else:  # from the original size, so the intermediate keeps its aspect up to one rounding
        scale = max(target_w / width, target_h / height)
        inter_w, inter_h = max(target_w, round(width * scale)), max(target_h, round(height * scale))
    spare_w, spare_h = inter_w - target_w, inter_h - target_h
    # Without cropping only the rounding remainder goes, taken evenly from both sides.
    style = settings.crop_style if settings.crop else "center"
    if style == "center":
        left, top = spare_w // 2, spare_h // 2
    elif style == "corner":  # SimpleTuner's corner crop keeps the bottom-right corner
        left, top = spare_w, spare_h
    else:
        left, top = rng.randint(0, spare_w), rng.randint(0, spare_h)
    return CropPlan(aspect, inter_w, inter_h, left, top, target_w, target_h)


def flipped(plan: CropPlan) -> CropPlan:
    """The mirrored variant: the same crop of the horizontally flipped image (left offset mirrored)."""
    mirrored_left = plan.intermediate_width - plan.crop_left - plan.target_width
    return replace(plan, crop_left=mirrored_left, flip=True)
