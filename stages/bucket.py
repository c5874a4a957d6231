"""bucket: assign every image an SDXL aspect bucket, resize and crop, and record it exactly."""

from pathlib import Path

import typer

from sdxl_lib import paths
from sdxl_lib.config import load_params
from sdxl_lib.data.plan import build_plan
from sdxl_lib.io import write_json, write_parquet
from sdxl_lib.sources import read_lock
from stages.common import PARAMS_OPTION, run


def main(params_file: Path = PARAMS_OPTION) -> None:
    """Write data/buckets/plan.parquet (one row per sample) and skipped.parquet (path, reason)."""
    params = load_params(params_file)
    lock = read_lock(paths.LOCK)
    datasets = [(d["id"], paths.RAW / d["id"]) for d in lock["datasets"]]
    plan, skipped, summary = build_plan(datasets, params.bucket, Path("."))
    write_parquet(plan, paths.PLAN)
    write_parquet(skipped, paths.SKIPPED)
    write_json(summary, paths.BUCKET_SUMMARY)
    skips = ", ".join(f"{n} {reason}" for reason, n in summary["skipped"].items()) or "none"
    typer.echo(
        f"bucket: kept {summary['kept']} ({summary['train']} train, {summary['eval']} eval) "
        f"in {len(summary['buckets'])} buckets; skipped: {skips}"
    )


if __name__ == "__main__":
    run(main)
