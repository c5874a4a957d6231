"""The built-in tiny SDXL has SDXL's structure, is deterministic, and loads like the real one."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from transformers import CLIPTokenizer

from sdxl_lib.models import TINY_SDXL
from sdxl_lib.models.builtin import build_tiny_sdxl
from sdxl_lib.sources import model_path, pin_model, tree_hash


def test_tiny_sdxl_has_sdxl_structure() -> None:
    pipeline = StableDiffusionXLPipeline.from_pretrained(
        model_path(pin_model(TINY_SDXL)), use_safetensors=True
    )
    unet, vae = pipeline.unet.config, pipeline.vae
    assert unet.addition_embed_type == "text_time" and len(unet.block_out_channels) == 3
    hidden = pipeline.text_encoder.config.hidden_size + pipeline.text_encoder_2.config.hidden_size
    assert unet.cross_attention_dim == hidden
    assert unet.projection_class_embeddings_input_dim == (
        6 * unet.addition_time_embed_dim + pipeline.text_encoder_2.config.projection_dim
    )
    with torch.no_grad():
        latents = vae.encode(torch.zeros(1, 3, 64, 96)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 12)  # SDXL's 8x downsampling
    scheduler = pipeline.scheduler.config
    assert (scheduler.beta_schedule, scheduler.beta_start, scheduler.beta_end) == (
        "scaled_linear",
        0.00085,
        0.012,
    )
    assert pipeline.tokenizer.model_max_length == 77 and pipeline.tokenizer_2.pad_token == "!"


def test_tokenizer_is_a_real_bpe() -> None:
    tokenizer = CLIPTokenizer.from_pretrained(model_path(pin_model(TINY_SDXL)), subfolder="tokenizer")
    tokens = tokenizer.tokenize("a red circle, unseen-words ü")
    assert tokens[:3] == ["a</w>", "red</w>", "circle</w>"]  # learned merges
    assert len(tokens) > 6  # unknown words fall back to byte-level pieces, never <unk>
    ids = tokenizer(" ".join(["word"] * 100), truncation=True, padding="max_length").input_ids
    assert len(ids) == 77 and ids[0] == tokenizer.bos_token_id


def test_built_from_seed_deterministically(tmp_path: Path) -> None:
    build_tiny_sdxl(tmp_path / "again")
    assert tree_hash(tmp_path / "again") == pin_model(TINY_SDXL)["revision"]
