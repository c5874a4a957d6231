"""Reading images and captions exactly as every stage must see them."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# Transparent pixels are composited on white, as image viewers and browsers show them.
BACKGROUND = (255, 255, 255)
SIXTEEN_BIT_MODES = {"I", "I;16", "I;16L", "I;16B"}


def count_images(folder: Path) -> int:
    """Image files anywhere under `folder`, by extension (a quick count; the bucket stage opens them)."""
    return sum(1 for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def open_rgb(path: Path) -> Image.Image:
    """The image as the user sees it: first frame of an animation, EXIF orientation applied, as RGB."""
    with Image.open(path) as image:
        return to_rgb(ImageOps.exif_transpose(image))


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: 16-bit grayscale keeps its top 8 bits (Pillow's convert would clip it to white),
    transparency (alpha, or a palette / colour-key `transparency`) is composited on BACKGROUND."""
    if image.mode in SIXTEEN_BIT_MODES:
        levels = np.asarray(image).astype(np.int64) >> 8
        image = Image.fromarray(levels.clip(0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize_and_crop(
    image: Image.Image,
    intermediate: tuple[int, int],
    crop_left: int,
    crop_top: int,
    target: tuple[int, int],
    flip: bool = False,
) -> Image.Image:
    """Resize to the intermediate (width, height) with LANCZOS, mirror if `flip`, then crop the
    target box (for a flipped variant the plan's crop offset is already mirrored)."""
    if image.size != intermediate:
        image = image.resize(intermediate, Image.Resampling.LANCZOS)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image.crop((crop_left, crop_top, crop_left + target[0], crop_top + target[1]))


def caption_from_filename(path: Path) -> str:
    """The file stem as a caption: underscores become spaces, a numeric id prefix or suffix goes."""
    text = path.stem.replace("_", " ")
    text = re.sub(r"^\d+\s+|\s+\d+$", "", text)
    return re.sub(r"\s+", " ", text).strip()
