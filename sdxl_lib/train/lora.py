"""Which U-Net modules get a LoRA, and how it starts."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from peft import LoraConfig

from sdxl_lib.config import TrainParams
from sdxl_lib.errors import UserError
from sdxl_lib.sources import PICKLE_SUFFIXES

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
# The CLIP text encoders' counterparts (train_text_encoder): attention, then the MLP too.
_CLIP_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]
_CLIP_LINEARS = [*_CLIP_ATTENTION, "fc1", "fc2"]
# CLIP layers have only attention and MLP linears, so `attention_mlp` and `all` train the same ones
TEXT_ENCODER_TARGETS = {"attention": _CLIP_ATTENTION, "attention_mlp": _CLIP_LINEARS, "all": _CLIP_LINEARS}
INIT_WEIGHTS: dict[str, bool | str] = {
    "default": True,
    "gaussian": "gaussian",
    "pissa": "pissa",
    "olora": "olora",
}


def target_modules(cfg: TrainParams) -> list[str]:
    return cfg.lora_target_modules or TARGET_PRESETS[cfg.lora_target]


def lora_config(cfg: TrainParams, text_encoder: bool = False) -> LoraConfig:
    """The U-Net's adapter, or with `text_encoder` the text encoders' (an explicit
    `lora_target_modules` list names U-Net modules, so the encoders keep the preset's)."""
    return LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha or cfg.lora_rank,
        lora_dropout=cfg.lora_dropout,
        init_lora_weights=INIT_WEIGHTS[cfg.lora_init_type],
        target_modules=TEXT_ENCODER_TARGETS[cfg.lora_target] if text_encoder else target_modules(cfg),
        use_dora=cfg.use_dora,
    )


def load_pickled_tensors(file: Path) -> dict[str, torch.Tensor]:
    """A torch.load LoRA file, unpickled with weights_only=True: tensors and plain containers only,
    so a file that would run code is refused instead of run."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[0]
        raise UserError(f"train.init_lora: {file} holds more than tensors, refused ({first_line})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"train.init_lora: {file} is not a mapping of names to tensors")
    return state


def load_init_lora(models: dict[str, torch.nn.Module], path: str, allow_pickle: bool = False) -> set[str]:
    """Make an existing LoRA the adapter to train, read the way diffusers' `load_lora_weights` reads it
    (which also converts kohya / A1111 files); it keeps its own rank, alpha and targets. `models` are
    the components being trained by name (unet, text_encoder, text_encoder_2); returns the names the
    file gave an adapter (the U-Net always; a text encoder if the file has its weights)."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"train.init_lora: {path} does not exist")
    if file.suffix == ".safetensors":
        source: str | dict[str, torch.Tensor] = str(file.parent)
        where = {"weight_name": file.name}
    elif file.suffix in PICKLE_SUFFIXES and allow_pickle:
        source, where = load_pickled_tensors(file), {}
    elif file.suffix in PICKLE_SUFFIXES:
        raise UserError(
            f"train.init_lora: {path} is a pickle file, which can run code when loaded; convert it to "
            ".safetensors, or set model.allow_pickle_weights: true to load it with weights_only=True"
        )
    else:
        raise UserError(f"train.init_lora: {path} is not a .safetensors file")
    state, alphas, metadata = StableDiffusionXLPipeline.lora_state_dict(
        source, unet_config=models["unet"].config, return_lora_metadata=True, **where
    )
    if not any(key.startswith("unet.") for key in state):
        raise UserError(f"train.init_lora: {path} holds no U-Net LoRA weights")
    StableDiffusionXLPipeline.load_lora_into_unet(
        state, alphas, models["unet"], adapter_name="default", metadata=metadata
    )
    loaded = {"unet"}
    for name, encoder in models.items():
        if name != "unet" and any(key.startswith(f"{name}.") for key in state):
            StableDiffusionXLPipeline.load_lora_into_text_encoder(
                state, alphas, encoder, prefix=name, adapter_name="default", metadata=metadata
            )
            loaded.add(name)
    for name in loaded:
        for parameter_name, parameter in models[name].named_parameters():
            parameter.requires_grad_("lora_" in parameter_name)
    return loaded
