"""bucket: assign every image an SDXL aspect bucket, resize and crop, and record it exactly."""

from pathlib import Path

import typer

from sdxl_lib import paths
from sdxl_lib.config import load_params
from sdxl_lib.data.plan import build_plan
from sdxl_lib.data.report import bucket_table, contact_sheet, histogram_rows
from sdxl_lib.io import write_json, write_parquet, write_png
from sdxl_lib.sources import read_lock
from stages.common import PARAMS_OPTION, run


def main(params_file: Path = PARAMS_OPTION) -> None:
    """Write data/buckets/plan.parquet (one row per sample variant) and skipped.parquet (path, reason)."""
    params = load_params(params_file)
    lock = read_lock(paths.LOCK)
    datasets = [(d["id"], paths.RAW / d["id"]) for d in lock["datasets"]]
    not_downloaded = [
        {"path": f"{(paths.RAW / d['id']).as_posix()}/{s['path']}", "reason": s["reason"]}
        for d in lock["datasets"]
        for s in d.get("skipped", [])
    ]
    plan, skipped, summary = build_plan(
        datasets, params.bucket, Path("."), params.train.train_batch_size, skipped_earlier=not_downloaded
    )
    write_parquet(plan, paths.PLAN)
    write_parquet(skipped, paths.SKIPPED)
    write_json(summary, paths.BUCKET_SUMMARY)
    write_json(histogram_rows(summary), paths.BUCKET_HISTOGRAM)
    write_png(contact_sheet(plan.to_pylist(), Path(".")), paths.CONTACT_SHEET)
    typer.echo(bucket_table(summary))


if __name__ == "__main__":
    run(main)
