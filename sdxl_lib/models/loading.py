"""Loading the pinned base model's parts with `from_pretrained`: safetensors unless the lock says pickle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    DDPMScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.configuration_utils import FrozenDict
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sdxl_lib.sources import model_path, pin_model


def weights(entry: dict[str, Any]) -> dict[str, bool | None]:
    """from_pretrained's weights switch for a lock entry: safetensors only, unless the lock says
    `pickle` (allowed at download by model.allow_pickle_weights): then safetensors where a part has
    them, else its .bin, which diffusers and transformers torch.load with weights_only=True."""
    return {"use_safetensors": True if entry.get("weights", "safetensors") == "safetensors" else None}


def base_dir(lock: dict[str, Any]) -> Path:
    return model_path(lock["model"])


def load_vae(lock: dict[str, Any], dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """The VAE override (e.g. madebyollin/sdxl-vae-fp16-fix) if pinned, else the base model's."""
    if lock.get("vae"):
        return AutoencoderKL.from_pretrained(model_path(lock["vae"]), dtype=dtype, **weights(lock["vae"]))
    return AutoencoderKL.from_pretrained(
        base_dir(lock), subfolder="vae", dtype=dtype, **weights(lock["model"])
    )


def load_text_encoders(
    lock: dict[str, Any], dtype: torch.dtype = torch.float32
) -> tuple[list[CLIPTokenizer], list[torch.nn.Module]]:
    root = base_dir(lock)
    tokenizers = [CLIPTokenizer.from_pretrained(root, subfolder=s) for s in ("tokenizer", "tokenizer_2")]
    encoders = [
        CLIPTextModel.from_pretrained(root, subfolder="text_encoder", dtype=dtype, **weights(lock["model"])),
        CLIPTextModelWithProjection.from_pretrained(
            root, subfolder="text_encoder_2", dtype=dtype, **weights(lock["model"])
        ),
    ]
    return tokenizers, [e.eval().requires_grad_(False) for e in encoders]


def load_unet(lock: dict[str, Any], dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(
        base_dir(lock), subfolder="unet", dtype=dtype, **weights(lock["model"])
    )


def load_unet_config(lock: dict[str, Any]) -> FrozenDict:
    """The U-Net's config alone (no weights): its block layout names modules in kohya files."""
    return FrozenDict(UNet2DConditionModel.load_config(base_dir(lock), subfolder="unet"))


def load_noise_scheduler(lock: dict[str, Any], **overrides: Any) -> DDPMScheduler:
    """The training-time view of the model's schedule (same betas, DDPM's add_noise); `overrides`
    are config values such as `prediction_type` or `rescale_betas_zero_snr`."""
    return DDPMScheduler.from_pretrained(base_dir(lock), subfolder="scheduler", **overrides)


def load_pipeline(
    lock: dict[str, Any],
    dtype: torch.dtype = torch.float32,
    scheduler_overrides: dict[str, Any] | None = None,
    **components: Any,
) -> StableDiffusionXLPipeline:
    """The full SDXL pipeline of the pinned model; `components` replace parts (e.g. a trained UNet)."""
    components.setdefault("vae", load_vae(lock, dtype))
    pipeline = StableDiffusionXLPipeline.from_pretrained(
        base_dir(lock), dtype=dtype, **components, **weights(lock["model"])
    )
    pipeline.set_progress_bar_config(disable=True)
    if scheduler_overrides:  # sample as the LoRA was trained (v-prediction, zero-SNR betas)
        pipeline.scheduler = pipeline.scheduler.from_config(pipeline.scheduler.config, **scheduler_overrides)
    return pipeline


def load_preview_decoder(source: str) -> AutoencoderTiny:
    """The tiny autoencoder that decodes validation previews (pinned when first used, like clip_model)."""
    return AutoencoderTiny.from_pretrained(model_path(pin_model(source)), use_safetensors=True)


def latent_scaling(lock: dict[str, Any]) -> tuple[float, float]:
    """(scaling_factor, shift_factor) of the VAE in use, read from its config alone."""
    if lock.get("vae"):
        config = AutoencoderKL.load_config(model_path(lock["vae"]))
    else:
        config = AutoencoderKL.load_config(base_dir(lock), subfolder="vae")
    return float(config["scaling_factor"]), float(config.get("shift_factor") or 0.0)
