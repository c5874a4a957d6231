"""encode_latents: cache the VAE posterior (mean, std) of every planned crop."""

from pathlib import Path

import pyarrow.parquet as pq
import typer

from sdxl_lib import paths
from sdxl_lib.cache.latents import encode_latents
from sdxl_lib.cache.shards import DTYPES
from sdxl_lib.config import load_params
from sdxl_lib.io import write_parquet
from sdxl_lib.models.loading import load_vae
from sdxl_lib.sources import read_lock
from stages.common import PARAMS_OPTION, run


def main(params_file: Path = PARAMS_OPTION) -> None:
    """Write sharded safetensors latents and their index to data/latents."""
    params = load_params(params_file).encode
    vae = load_vae(read_lock(paths.LOCK), DTYPES[params.vae_dtype])
    rows = pq.read_table(paths.PLAN).to_pylist()
    index = encode_latents(
        rows, vae, Path("."), paths.LATENTS, params.vae_batch_size, params.cache_dtype, params.shard_size_mb
    )
    write_parquet(index, paths.LATENTS / paths.CACHE_INDEX)
    typer.echo(f"encode_latents: {index.num_rows} samples into {paths.LATENTS}")


if __name__ == "__main__":
    run(main)
