"""VAE latent cache: posterior mean and std of exactly the planned crop, unscaled."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import torch
from accelerate import PartialState
from diffusers import AutoencoderKL

from sdxl_lib.cache.shards import DTYPES, KeyedCache, build_incremental_cache, cached_shards
from sdxl_lib.data.images import open_rgb, resize_and_crop, to_tensor
from sdxl_lib.errors import UserError

INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("variant_id", pa.string()),
        ("shard", pa.string()),
        ("latent_height", pa.int32()),
        ("latent_width", pa.int32()),
    ]
)
CROP_FIELDS = (
    "sample_id",
    "intermediate_width",
    "intermediate_height",
    "crop_left",
    "crop_top",
    "target_width",
    "target_height",
    "flip",
)


def latent_key(row: dict, vae_identity: str) -> str:
    """Everything a cached latent depends on: the image bytes, the crop, the flip, and the VAE."""
    determinants = [row[f] for f in CROP_FIELDS] + [vae_identity]
    return hashlib.sha256(json.dumps(determinants).encode()).hexdigest()[:32]


def planned_pixels(row: dict, root: Path) -> torch.Tensor:
    """The exact crop the plan recorded, as the VAE's [-1, 1] input."""
    image = resize_and_crop(
        open_rgb(root / row["path"]),
        (row["intermediate_width"], row["intermediate_height"]),
        row["crop_left"],
        row["crop_top"],
        (row["target_width"], row["target_height"]),
        flip=row["flip"],
    )
    return to_tensor(image)


def batches_by_bucket(rows: list[dict], batch_size: int) -> list[list[dict]]:
    """Same-size batches (a batch never mixes buckets), in a deterministic order."""
    buckets: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for row in sorted(rows, key=lambda r: r["variant_id"]):
        buckets[(row["target_width"], row["target_height"])].append(row)
    return [
        members[i : i + batch_size]
        for _, members in sorted(buckets.items())
        for i in range(0, len(members), batch_size)
    ]


def encode_latents(
    rows: list[dict],
    vae: AutoencoderKL,
    root: Path,
    out_dir: Path,
    batch_size: int,
    cache_dtype: str,
    shard_size_mb: int,
    vae_identity: str,
    state: PartialState,
) -> tuple[pa.Table, dict[str, int]] | None:
    """Bring the latent cache in `out_dir` up to date with the plan, encoding only new entries.

    Returns the index table and the {encoded, reused, removed} report on the main process.
    """
    keys = {row["variant_id"]: latent_key(row, vae_identity) for row in rows}
    previous = cached_shards(out_dir)
    missing = [row for row in rows if keys[row["variant_id"]] not in previous]
    batches = [
        [(keys[r["variant_id"]], r) for r in batch] for batch in batches_by_bucket(missing, batch_size)
    ]

    @torch.no_grad()
    def encode(batch: list[dict]) -> list[dict[str, torch.Tensor]]:
        pixels = torch.stack([planned_pixels(r, root) for r in batch]).to(vae.device, vae.dtype)
        posterior = vae.encode(pixels).latent_dist
        for row, mean, std in zip(batch, posterior.mean, posterior.std, strict=True):
            if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
                raise UserError(
                    f"{row['path']}: the VAE produced NaN/inf latents; use encode.vae_dtype: fp32 "
                    "or model.pretrained_vae_model_name_or_path: madebyollin/sdxl-vae-fp16-fix"
                )
        return [{"mean": m, "std": s} for m, s in zip(posterior.mean, posterior.std, strict=True)]

    factor = 2 ** (len(vae.config.block_out_channels) - 1)

    def make_index(shard_of: dict[str, str]) -> pa.Table:
        return pa.Table.from_pylist(
            [
                {
                    "key": keys[r["variant_id"]],
                    "variant_id": r["variant_id"],
                    "shard": shard_of[keys[r["variant_id"]]],
                    "latent_height": r["target_height"] // factor,
                    "latent_width": r["target_width"] // factor,
                }
                for r in sorted(rows, key=lambda r: r["variant_id"])
            ],
            schema=INDEX_SCHEMA,
        )

    return build_incremental_cache(
        out_dir,
        "latents",
        list(keys.values()),
        batches,
        encode,
        make_index,
        DTYPES[cache_dtype],
        shard_size_mb << 20,
        state,
        "encode_latents",
    )


class LatentCache(KeyedCache):
    """Posterior (mean, std) per sample variant, read lazily from the shards."""

    ID_COLUMN = "variant_id"

    def posterior(self, variant_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = self.tensors(variant_id, "mean", "std")
        return mean, std
