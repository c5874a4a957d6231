"""The benchmark scripts run (at toy sizes), so they never rot; their figures live in BENCHMARKS.md."""

from __future__ import annotations

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
