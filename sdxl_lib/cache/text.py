"""Text-embedding cache: SDXL's prompt embeds and pooled embeds per distinct caption."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import torch
from tqdm import tqdm
from transformers import CLIPTokenizer

from sdxl_lib.cache.shards import DTYPES, ShardReader, ShardWriter

INDEX_SCHEMA = pa.schema(
    [
        ("caption_key", pa.string()),
        ("caption", pa.string()),
        ("shard", pa.string()),
        ("num_tokens", pa.int32()),
        ("truncated", pa.bool_()),
    ]
)


def caption_key(caption: str) -> str:
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()[:32]


@torch.no_grad()
def encode_prompts(
    tokenizers: list[CLIPTokenizer], encoders: list[torch.nn.Module], captions: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's conditioning: both encoders' penultimate hidden states concatenated, and encoder 2's
    pooled projection. Captions longer than 77 tokens are truncated, as the SDXL pipeline does."""
    hidden_states, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, encoders, strict=True):
        ids = tokenizer(
            captions,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(encoder.device)
        output = encoder(ids, output_hidden_states=True)
        hidden_states.append(output.hidden_states[-2])
        pooled = output[0]  # text_embeds of CLIPTextModelWithProjection (the last encoder)
    assert pooled is not None
    return torch.cat(hidden_states, dim=-1), pooled


def token_counts(tokenizer: CLIPTokenizer, captions: list[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(captions, truncation=False).input_ids]


def encode_captions(
    captions: list[str],
    tokenizers: list[CLIPTokenizer],
    encoders: list[torch.nn.Module],
    out_dir: Path,
    batch_size: int,
    cache_dtype: str,
    shard_size_mb: int,
) -> pa.Table:
    """Encode distinct captions (always including the empty one, for caption dropout)."""
    distinct = sorted(set(captions) | {""})
    writer = ShardWriter(out_dir, "text", shard_size_mb << 20, DTYPES[cache_dtype])
    limit = tokenizers[0].model_max_length
    index = []
    with tqdm(total=len(distinct), desc="encode_text", unit="caption") as progress:
        for start in range(0, len(distinct), batch_size):
            batch = distinct[start : start + batch_size]
            prompt_embeds, pooled = encode_prompts(tokenizers, encoders, batch)
            for caption, embeds, pool, n in zip(
                batch, prompt_embeds, pooled, token_counts(tokenizers[0], batch), strict=True
            ):
                key = caption_key(caption)
                shard = writer.add(key, {"prompt_embeds": embeds, "pooled_prompt_embeds": pool})
                index.append(
                    {
                        "caption_key": key,
                        "caption": caption,
                        "shard": shard,
                        "num_tokens": n,
                        "truncated": n > limit,
                    }
                )
            progress.update(len(batch))
    writer.flush()
    return pa.Table.from_pylist(index, schema=INDEX_SCHEMA)


class TextCache:
    """(prompt_embeds, pooled_prompt_embeds) per caption, read lazily from the shards."""

    def __init__(self, directory: Path, index: pa.Table) -> None:
        keys = index.column("caption_key").to_pylist()
        self.reader = ShardReader(directory, dict(zip(keys, index.column("shard").to_pylist(), strict=True)))

    def embeds(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        key = caption_key(caption)
        return self.reader.get(key, "prompt_embeds"), self.reader.get(key, "pooled_prompt_embeds")
