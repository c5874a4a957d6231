"""kohya / sd-scripts LoRA files, the format A1111, Forge and ComfyUI load.

A kohya file names each module as SDXL's original (SGM) code does, flattened with underscores:
`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`, and the text encoders as
`lora_te1_text_model_encoder_layers_0_self_attn_q_proj` (te2 for the second). Each module has
`.lora_down.weight` (peft's lora_A), `.lora_up.weight` (lora_B), a scalar `.alpha` and, for DoRA, a
`.dora_scale` (peft's magnitude vector, shaped [out, 1, ...] as LyCORIS writes it).
"""

from __future__ import annotations

import re
from typing import Any

import torch

# diffusers' ResNet block names -> SGM's ResBlock names
RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# modules outside the block structure
TOP_LEVEL_NAMES = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def sgm_module_name(diffusers_name: str, unet_config: Any) -> str:
    """The SGM name of a diffusers UNet module, e.g. down_blocks.1.attentions.0.proj_in ->
    input_blocks.4.1.proj_in (for SDXL's two layers per block)."""
    if diffusers_name in TOP_LEVEL_NAMES:
        return TOP_LEVEL_NAMES[diffusers_name]
    per_block = unet_config.layers_per_block
    match = re.fullmatch(r"(down_blocks|mid_block|up_blocks)\.(?:(\d+)\.)?(\w+)\.(\d+)\.(.+)", diffusers_name)
    if match is None:
        raise ValueError(f"no SGM name known for U-Net module {diffusers_name}")
    kind, block, part, index, rest = match.groups()
    layer = int(index)
    if part == "resnets":
        first, *tail = rest.split(".", 1)
        rest = ".".join([RESNET_NAMES.get(first, first), *tail])
    if kind == "mid_block":  # resnet, attention, resnet
        return f"middle_block.{2 * layer if part == 'resnets' else 1}.{rest}"
    i = int(block)
    if kind == "down_blocks":
        if part == "downsamplers":
            return f"input_blocks.{(i + 1) * (per_block + 1)}.0.op{rest.removeprefix('conv')}"
        return f"input_blocks.{i * (per_block + 1) + layer + 1}.{0 if part == 'resnets' else 1}.{rest}"
    position = i * (per_block + 1)
    if part == "upsamplers":  # after the block's last resnet (and attention, if it has them)
        has_attention = "CrossAttn" in unet_config.up_block_types[i]
        return f"output_blocks.{position + per_block}.{2 if has_attention else 1}.{rest}"
    return f"output_blocks.{position + layer}.{0 if part == 'resnets' else 1}.{rest}"


def kohya_module_name(component: str, module: str, unet_config: Any) -> str:
    """The kohya name of a module of a pipeline component (unet, text_encoder, text_encoder_2).
    Text encoder paths are written from `text_model.`, whether or not the installed transformers
    puts that prefix in CLIPTextModel's module names (version 5 does not)."""
    if component == "unet":
        return KOHYA_PREFIXES[component] + sgm_module_name(module, unet_config).replace(".", "_")
    path = "text_model." + module.removeprefix("text_model.")
    return KOHYA_PREFIXES[component] + path.replace(".", "_")


def module_alpha(module: str, config: dict[str, Any]) -> float:
    """A module's alpha in a peft LoraConfig: its `alpha_pattern` entry (as peft matches them: the
    pattern ends the module's path), else `lora_alpha`."""
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?({pattern})", module):
            return float(alpha)
    return float(config["lora_alpha"])


def to_kohya(
    layers: dict[str, dict[str, torch.Tensor]], configs: dict[str, dict[str, Any]], unet_config: Any
) -> dict[str, torch.Tensor]:
    """One kohya state dict from peft state dicts per component (`layers["unet"]` with keys like
    `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight`) and each component's
    LoraConfig as a dict (for the alphas)."""
    kohya: dict[str, torch.Tensor] = {}
    for component, state in layers.items():
        for key, tensor in state.items():
            module, kind = key.rsplit(".lora_", 1)
            name = kohya_module_name(component, module, unet_config)
            if kind == "A.weight":
                kohya[f"{name}.lora_down.weight"] = tensor
                kohya[f"{name}.alpha"] = torch.tensor(module_alpha(module, configs[component]))
            elif kind == "B.weight":
                kohya[f"{name}.lora_up.weight"] = tensor
            elif kind == "magnitude_vector":  # [out] -> [out, 1] or [out, 1, 1, 1], by the weight's rank
                rank = state[f"{module}.lora_A.weight"].dim()
                kohya[f"{name}.dora_scale"] = tensor.reshape(-1, *[1] * (rank - 1))
            else:
                raise ValueError(f"{component}.{key}: no kohya equivalent")
    return kohya
