"""The exported LoRA reloads through diffusers' public API with its alpha, and is never NaN."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_pipeline
from peft import LoraConfig

from sdxl_lib.config import TrainParams
from sdxl_lib.errors import UserError
from sdxl_lib.export import save_lora
from sdxl_lib.train.lora import lora_config


def test_alpha_survives_the_round_trip(tmp_path: Path) -> None:
    trained = tiny_pipeline()
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=["to_q", "to_v"])
    trained.unet.add_adapter(config)
    save_lora({"unet": trained.unet}, tmp_path)
    loaded = tiny_pipeline()
    loaded.load_lora_weights(str(tmp_path))
    scalings = [
        m.scaling for n, m in loaded.unet.named_modules() if n.endswith("to_q") and hasattr(m, "scaling")
    ]
    assert scalings and all(list(s.values()) == [2.0] for s in scalings)
    original = dict(trained.unet.named_parameters())
    for name, value in loaded.unet.named_parameters():
        if "lora_A" in name:
            assert torch.equal(value, original[name.replace("default_0", "default")])


def test_nan_lora_is_never_exported(tmp_path: Path) -> None:
    unet = tiny_pipeline().unet
    unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    next(p for n, p in unet.named_parameters() if "lora_B" in n).data[0, 0] = float("nan")
    with pytest.raises(UserError, match="refusing to export a LoRA whose unet weights contain NaN or inf"):
        save_lora({"unet": unet}, tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("preset", ["attention", "attention_mlp", "all"])
@pytest.mark.parametrize("use_dora", [False, True])
def test_every_trained_module_loads_back(preset: str, use_dora: bool, tmp_path: Path) -> None:
    """All of a LoRA's modules load through `load_lora_weights`, for every target preset, with DoRA."""
    trained = tiny_pipeline()
    trained.unet.add_adapter(lora_config(TrainParams(lora_target=preset, lora_rank=4, use_dora=use_dora)))
    with torch.no_grad():
        for name, p in trained.unet.named_parameters():
            if "lora_" in name:
                p.add_(0.01 * torch.randn_like(p))  # as if trained
    save_lora({"unet": trained.unet}, tmp_path)
    loaded = tiny_pipeline()
    loaded.load_lora_weights(str(tmp_path))
    original = {n.replace(".default", ""): p for n, p in trained.unet.named_parameters() if "lora_" in n}
    reloaded = {n.replace(".default_0", ""): p for n, p in loaded.unet.named_parameters() if "lora_" in n}
    assert reloaded.keys() == original.keys()
    assert all(torch.equal(reloaded[k], original[k]) for k in original)
