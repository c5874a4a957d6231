"""The built-in demo dataset: deterministic captioned images of shapes, so the demo needs no download.

Mixed sizes and aspect ratios (portrait, landscape, square, a few too small to use, a few large),
captioned from file names and, for some, from richer `.txt` sidecars.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "orange": (240, 140, 30),
    "purple": (140, 60, 180),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "star")
POSITIONS = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "center": (0.5, 0.5),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
}
# (width, height): square, landscape, portrait, large, and too small to train on.
SIZES = [
    (320, 320),
    (384, 256),
    (256, 384),
    (448, 320),
    (320, 448),
    (512, 288),
    (288, 512),
    (640, 640),
    (96, 96),
    (120, 80),
]
NUM_IMAGES = 64


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, int, int]
) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:  # five-pointed star
        points = [
            (
                cx + (r if i % 2 == 0 else r / 2.5) * math.sin(i * math.pi / 5),
                cy - (r if i % 2 == 0 else r / 2.5) * math.cos(i * math.pi / 5),
            )
            for i in range(10)
        ]
        draw.polygon(points, fill=fill)


def generate_demo_dataset(directory: Path, seed: int = 0) -> int:
    """Write the demo images (and some `.txt` captions) into `directory`; returns the image count."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    for index in range(NUM_IMAGES):
        width, height = SIZES[index % len(SIZES)]
        shape = rng.choice(SHAPES)
        colour, background = rng.sample(names, 2)
        position = rng.choice(list(POSITIONS))
        image = Image.new("RGB", (width, height), COLOURS[background])
        fx, fy = POSITIONS[position]
        radius = min(width, height) * rng.uniform(0.12, 0.22)
        _draw_shape(ImageDraw.Draw(image), shape, fx * width, fy * height, radius, COLOURS[colour])
        stem = f"{index:03d}_a_{colour}_{shape}_on_a_{background}_background"
        image.save(directory / f"{stem}.png")
        if index % 2 == 0:  # every other image also has a richer sidecar caption
            caption = f"a {colour} {shape} at the {position} of a plain {background} background"
            (directory / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")
    return NUM_IMAGES
