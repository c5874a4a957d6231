"""kohya-format export: SGM module names on the full SDXL architecture, and files that load through
diffusers' own kohya reader into the same model as our diffusers-format file."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_pipeline, trained_pipeline
from diffusers import StableDiffusionXLPipeline
from diffusers.utils import convert_unet_state_dict_to_peft
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from sdxl_lib.config import TrainParams
from sdxl_lib.export import KOHYA_WEIGHTS, LORA_WEIGHTS, save_lora
from sdxl_lib.interop.kohya import kohya_module_name
from sdxl_lib.models.full_size import full_size_models
from sdxl_lib.train.lora import lora_config

PARTS = ("lora_down.weight", "lora_up.weight")
# SDXL's SGM layout, as in sd_xl_base_1.0.safetensors, for modules of each kind
KNOWN_NAMES = {
    ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"): (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    ),
    ("unet", "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_out.0"): (
        "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_out_0"
    ),
    ("unet", "mid_block.attentions.0.transformer_blocks.3.ff.net.0.proj"): (
        "lora_unet_middle_block_1_transformer_blocks_3_ff_net_0_proj"
    ),
    ("unet", "up_blocks.0.attentions.2.proj_out"): "lora_unet_output_blocks_2_1_proj_out",
    ("unet", "up_blocks.1.attentions.0.transformer_blocks.1.ff.net.2"): (
        "lora_unet_output_blocks_3_1_transformer_blocks_1_ff_net_2"
    ),
    ("unet", "down_blocks.0.resnets.1.conv1"): "lora_unet_input_blocks_2_0_in_layers_2",
    ("unet", "down_blocks.1.resnets.0.conv_shortcut"): "lora_unet_input_blocks_4_0_skip_connection",
    ("unet", "mid_block.resnets.1.time_emb_proj"): "lora_unet_middle_block_2_emb_layers_1",
    ("unet", "up_blocks.2.resnets.2.conv2"): "lora_unet_output_blocks_8_0_out_layers_3",
    ("unet", "down_blocks.0.downsamplers.0.conv"): "lora_unet_input_blocks_3_0_op",
    ("unet", "down_blocks.1.downsamplers.0.conv"): "lora_unet_input_blocks_6_0_op",
    ("unet", "up_blocks.0.upsamplers.0.conv"): "lora_unet_output_blocks_2_2_conv",
    ("unet", "up_blocks.1.upsamplers.0.conv"): "lora_unet_output_blocks_5_2_conv",
    ("text_encoder", "encoder.layers.11.self_attn.out_proj"): (
        "lora_te1_text_model_encoder_layers_11_self_attn_out_proj"
    ),
    (
        "text_encoder_2",
        "text_model.encoder.layers.31.mlp.fc2",
    ): "lora_te2_text_model_encoder_layers_31_mlp_fc2",
}


@pytest.fixture(scope="module")
def full_size_adapted() -> dict[str, torch.nn.Module]:
    """Full-size SDXL (no weights) with a LoRA on every module the `all` preset trains."""
    models = full_size_models("meta")
    cfg = TrainParams(lora_target="all", lora_rank=1)
    for name, model in models.items():
        model.add_adapter(lora_config(cfg, text_encoder=name != "unet"))
    return models


def adapted_modules(model: torch.nn.Module) -> list[str]:
    return [
        n.removesuffix(".lora_A.default") for n, _ in model.named_modules() if n.endswith(".lora_A.default")
    ]


def test_known_sgm_names_on_the_full_sdxl_architecture(full_size_adapted: dict) -> None:
    unet_config = full_size_adapted["unet"].config
    for (component, module), expected in KNOWN_NAMES.items():
        assert module in adapted_modules(full_size_adapted[component]), module
        assert kohya_module_name(component, module, unet_config) == expected


def test_every_trainable_module_maps_back_through_diffusers(full_size_adapted: dict) -> None:
    """Every module the presets can train has its own kohya name; diffusers' kohya reader maps each
    U-Net name back to the module it came from, and text encoder names follow the one kohya form."""
    unet_config = full_size_adapted["unet"].config
    names = {
        (component, module): kohya_module_name(component, module, unet_config)
        for component, model in full_size_adapted.items()
        for module in adapted_modules(model)
    }
    assert len(set(names.values())) == len(names)
    unet_names = {module: name for (component, module), name in names.items() if component == "unet"}
    kohya = {f"{name}.{part}": torch.zeros(1, 1) for name in unet_names.values() for part in PARTS}
    state, _ = StableDiffusionXLPipeline.lora_state_dict(kohya, unet_config=unet_config)
    peft_state = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state.items()})
    assert {key.removesuffix(".lora_A.weight") for key in peft_state if "lora_A" in key} == unet_names.keys()
    text_form = r"lora_te[12]_text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12])"
    text_names = [name for (component, _), name in names.items() if component != "unet"]
    assert len(text_names) == 6 * (12 + 32) and all(re.fullmatch(text_form, n) for n in text_names)


@torch.no_grad()
def outputs(pipeline: Any) -> list[torch.Tensor]:
    """The U-Net's prediction and both text encoders' outputs on fixed inputs."""
    generator = torch.Generator().manual_seed(0)
    ids = pipeline.tokenizer(["a red fox in the snow"], padding="max_length", return_tensors="pt").input_ids
    hidden_1 = pipeline.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    encoded_2 = pipeline.text_encoder_2(ids, output_hidden_states=True)
    prompt_embeds = torch.cat([hidden_1, encoded_2.hidden_states[-2]], dim=-1)
    sample = torch.randn(1, 4, 16, 16, generator=generator)
    added = {"text_embeds": encoded_2[0], "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]])}
    prediction = pipeline.unet(sample, torch.tensor([500]), prompt_embeds, added_cond_kwargs=added).sample
    return [prediction, hidden_1, encoded_2[0]]


@pytest.mark.parametrize(
    ("lora_target", "use_dora", "text_encoders"),
    [
        ("attention", False, False),
        ("all", False, False),
        ("attention", False, True),
        ("all", False, True),
        ("attention_mlp", True, True),
    ],
)
def test_kohya_file_loads_into_the_same_model_as_the_diffusers_file(
    lora_target: str, use_dora: bool, text_encoders: bool, tmp_path: Path
) -> None:
    cfg = TrainParams(lora_target=lora_target, lora_rank=4, lora_alpha=2, use_dora=use_dora)
    trained, models = trained_pipeline(cfg, text_encoders)
    save_lora(models, tmp_path)
    kohya = load_file(tmp_path / KOHYA_WEIGHTS)
    prefixes = {key.split("_", 2)[1] for key in kohya}
    assert prefixes == ({"unet", "te1", "te2"} if text_encoders else {"unet"})
    assert all(kohya[key].item() == 2.0 for key in kohya if key.endswith(".alpha"))
    assert any(key.endswith(".dora_scale") for key in kohya) == use_dora
    expected = outputs(trained)
    # diffusers drops `dora_scale` from SDXL kohya files, so it cannot judge a kohya DoRA file:
    # test_kohya_dora_merges_to_the_trained_weights does.
    for weight_name in (LORA_WEIGHTS,) if use_dora else (LORA_WEIGHTS, KOHYA_WEIGHTS):
        loaded = tiny_pipeline()
        loaded.load_lora_weights(str(tmp_path), weight_name=weight_name)
        for got, want in zip(outputs(loaded), expected, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=weight_name)


def merged_from_kohya(kohya: dict[str, torch.Tensor], name: str, base: torch.Tensor) -> torch.Tensor:
    """A kohya DoRA module applied to its base weight as ComfyUI and LyCORIS apply it: the LoRA
    update scaled by alpha / rank, then each output row renormalised to its `dora_scale`."""
    down, up = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"]
    delta = (up.flatten(1) @ down.flatten(1)).reshape(base.shape) * kohya[f"{name}.alpha"] / down.shape[0]
    weight = base + delta
    norm = weight.flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))
    return kohya[f"{name}.dora_scale"] * weight / norm


def test_kohya_dora_merges_to_the_trained_weights(tmp_path: Path) -> None:
    cfg = TrainParams(lora_target="attention_mlp", lora_rank=4, lora_alpha=2, use_dora=True)
    trained, models = trained_pipeline(cfg, text_encoders=True)
    save_lora(models, tmp_path)
    kohya = load_file(tmp_path / KOHYA_WEIGHTS)
    checked = 0
    for component, model in models.items():
        for module_name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                name = kohya_module_name(component, module_name, trained.unet.config)
                base = module.get_base_layer().weight.detach().clone()
                module.merge()  # peft's own DoRA merge into the base weight
                merged = module.get_base_layer().weight.detach()
                torch.testing.assert_close(merged_from_kohya(kohya, name, base), merged, atol=1e-5, rtol=1e-4)
                checked += 1
    assert checked == sum(key.endswith(".dora_scale") for key in kohya) > 0
