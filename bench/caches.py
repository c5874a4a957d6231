"""Cache benchmarks: encoder throughput against a naive loop, and the train data path at 1k-10k samples.

    python bench/caches.py encoders [--images 512] [--repeat 3] [--threads N]
    python bench/caches.py data-path [--sizes 1000 2000 5000 10000]

`encoders` plans generated demo images at 256 px and encodes them with the built-in tiny SDXL's VAE
and text encoders, first through the cache stages' batched code (`encode_latents`, `encode_captions`),
then, as the baseline in the same run, with a naive loop that encodes and saves one item at a time.
`--threads 1` leaves a core free of torch work, as when the model runs on a GPU, which shows the
overlap of image decoding (on threads) with encoding.

`data-path` writes caches in the real format with SDXL's full-size shapes at 1024x1024 (latent mean and
std [4, 128, 128], prompt embeds [77, 2048], pooled [1280], bf16, one distinct caption per sample) for
each size, then reads one epoch through the train stage's `batch_inputs` in a fresh process and reports
its time and memory: peak RSS (which includes the memory-mapped shard pages the kernel can drop) and
peak anonymous memory (what the process itself holds).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from accelerate import PartialState
from safetensors.torch import save_file

from sdxl_lib.cache.latents import LatentCache, encode_latents, planned_pixels
from sdxl_lib.cache.shards import INDEX, ShardWriter
from sdxl_lib.cache.text import TextCache, encode_captions, encode_prompts
from sdxl_lib.config import BucketParams
from sdxl_lib.data.demo import generate_demo_dataset
from sdxl_lib.data.plan import build_plan
from sdxl_lib.models import TINY_SDXL
from sdxl_lib.models.loading import load_text_encoders, load_vae
from sdxl_lib.sources import pin_model
from sdxl_lib.train.loop import batch_inputs
from sdxl_lib.train.utils import BatchOrder


def timed(function: object, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_encoders(count: int, repeat: int, work: Path) -> None:
    torch.set_grad_enabled(False)
    for seed in range(-(-count // 64)):
        generate_demo_dataset(work / "images" / f"set{seed}", seed=seed)
    plan, _, _ = build_plan(
        [("bench", work / "images")], BucketParams(resolution=256, minimum_image_size=64), work, 4
    )
    rows = plan.to_pylist()[:count]
    captions = [f"{row['caption']} number {i}" for i, row in enumerate(rows)]  # all distinct
    lock = {"model": pin_model(TINY_SDXL), "vae": None}
    vae = load_vae(lock)
    tokenizers, encoders = load_text_encoders(lock)
    state = PartialState()

    def ours_vae(batch_size: int) -> None:
        shutil.rmtree(work / "latents", ignore_errors=True)
        encode_latents(rows, vae, work, work / "latents", batch_size, "bf16", 64, "bench", state)

    def naive_vae() -> None:
        shutil.rmtree(work / "naive", ignore_errors=True)
        (work / "naive").mkdir()
        for i, row in enumerate(rows):
            posterior = vae.encode(planned_pixels(row, work)[None]).latent_dist
            tensors = {"mean": posterior.mean[0].bfloat16(), "std": posterior.std[0].bfloat16()}
            save_file(tensors, str(work / "naive" / f"{i}.safetensors"))

    def ours_text() -> None:
        shutil.rmtree(work / "text", ignore_errors=True)
        encode_captions(captions, tokenizers, encoders, work / "text", 16, "bf16", 64, "bench", state)

    def naive_text() -> None:
        shutil.rmtree(work / "naive", ignore_errors=True)
        (work / "naive").mkdir()
        for i, caption in enumerate(captions):
            embeds, pooled = encode_prompts(tokenizers, encoders, [caption])
            tensors = {"prompt_embeds": embeds[0].bfloat16(), "pooled": pooled[0].bfloat16()}
            save_file(tensors, str(work / "naive" / f"{i}.safetensors"))

    buckets = sorted({(r["target_width"], r["target_height"]) for r in rows})
    print(
        f"{len(rows)} images in {len(buckets)} buckets, {torch.get_num_threads()} torch threads, "
        f"median of {repeat} runs"
    )
    naive = timed(naive_vae, repeat)
    print(f"VAE naive one-at-a-time loop: {len(rows) / naive:.1f} images/s ({naive:.2f} s)")
    for batch_size in (1, 8):
        ours = timed(lambda b=batch_size: ours_vae(b), repeat)
        print(f"VAE cache stage, vae_batch_size {batch_size}: {len(rows) / ours:.1f} images/s ({ours:.2f} s)")
    naive, ours = timed(naive_text, repeat), timed(ours_text, repeat)
    print(f"text naive one-at-a-time loop: {len(captions) / naive:.1f} captions/s ({naive:.2f} s)")
    print(f"text cache stage, text_batch_size 16: {(len(captions) + 1) / ours:.1f} captions/s ({ours:.2f} s)")


def synthetic_rows(count: int) -> list[dict]:
    """Plan rows (every plan column) of `count` 1024x1024 samples, as the train stage reads them."""
    return [
        {
            "variant_id": f"v{i:05d}",
            "sample_id": f"s{i:05d}",
            "dataset_id": "bench",
            "path": f"data/raw/bench/{i:05d}_a_photo.jpg",
            "caption": f"a photo number {i}",
            "split": "train",
            "original_width": 1536,
            "original_height": 1536,
            "aspect": 1.0,
            "flip": False,
            "target_width": 1024,
            "target_height": 1024,
            "intermediate_width": 1024,
            "intermediate_height": 1024,
            "crop_left": 0,
            "crop_top": 0,
            "repeats": 0,
            "probability": 1.0,
        }
        for i in range(count)
    ]


def write_synthetic_caches(rows: list[dict], folder: Path) -> None:
    """Latent and text caches in the stages' format (shards + index), filled with random values."""
    generator = torch.Generator().manual_seed(0)
    for name, id_column, shapes in (
        ("latents", "variant_id", {"mean": (4, 128, 128), "std": (4, 128, 128)}),
        ("text", "caption", {"prompt_embeds": (77, 2048), "pooled_prompt_embeds": (1280,)}),
    ):
        writer = ShardWriter(folder / name, name, 512 << 20, torch.bfloat16)
        index = []
        for i, row in enumerate(rows):
            tensors = {k: torch.rand(shape, generator=generator) + 0.01 for k, shape in shapes.items()}
            index.append(
                {"key": f"k{i:05d}", id_column: row[id_column], "shard": writer.add(f"k{i:05d}", tensors)}
            )
        writer.flush()
        pq.write_table(pa.Table.from_pylist(index), folder / name / INDEX)


