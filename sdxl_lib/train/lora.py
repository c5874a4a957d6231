"""Which U-Net modules get a LoRA, and how it starts."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from peft import LoraConfig

from sdxl_lib.config import TrainParams
from sdxl_lib.errors import UserError

ATTENTION = ["to_k", "to_q", "to_v", "to_out.0"]
# peft matches each name against the end of a module's path.
TARGET_PRESETS = {
    "attention": ATTENTION,
    "attention_mlp": [*ATTENTION, "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"],
    # kohya's LoCon reach: also the ResNet convolutions, their time projections and the resamplers
    "all": [
        *ATTENTION,
        *["ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"],
        *["conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv"],
    ],
}
INIT_WEIGHTS: dict[str, bool | str] = {
    "default": True,
    "gaussian": "gaussian",
    "pissa": "pissa",
    "olora": "olora",
}


def target_modules(cfg: TrainParams) -> list[str]:
    return cfg.lora_target_modules or TARGET_PRESETS[cfg.lora_target]


def lora_config(cfg: TrainParams) -> LoraConfig:
    return LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha or cfg.lora_rank,
        lora_dropout=cfg.lora_dropout,
        init_lora_weights=INIT_WEIGHTS[cfg.lora_init_type],
        target_modules=target_modules(cfg),
        use_dora=cfg.use_dora,
    )


def load_init_lora(unet: torch.nn.Module, path: str) -> None:
    """Make an existing LoRA the adapter to train, read the way diffusers' `load_lora_weights` reads it
    (which also converts kohya / A1111 files); it keeps its own rank, alpha and targets."""
    file = Path(path)
    if file.suffix != ".safetensors" or not file.is_file():
        raise UserError(f"train.init_lora: {path} is not a .safetensors file (only safetensors are loaded)")
    state, alphas, metadata = StableDiffusionXLPipeline.lora_state_dict(
        str(file.parent), weight_name=file.name, return_lora_metadata=True
    )
    if not any(key.startswith("unet.") for key in state):
        raise UserError(f"train.init_lora: {path} holds no U-Net LoRA weights")
    StableDiffusionXLPipeline.load_lora_into_unet(
        state, alphas, unet, adapter_name="default", metadata=metadata
    )
    for name, parameter in unet.named_parameters():
        parameter.requires_grad_("lora_" in name)
