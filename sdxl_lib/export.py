"""Writing the trained LoRA in the layout `StableDiffusionXLPipeline.load_lora_weights` reads."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft.utils import get_peft_model_state_dict

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def save_unet_lora(unet: torch.nn.Module, directory: Path) -> Path:
    """Save the UNet's LoRA (with its rank/alpha config as metadata, so alpha survives a reload)."""
    if any(not torch.isfinite(p).all() for n, p in unet.named_parameters() if "lora_" in n):
        raise ValueError("refusing to export a LoRA that contains NaN or inf weights")
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionXLPipeline.save_lora_weights(
        directory,
        unet_lora_layers=state,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        safe_serialization=True,
    )
    return directory / LORA_WEIGHTS
