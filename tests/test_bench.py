"""The benchmark scripts run (at toy sizes), so they never rot; their figures live in BENCHMARKS.md."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from conftest import ROOT, run


def test_cache_benchmarks_run_at_toy_size(tmp_path: Path) -> None:
    data_path = run([sys.executable, str(ROOT / "bench/caches.py"), "data-path", "--sizes", "8"], tmp_path)
    rows = [line.split(" | ") for line in data_path.stdout.splitlines() if line[:1].isdigit()]
    assert [row[0] for row in rows] == ["8"]
    assert all(float(row[4].removesuffix(" MB")) > 0 for row in rows)
    encoders = run(
        [sys.executable, str(ROOT / "bench/caches.py"), "encoders", "--images", "16", "--repeat", "1"],
        tmp_path,
    )
    assert encoders.stdout.count("images/s") == 3 and encoders.stdout.count("captions/s") == 2


def test_train_benchmark_runs_at_toy_size(tmp_path: Path) -> None:
    args = ["--resolutions", "128", "--batch-sizes", "2", "--steps", "2"]
    result = run([sys.executable, str(ROOT / "bench/train_step.py"), *args], tmp_path)
    row = next(line for line in result.stdout.splitlines() if line.startswith("128 |")).split(" | ")
    assert row[1] == "2" and float(row[2]) > 0
    assert sum(float(share.rstrip("%")) for share in row[5:]) > 95  # the four phases cover the step


def test_full_size_benchmark_runs_at_tiny_scale(tmp_path: Path) -> None:
    """The harness of the GPU rows, on the built-in tiny SDXL: model FLOPs grow exactly with the batch
    and the encoders are timed."""
    out = tmp_path / "results.jsonl"
    args = ["--scale", "tiny", "--device", "cpu", "--resolutions", "64x64", "--batches", "1", "2"]
    args += ["--steps", "2", "--warmup", "0", "--only", "baseline", "--out", str(out)]
    run([sys.executable, str(ROOT / "bench/sdxl_full.py"), *args], tmp_path)
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["name"] for r in results if "per_s" in r and r["per_s"] > 0] == [
        *(f"VAE encode 64x64, {dtype}, batch {batch}" for dtype in ("bf16", "fp32") for batch in (1, 4)),
        "text encoders, bf16, batch 16",
    ]
    trained = {r["setup"]["batch"]: r for r in results if "setup" in r}
    assert trained[1]["lora_parameters"] == trained[2]["lora_parameters"] > 0
    assert trained[2]["flops_per_step"] == 2 * trained[1]["flops_per_step"] > 0
    assert all(r["seconds_per_step"] > 0 for r in trained.values())
