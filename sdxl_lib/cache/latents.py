"""VAE latent cache: posterior mean and std of exactly the planned crop, unscaled."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from accelerate import PartialState
from diffusers import AutoencoderKL
from PIL import Image

from sdxl_lib import paths
from sdxl_lib.cache.shards import DTYPES, KeyedCache, build_incremental_cache, cached_shards
from sdxl_lib.config import EncodeParams
from sdxl_lib.data.images import open_rgb, resize_and_crop
from sdxl_lib.errors import UserError
from sdxl_lib.models.loading import load_vae

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


def to_tensor(image: Image.Image) -> torch.Tensor:
    """[3, H, W] float32 in [-1, 1], the VAE's input range."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


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


def load_pixels(rows: list[dict], root: Path) -> torch.Tensor:
    """The planned crops of same-bucket rows, as one batch."""
    return torch.stack([planned_pixels(row, root) for row in rows])


@torch.no_grad()
def encode_posteriors(
    vae: AutoencoderKL, rows: list[dict], pixels: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(mean, std) of each row's pixels, in one VAE call; NaN/inf is an error naming the image."""
    posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    for row, mean, std in zip(rows, posterior.mean, posterior.std, strict=True):
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
            raise UserError(
                f"{row['path']}: the VAE produced NaN/inf latents; use encode.vae_dtype: fp32 "
                "or model.pretrained_vae_model_name_or_path: madebyollin/sdxl-vae-fp16-fix"
            )
    return list(zip(posterior.mean, posterior.std, strict=True))


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

    def prepare(batch: list[dict]) -> tuple[list[dict], torch.Tensor]:
        return batch, load_pixels(batch, root)

    def encode(prepared: tuple[list[dict], torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return [{"mean": m, "std": s} for m, s in encode_posteriors(vae, *prepared)]

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
        prepare,
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


class OnlineLatents:
    """`vae_cache_disable`: the posterior the cache would hold, computed from the image when used.

    Each image is encoded alone, as the cache does with `vae_batch_size: 1`, so with an fp32 cache
    both paths give bit-identical latents (CPU kernels differ in the last bits between batch sizes).
    """

    def __init__(self, rows: list[dict], vae: AutoencoderKL, root: Path) -> None:
        self.rows = {row["variant_id"]: row for row in rows}
        self.vae, self.root = vae, root

    def posterior(self, variant_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.rows[variant_id]]
        ((mean, std),) = encode_posteriors(self.vae, rows, load_pixels(rows, self.root))
        return mean.cpu(), std.cpu()


def open_latents(
    params: EncodeParams, lock: dict[str, Any], rows: list[dict], device: torch.device | str
) -> LatentCache | OnlineLatents:
    """Where training and evaluation get each sample's posterior: the cache, or the VAE itself."""
    if params.online_vae:
        vae = load_vae(lock, DTYPES[params.vae_dtype]).to(device)
        return OnlineLatents(rows, vae, Path("."))
    return LatentCache.open(paths.LATENTS)
