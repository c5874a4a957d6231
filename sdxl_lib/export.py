"""Writing the trained LoRA in the layout `StableDiffusionXLPipeline.load_lora_weights` reads."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
# The pipeline components a LoRA can train, by the names `save_lora_weights` files them under.
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors (peft names). Embeddings are never trained; saying so spares peft's
    check of the base model's vocabulary, which looks the model id up on the hub."""
    return get_peft_model_state_dict(model, save_embedding_layers=False)


def save_lora(
    models: dict[str, torch.nn.Module],
    directory: Path,
    initial: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Save the LoRA of each model in `models` (keyed by component name: unet, text_encoder,
    text_encoder_2), each with its rank/alpha config as metadata so alpha survives a reload.

    `initial`: each adapter's starting weights when it was initialised from the base weights (PiSSA,
    OLoRA); the saved LoRA is then converted to apply to the original base model."""
    layers: dict[str, dict] = {}
    for name, model in models.items():
        state = lora_state(model)
        if any(not torch.isfinite(t).all() for t in state.values()):
            raise ValueError(f"refusing to export a LoRA whose {name} weights contain NaN or inf")
        metadata = model.peft_config["default"].to_dict()
        if initial is not None:
            state = as_standard_lora(state, initial[name])
            metadata.update(
                r=2 * metadata["r"], lora_alpha=2 * metadata["lora_alpha"], init_lora_weights=True
            )
        # peft's key names throughout: diffusers' converter renames only attention modules, and a
        # file mixing both styles loads only part of its modules back.
        layers[f"{name}_lora_layers"] = state
        layers[f"{name}_lora_adapter_metadata"] = metadata
    StableDiffusionXLPipeline.save_lora_weights(directory, **layers, safe_serialization=True)
    return directory / LORA_WEIGHTS


def lora_components(file: Path) -> set[str]:
    """Which pipeline components (unet, text_encoder, text_encoder_2) a LoRA file of ours adapts."""
    with safe_open(str(file), "pt") as handle:
        return {key.split(".", 1)[0] for key in handle.keys()}  # noqa: SIM118 (not a dict)


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
