"""What a LoRA file says about itself, in its safetensors header: Stability's ModelSpec keys
(`modelspec.*`), the `ss_*` keys kohya's sd-scripts write (A1111, Forge, ComfyUI and Civitai show them)
and the hashes A1111's additional-networks extension indexes files by. Values are strings, as the
safetensors format requires; structured values are JSON."""

from __future__ import annotations

import hashlib
import json
import struct
from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

import torch
from safetensors.torch import save as serialize

from sdxl_lib.config import Params
from sdxl_lib.data.buckets import bucket_size

ARCHITECTURE = "stable-diffusion-xl-v1-base/lora"
# The code base whose module names a file's keys follow (ModelSpec's `implementation`).
IMPLEMENTATIONS = {"diffusers": "diffusers", "kohya": "https://github.com/Stability-AI/generative-models"}
LEGACY_HASH_WINDOW = slice(0x100000, 0x110000)  # the 64 KiB additional-networks' legacy hash reads


def tag_frequency(rows: Iterable[tuple[str, str]]) -> dict[str, dict[str, int]]:
    """Per dataset, how many captions hold each comma-separated tag (kohya's `ss_tag_frequency`)."""
    counts: dict[str, Counter[str]] = {}
    for dataset_id, caption in rows:
        tags = {tag.strip() for tag in caption.split(",") if tag.strip()}
        counts.setdefault(dataset_id, Counter()).update(tags)
    return {dataset_id: dict(sorted(tags.items())) for dataset_id, tags in counts.items()}


def bucket_info(sizes: Iterable[tuple[int, int]]) -> dict[str, Any]:
    """kohya's `ss_bucket_info`: each bucket's resolution and image count."""
    counts = Counter(sizes)
    return {
        "buckets": {
            str(i): {"resolution": list(size), "count": counts[size]} for i, size in enumerate(sorted(counts))
        }
    }


def training_metadata(params: Params, train_rows: list[dict], steps: int, epochs: int) -> dict[str, str]:
    """The keys that describe a training run (`train_rows`: the plan's train rows): base model, data,
    schedule and optimisation."""
    cfg = params.train
    unique = {row["sample_id"]: row for row in train_rows}.values()  # mirrored variants are one image
    width, height = bucket_size(1.0, params.bucket)
    title = " + ".join(d.id for d in params.download.datasets) + " SDXL LoRA"
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ARCHITECTURE,
        "modelspec.title": title,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "modelspec.prediction_type": cfg.prediction_type or "epsilon",
        "ss_output_name": title,
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_sd_model_name": params.model.pretrained_model_name_or_path,
        "ss_vae_name": params.model.pretrained_vae_model_name_or_path or "",
        "ss_resolution": f"({width}, {height})",
        "ss_enable_bucket": "True",
        "ss_bucket_info": json.dumps(
            bucket_info((r["target_width"], r["target_height"]) for r in train_rows)
        ),
        "ss_num_train_images": str(len(unique)),
        "ss_tag_frequency": json.dumps(tag_frequency((r["dataset_id"], r["caption"]) for r in unique)),
        "ss_steps": str(steps),
        "ss_max_train_steps": str(steps),
        "ss_epoch": str(epochs),
        "ss_num_epochs": str(epochs),
        "ss_batch_size_per_device": str(cfg.train_batch_size),
        "ss_gradient_accumulation_steps": str(cfg.gradient_accumulation_steps),
        "ss_optimizer": cfg.optimizer,
        "ss_learning_rate": str(cfg.learning_rate),
        "ss_unet_lr": str(cfg.learning_rate),
        "ss_text_encoder_lr": str(cfg.text_encoder_lr or cfg.learning_rate)
        if cfg.train_text_encoder
        else "0",
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_lr_warmup_steps": str(cfg.lr_warmup_steps),
        "ss_noise_offset": str(cfg.noise_offset),
        "ss_min_snr_gamma": str(cfg.snr_gamma) if cfg.snr_gamma else "None",
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_gradient_checkpointing": str(cfg.gradient_checkpointing),
        "ss_max_grad_norm": str(cfg.max_grad_norm),
        "ss_network_dropout": str(cfg.lora_dropout),
        "ss_caption_dropout_rate": str(cfg.caption_dropout_probability),
        "ss_seed": str(cfg.seed),
        "ss_v2": "False",
    }


def network_metadata(config: dict[str, Any]) -> dict[str, str]:
    """The adapter's shape, from the U-Net's LoraConfig (as a dict)."""
    args = {"dora_wd": "True"} if config.get("use_dora") else {}
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config["r"]),
        "ss_network_alpha": str(config["lora_alpha"]),
        "ss_network_args": json.dumps(args),
    }


def file_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """ModelSpec's `hash_sha256` and additional-networks' `sshs_model_hash`: SHA-256 of the tensor
    data alone (so editing metadata keeps them valid); `sshs_legacy_hash`: the first 8 hex digits
    of the SHA-256 of a 64 KiB window of the file as written with its `ss_*` keys only, as kohya
    computes it."""
    data = serialize(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    (header_length,) = struct.unpack("<Q", data[:8])
    content = hashlib.sha256(data[8 + header_length :]).hexdigest()
    return {
        "modelspec.hash_sha256": f"0x{content}",
        "sshs_model_hash": content,
        "sshs_legacy_hash": hashlib.sha256(data[LEGACY_HASH_WINDOW]).hexdigest()[:8],
    }