def memory_mb() -> tuple[float, float]:
    """(peak RSS, current anonymous RSS) of this process, in MB, from /proc."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status["VmHWM"].split()[0]) / 1024, int(status["RssAnon"].split()[0]) / 1024


def read_epoch(folder: Path, count: int) -> None:
    """One epoch of the train stage's data path over the caches in `folder`; prints JSON figures."""
    rows = synthetic_rows(count)
    latents, texts = LatentCache.open(folder / "latents"), TextCache.open(folder / "text")
    order = BatchOrder(rows, 4, seed=0)
    generator = torch.Generator().manual_seed(0)
    start_anon = memory_mb()[1]
    peak_anon = start_anon
    start = time.perf_counter()
    for index in range(count // 4):
        batch = order[index]
        inputs = batch_inputs(batch, [generator] * len(batch), latents, texts, (0.13025, 0.0))
        assert inputs["model_input"].shape == (4, 4, 128, 128)
        if index % 25 == 0:
            peak_anon = max(peak_anon, memory_mb()[1])
    seconds = time.perf_counter() - start
    peak_rss, anon = memory_mb()
    figures = {"seconds": seconds, "peak_rss_mb": peak_rss, "peak_anon_mb": max(peak_anon, anon)}
    print(json.dumps({**figures, "anon_at_start_mb": start_anon}))


def bench_data_path(sizes: list[int], work: Path) -> None:
    print("samples | cache on disk | epoch time | ms/sample | peak RSS | peak anonymous memory")
    for count in sizes:
        folder = work / f"n{count}"
        write_synthetic_caches(synthetic_rows(count), folder)
        disk = sum(f.stat().st_size for f in folder.rglob("*")) / 1e9
        result = subprocess.run(
            [sys.executable, __file__, "read-epoch", str(folder), str(count)],
            capture_output=True,
            text=True,
            check=True,
        )
        figures = json.loads(result.stdout.strip().splitlines()[-1])
        seconds = figures["seconds"]
        print(
            f"{count} | {disk:.1f} GB | {seconds:.1f} s | {seconds / count * 1e3:.2f} | "
            f"{figures['peak_rss_mb']:.0f} MB | {figures['peak_anon_mb']:.0f} MB"
        )
        shutil.rmtree(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    encoders = sub.add_parser("encoders")
    encoders.add_argument("--images", type=int, default=512)
    encoders.add_argument("--repeat", type=int, default=3)
    encoders.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    data_path = sub.add_parser("data-path")
    data_path.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 5000, 10000])
    epoch = sub.add_parser("read-epoch")  # internal: the measured process of data-path
    epoch.add_argument("folder", type=Path)
    epoch.add_argument("count", type=int)
    args = parser.parse_args()
    if args.command == "read-epoch":
        read_epoch(args.folder, args.count)
        return
    with tempfile.TemporaryDirectory(prefix="sdxl-lora-bench-") as work:
        if args.command == "encoders":
            torch.set_num_threads(args.threads or torch.get_num_threads())
            bench_encoders(args.images, args.repeat, Path(work))
        else:
            bench_data_path(args.sizes, Path(work))


if __name__ == "__main__":
    main()
