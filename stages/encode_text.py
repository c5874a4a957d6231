"""encode_text: cache SDXL's prompt and pooled embeddings for every distinct caption, incrementally."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import typer

from sdxl_lib import paths
from sdxl_lib.cache.shards import DTYPES, describe
from sdxl_lib.cache.text import encode_captions
from sdxl_lib.config import load_params
from sdxl_lib.distributed import process_state
from sdxl_lib.io import write_json
from sdxl_lib.models.loading import load_text_encoders
from sdxl_lib.sources import read_lock
from stages.common import PARAMS_OPTION, run


def main(params_file: Path = PARAMS_OPTION) -> None:
    """Update the sharded safetensors text embeddings and their index in data/text (new entries only)."""
    params = load_params(params_file).encode
    lock = read_lock(paths.LOCK)
    state = process_state()
    tokenizers, encoders = load_text_encoders(lock, DTYPES[params.text_encoder_dtype])
    encoders = [e.to(state.device) for e in encoders]
    identity = json.dumps([lock["model"], params.text_encoder_dtype, params.cache_dtype])
    captions = pq.read_table(paths.PLAN, columns=["caption"]).column("caption").to_pylist()
    result = encode_captions(
        captions,
        tokenizers,
        encoders,
        paths.TEXT,
        params.text_batch_size,
        params.cache_dtype,
        params.shard_size_mb,
        identity,
        state,
    )
    if result is not None:  # only the main process reports
        index, report = result
        truncated = sum(index.column("truncated").to_pylist())
        write_json({**report, "truncated": truncated}, paths.ENCODE_METRICS / "text.json")
        typer.echo(
            f"encode_text: {index.num_rows} captions (incl. empty) on {state.num_processes} process(es): "
            f"{describe(report)}; {truncated} truncated to 77 tokens"
        )


if __name__ == "__main__":
    run(main)
