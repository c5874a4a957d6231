"""Writing the trained LoRA: in diffusers' layout (what `StableDiffusionXLPipeline.load_lora_weights`
reads) and, beside it, in kohya's (what A1111, Forge and ComfyUI load)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from sdxl_lib.interop.kohya import to_kohya

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHTS = "lora_kohya.safetensors"
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
    text_encoder_2), each with its rank/alpha config as metadata so alpha survives a reload, in
    `directory` as LORA_WEIGHTS (diffusers) and KOHYA_WEIGHTS.

    `initial`: each adapter's starting weights when it was initialised from the base weights (PiSSA,
    OLoRA); the saved LoRA is then converted to apply to the original base model."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    configs: dict[str, dict] = {}
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
        layers[name], configs[name] = state, metadata
    # Text encoders load through transformers' `load_adapter`, which matches DoRA magnitudes by
    # parameter name (with `.weight`); under peft's bare name they would be silently left at init.
    diffusers_layers = {
        name: {
            f"{key}.weight" if name != "unet" and key.endswith("lora_magnitude_vector") else key: tensor
            for key, tensor in state.items()
        }
        for name, state in layers.items()
    }
    StableDiffusionXLPipeline.save_lora_weights(
        directory,
        # peft's key names throughout: diffusers' converter renames only attention modules, and a
        # file mixing both styles loads only part of its modules back.
        **{f"{name}_lora_layers": state for name, state in diffusers_layers.items()},
        **{f"{name}_lora_adapter_metadata": config for name, config in configs.items()},
        safe_serialization=True,
    )
    kohya = to_kohya(layers, configs, models["unet"].config)
    save_file(kohya, str(directory / KOHYA_WEIGHTS), metadata={"ss_network_module": "networks.lora"})
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
