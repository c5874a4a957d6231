"""VAE latent cache: posterior mean and std of exactly the planned crop, unscaled."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import torch
from diffusers import AutoencoderKL
from tqdm import tqdm

from sdxl_lib.cache.shards import DTYPES, ShardReader, ShardWriter
from sdxl_lib.data.images import open_rgb, resize_and_crop, to_tensor
from sdxl_lib.errors import UserError

INDEX_SCHEMA = pa.schema(
    [
        ("variant_id", pa.string()),
        ("shard", pa.string()),
        ("latent_height", pa.int32()),
        ("latent_width", pa.int32()),
    ]
)


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


@torch.no_grad()
def encode_latents(
    rows: list[dict],
    vae: AutoencoderKL,
    root: Path,
    out_dir: Path,
    batch_size: int,
    cache_dtype: str,
    shard_size_mb: int,
) -> pa.Table:
    """Encode every planned sample; returns the index table (the shards are written to `out_dir`)."""
    writer = ShardWriter(out_dir, "latents", shard_size_mb << 20, DTYPES[cache_dtype])
    index = []
    batches = batches_by_bucket(rows, batch_size)
    with tqdm(total=len(rows), desc="encode_latents", unit="img") as progress:
        for batch in batches:
            pixels = torch.stack([planned_pixels(r, root) for r in batch]).to(vae.device, vae.dtype)
            posterior = vae.encode(pixels).latent_dist
            for row, mean, std in zip(batch, posterior.mean, posterior.std, strict=True):
                if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
                    raise UserError(
                        f"{row['path']}: the VAE produced NaN/inf latents; use encode.vae_dtype: fp32 "
                        "or model.pretrained_vae_model_name_or_path: madebyollin/sdxl-vae-fp16-fix"
                    )
                shard = writer.add(row["variant_id"], {"mean": mean, "std": std})
                index.append(
                    {
                        "variant_id": row["variant_id"],
                        "shard": shard,
                        "latent_height": mean.shape[1],
                        "latent_width": mean.shape[2],
                    }
                )
            progress.update(len(batch))
    writer.flush()
    return pa.Table.from_pylist(index, schema=INDEX_SCHEMA)


class LatentCache:
    """Posterior (mean, std) per sample variant, read lazily from the shards."""

    def __init__(self, directory: Path, index: pa.Table) -> None:
        self.reader = ShardReader(
            directory,
            dict(zip(index.column("variant_id").to_pylist(), index.column("shard").to_pylist(), strict=True)),
        )

    def posterior(self, variant_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.reader.get(variant_id, "mean"), self.reader.get(variant_id, "std")
