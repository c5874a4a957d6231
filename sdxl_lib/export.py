"""Writing the trained LoRA in the layout `StableDiffusionXLPipeline.load_lora_weights` reads."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from peft.utils import get_peft_model_state_dict

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def save_unet_lora(
    unet: torch.nn.Module, directory: Path, initial: dict[str, torch.Tensor] | None = None
) -> Path:
    """Save the UNet's LoRA (with its rank/alpha config as metadata, so alpha survives a reload).

    `initial`: the adapter's starting weights when it was initialised from the base weights (PiSSA,
    OLoRA); the saved LoRA is then converted to apply to the original base model."""
    state = get_peft_model_state_dict(unet)
    if any(not torch.isfinite(t).all() for t in state.values()):
        raise ValueError("refusing to export a LoRA that contains NaN or inf weights")
    metadata = unet.peft_config["default"].to_dict()
    if initial is not None:
        state = as_standard_lora(state, initial)
        metadata.update(r=2 * metadata["r"], lora_alpha=2 * metadata["lora_alpha"], init_lora_weights=True)
    StableDiffusionXLPipeline.save_lora_weights(
        directory,
        # peft's key names throughout: diffusers' converter renames only attention modules, and a
        # file mixing both styles loads only part of its modules back.
        unet_lora_layers=state,
        unet_lora_adapter_metadata=metadata,
        safe_serialization=True,
    )
    return directory / LORA_WEIGHTS


def as_standard_lora(
    final: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """PiSSA and OLoRA move the adapter's starting point out of the base weights, so their adapter
    only works on that modified base. B1·A1 - B0·A0 is the change to the original base; as a LoRA of
    rank 2r it is B = [B1, -B0], A = [A1; A0] (peft's conversion), loadable on the original model.
    The caller doubles alpha with the rank so the scale alpha / r is unchanged."""
    converted = {}
    for name, tensor in final.items():
        if "lora_A" in name:
            converted[name] = torch.cat([tensor, initial[name]], dim=0)
        elif "lora_B" in name:
            converted[name] = torch.cat([tensor, -initial[name]], dim=1)
        else:
            converted[name] = tensor
    return converted
