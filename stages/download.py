"""download: fetch the datasets into data/raw and pin model, VAE and dataset revisions."""

from pathlib import Path

import typer

from sdxl_lib import paths
from sdxl_lib.config import load_params
from sdxl_lib.io import write_json
from sdxl_lib.sources import download
from stages.common import PARAMS_OPTION, run


def main(params_file: Path = PARAMS_OPTION) -> None:
    """Fetch datasets into data/raw/<id> and write data/lock.json with the resolved revisions."""
    params = load_params(params_file)
    lock = download(params, paths.RAW)
    write_json(lock, paths.LOCK)
    not_copied = sum(len(d["skipped"]) for d in lock["datasets"])
    typer.echo(
        f"download: model {lock['model']['source']}@{lock['model']['revision'][:12]}, "
        f"{len(lock['datasets'])} dataset(s) into {paths.RAW}; {not_copied} file(s) not copied "
        "(reasons in data/lock.json; bucket lists them in data/buckets/skipped.parquet)"
    )


if __name__ == "__main__":
    run(main)
