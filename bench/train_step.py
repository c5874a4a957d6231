"""Train-stage speed on the embedded default: steps/s, peak memory, and where a step's time goes.

    python bench/train_step.py [--resolutions 256 512] [--batch-sizes 1 4] [--steps 30]

For each resolution, a project is prepared with the real stages (built-in tiny SDXL and demo
dataset, bucketed at that resolution, latents and text cached). Then, for each batch size, the train
stage's own `train()` runs `--steps` steps in a fresh process (so peak RSS is that run's), once plain,
for steps/s, and once under torch.profiler, for the split of a step into the loop's labelled phases
(data, forward, backward, optimizer). Timings exclude model loading and saving.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("data", "forward", "backward", "optimizer")


def prepare(project: Path, resolution: int) -> None:
    """A project with the demo data planned at `resolution` and its caches encoded, by the stages'
    own commands, run in this process (a process each would spend seconds importing libraries)."""
    project.mkdir(parents=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["bucket"].update(resolution=resolution, minimum_image_size=64, bucket_pruning="oversubscribe")
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    here = Path.cwd()
    os.chdir(project)
    try:
        for stage in ("download", "bucket", "encode_latents", "encode_text"):
            with contextlib.redirect_stdout(io.StringIO()):  # their summaries would split the table
                importlib.import_module(f"stages.{stage}").main(Path("params.yaml"))
    finally:
        os.chdir(here)


def run_steps(project: Path, batch_size: int, steps: int, profile: bool) -> None:
    """Inside the measured process: train `steps` steps and print the figures as JSON."""
    import torch

    from sdxl_lib import paths
    from sdxl_lib.config import load_params
    from sdxl_lib.sources import read_lock
    from sdxl_lib.train.loop import train

    os.chdir(project)
    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["train"].update(
        train_batch_size=batch_size,
        max_train_steps=steps,
        validate_at_end=False,
        eval_steps=None,
        checkpointing_steps=10**6,
    )
    raw["validation"]["validation_steps"] = None
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params()
    if not profile:
        summary = train(params, read_lock(paths.LOCK))
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        summary["peak_rss_mb"] = int(status["VmHWM"].split()[0]) / 1024
        print(json.dumps(summary))
        return
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        train(params, read_lock(paths.LOCK))
    totals = {e.key: e.cpu_time_total for e in profiler.key_averages() if e.key in PHASES}
    print(json.dumps({"split": totals}))


def measure(project: Path, batch_size: int, steps: int, profile: bool) -> dict:
    args = [sys.executable, __file__, "--run-steps", str(project), str(batch_size), str(steps)]
    result = subprocess.run([*args, *(["--profile"] if profile else [])], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--run-steps", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_steps:
        project, batch_size, steps = args.run_steps
        run_steps(Path(project), int(batch_size), int(steps), args.profile)
        return
    print("resolution | batch | steps/s | images/s | peak RSS | data | forward | backward | optimizer")
    with tempfile.TemporaryDirectory(prefix="sdxl-lora-bench-train-") as work:
        for resolution in args.resolutions:
            project = Path(work) / f"r{resolution}"
            prepare(project, resolution)
            for batch_size in args.batch_sizes:
                plain = measure(project, batch_size, args.steps, profile=False)
                split = measure(project, batch_size, args.steps, profile=True)["split"]
                total = sum(split.values()) or 1
                shares = " | ".join(f"{100 * split.get(phase, 0) / total:.0f}%" for phase in PHASES)
                rate = plain["steps"] / plain["step_seconds"]
                print(
                    f"{resolution} | {batch_size} | {rate:.2f} | {rate * batch_size:.1f} | "
                    f"{plain['peak_rss_mb']:.0f} MB | {shares}"
                )


if __name__ == "__main__":
    main()
