"""encode_text: cache SDXL's prompt and pooled embeddings for every distinct caption."""

from pathlib import Path

import pyarrow.parquet as pq
import typer

from sdxl_lib import paths
from sdxl_lib.cache.shards import DTYPES
from sdxl_lib.cache.text import encode_captions
from sdxl_lib.config import load_params
from sdxl_lib.io import write_parquet
from sdxl_lib.models.loading import load_text_encoders
from sdxl_lib.sources import read_lock
from stages.common import PARAMS_OPTION, run


def main(params_file: Path = PARAMS_OPTION) -> None:
    """Write sharded safetensors text embeddings and their index to data/text."""
    params = load_params(params_file).encode
    tokenizers, encoders = load_text_encoders(read_lock(paths.LOCK), DTYPES[params.text_encoder_dtype])
    captions = pq.read_table(paths.PLAN, columns=["caption"]).column("caption").to_pylist()
    index = encode_captions(
        captions,
        tokenizers,
        encoders,
        paths.TEXT,
        params.text_batch_size,
        params.cache_dtype,
        params.shard_size_mb,
    )
    write_parquet(index, paths.TEXT / paths.CACHE_INDEX)
    truncated = sum(index.column("truncated").to_pylist())
    typer.echo(
        f"encode_text: {index.num_rows} distinct captions (incl. empty) into {paths.TEXT}; "
        f"{truncated} truncated to 77 tokens"
    )


if __name__ == "__main__":
    run(main)
