"""encode_latents: cache the VAE posterior (mean, std) of every planned crop, incrementally."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import typer

from sdxl_lib import paths
from sdxl_lib.cache.latents import encode_latents
from sdxl_lib.cache.shards import DTYPES, describe
from sdxl_lib.config import load_params
from sdxl_lib.distributed import process_state
from sdxl_lib.io import write_json
from sdxl_lib.models.loading import load_vae
from sdxl_lib.sources import read_lock
from stages.common import PARAMS_OPTION, run


def main(params_file: Path = PARAMS_OPTION) -> None:
    """Update the sharded safetensors latents and their index in data/latents (new entries only)."""
    params = load_params(params_file).encode
    lock = read_lock(paths.LOCK)
    state = process_state()
    vae = load_vae(lock, DTYPES[params.vae_dtype]).to(state.device)
    vae_identity = json.dumps([lock["vae"] or lock["model"], params.vae_dtype, params.cache_dtype])
    # With vae_cache_disable nothing is stored: the cache is emptied and train encodes online.
    rows = [] if params.online_vae else pq.read_table(paths.PLAN).to_pylist()
    result = encode_latents(
        rows,
        vae,
        Path("."),
        paths.LATENTS,
        params.vae_batch_size,
        params.cache_dtype,
        params.shard_size_mb,
        vae_identity,
        state,
    )
    if result is not None:  # only the main process reports
        index, report = result
        write_json(report, paths.ENCODE_METRICS / "latents.json")
        typer.echo(
            f"encode_latents: {index.num_rows} entries in {paths.LATENTS} on {state.num_processes} "
            f"process(es): {describe(report)}"
        )
        if params.online_vae:
            typer.echo("encode_latents: vae_cache_disable is on: train and evaluate encode latents online")


if __name__ == "__main__":
    run(main)
