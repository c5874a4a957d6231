"""Text-embedding cache: SDXL's prompt embeds and pooled embeds per distinct caption."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import torch
from accelerate import PartialState
from transformers import CLIPTokenizer

from sdxl_lib.cache.shards import DTYPES, KeyedCache, build_incremental_cache, cached_shards

INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("caption", pa.string()),
        ("shard", pa.string()),
        ("num_tokens", pa.int32()),
        ("truncated", pa.bool_()),
    ]
)


def caption_key(caption: str, encoder_identity: str) -> str:
    """Everything a cached embedding depends on: the caption text and the text encoders."""
    return hashlib.sha256(json.dumps([caption, encoder_identity]).encode()).hexdigest()[:32]


def encode_prompts(
    tokenizers: list[CLIPTokenizer], encoders: list[torch.nn.Module], captions: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's conditioning: both encoders' penultimate hidden states concatenated, and encoder 2's
    pooled projection. Captions longer than 77 tokens are truncated, as the SDXL pipeline does.
    Differentiable (train_text_encoder); the cache calls it under no_grad."""
    token_ids = [
        tokenizer(
            captions,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        for tokenizer in tokenizers
    ]
    return embed_tokens(encoders, token_ids)


def embed_tokens(
    encoders: list[torch.nn.Module], token_ids: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """`encode_prompts` after tokenizing: each encoder's token ids, [batch, 77], to the conditioning."""
    hidden_states, pooled = [], None
    for encoder, ids in zip(encoders, token_ids, strict=True):
        device = next(encoder.parameters()).device  # also for a DDP-wrapped encoder
        output = encoder(ids.to(device), output_hidden_states=True)
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
    encoder_identity: str,
    state: PartialState,
) -> tuple[pa.Table, dict[str, int]] | None:
    """Bring the text cache up to date with the distinct captions (always including the empty one,
    for caption dropout), encoding only new entries. Returns (index, report) on the main process."""
    distinct = sorted(set(captions) | {""})
    keys = {caption: caption_key(caption, encoder_identity) for caption in distinct}
    previous = cached_shards(out_dir)
    missing = [c for c in distinct if keys[c] not in previous]
    batches = [
        [(keys[c], c) for c in missing[i : i + batch_size]] for i in range(0, len(missing), batch_size)
    ]

    @torch.no_grad()
    def encode(batch: list[str]) -> list[dict[str, torch.Tensor]]:
        prompt_embeds, pooled = encode_prompts(tokenizers, encoders, batch)
        return [
            {"prompt_embeds": e, "pooled_prompt_embeds": p}
            for e, p in zip(prompt_embeds, pooled, strict=True)
        ]

    limit = tokenizers[0].model_max_length
    counts = token_counts(tokenizers[0], distinct)

    def make_index(shard_of: dict[str, str]) -> pa.Table:
        return pa.Table.from_pylist(
            [
                {
                    "key": keys[c],
                    "caption": c,
                    "shard": shard_of[keys[c]],
                    "num_tokens": n,
                    "truncated": n > limit,
                }
                for c, n in zip(distinct, counts, strict=True)
            ],
            schema=INDEX_SCHEMA,
        )

    return build_incremental_cache(
        out_dir,
        "text",
        list(keys.values()),
        batches,
        list,  # nothing to prepare: tokenizing is part of encoding
        encode,
        make_index,
        DTYPES[cache_dtype],
        shard_size_mb << 20,
        state,
        "encode_text",
    )


class TextCache(KeyedCache):
    """(prompt_embeds, pooled_prompt_embeds) per caption, read lazily from the shards."""

    ID_COLUMN = "caption"

    def embeds(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        prompt_embeds, pooled = self.tensors(caption, "prompt_embeds", "pooled_prompt_embeds")
        return prompt_embeds, pooled
