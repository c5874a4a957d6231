"""Time the bucket stage's planning of 10,000 mixed JPEG/PNG/WebP images.

    python bench/bucket_10k.py [--count 10000] [--images /tmp/sdxl-lora-bench-10k] [--repeat 3]

Generates the image set once (deterministic sizes 256-2048 px, portrait/landscape/square, three
formats, some with .txt captions), then plans it with all cores and, as the baseline in the same
run, with one worker. Prints the median of `--repeat` runs of each.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image, ImageDraw

from sdxl_lib.config import BucketParams
from sdxl_lib.data.plan import build_plan, verify_pixels

FORMATS = ("jpg", "png", "webp")


def make_image(job: tuple[Path, int]) -> int:
    folder, index = job
    rng = random.Random(index)
    width, height = rng.randint(256, 2048), rng.randint(256, 2048)
    image = Image.new("RGB", (width, height), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x, y = rng.randrange(width), rng.randrange(height)
        draw.ellipse(
            (x, y, x + width // 4, y + height // 4), fill=(rng.randrange(256), 0, rng.randrange(256))
        )
    path = folder / f"{index:05d}_photo.{FORMATS[index % 3]}"
    image.save(path, quality=90) if path.suffix != ".png" else image.save(path, compress_level=1)
    if index % 2 == 0:
        path.with_suffix(".txt").write_text(f"a photo number {index}")
    return path.stat().st_size


def ensure_images(folder: Path, count: int) -> None:
    existing = sum(1 for p in folder.glob("*") if p.suffix != ".txt") if folder.is_dir() else 0
    if existing == count:
        return
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        sizes = list(pool.map(make_image, [(folder, i) for i in range(count)], chunksize=32))
    print(f"generated {count} images ({sum(sizes) / 1e6:.0f} MB) in {time.perf_counter() - start:.0f} s")


def time_plan(folder: Path, workers: int, repeat: int) -> float:
    params = BucketParams(resolution=1024, minimum_image_size=512, crop_style="random")
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        plan, _, _ = build_plan([("bench", folder)], params, folder.parent, batch_size=4, workers=workers)
        times.append(time.perf_counter() - start)
    print(f"  workers={workers}: {plan.num_rows} planned, runs {[round(t, 2) for t in times]} s")
    return statistics.median(times)


def time_pixel_check(folder: Path, repeat: int) -> float:
    """The share of the plan that is the truncation check (verify_pixels), on one worker."""
    files = [p.read_bytes() for p in sorted(folder.glob("*")) if p.suffix != ".txt"]
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        for data in files:
            with Image.open(io.BytesIO(data)) as image:
                verify_pixels(image, data)
        times.append(time.perf_counter() - start)
    print(f"  pixel check alone, 1 worker: runs {[round(t, 2) for t in times]} s")
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--images", type=Path, default=Path("/tmp/sdxl-lora-bench-10k"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    folder = args.images / "images"
    ensure_images(folder, args.count)
    cores = os.cpu_count() or 1
    parallel = time_plan(folder, cores, args.repeat)
    baseline = time_plan(folder, 1, args.repeat)
    check = time_pixel_check(folder, args.repeat)
    print(
        f"median: {parallel:.2f} s on {cores} workers, {baseline:.2f} s on 1 worker (baseline); "
        f"{args.count / parallel:.0f} images/s; of the 1-worker time, {check:.2f} s is the pixel check"
    )


if __name__ == "__main__":
    main()
