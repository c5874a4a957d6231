"""Built-in tiny models with SDXL's real architecture and random weights, generated from a seed.

They are written once as ordinary diffusers / transformers folders and from then on loaded with
`from_pretrained`, so the offline demo runs the code path a real SDXL run takes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from sdxl_lib.models import TINY_CLIP, TINY_SDXL, TINY_TAESD
from sdxl_lib.models.tokenizer import write_clip_tokenizer_files

BUILTIN_SEED = 20240101
# Random CLIP embeddings are often anti-aligned, which clips every score to 0; this seed's are
# not, so the demo's CLIP scores move. With random weights they measure nothing but the plumbing.
TINY_CLIP_SEED = 3
MAX_TOKENS = 77  # SDXL's CLIP context length


def _tokenizer(pad_token: str) -> CLIPTokenizer:
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer_files(Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=MAX_TOKENS, pad_token=pad_token)


def _text_config(tokenizer: CLIPTokenizer, hidden: int, layers: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=hidden,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_sdxl(directory: Path, seed: int = BUILTIN_SEED) -> None:
    """Write a tiny SDXL pipeline folder (same layout as stabilityai/stable-diffusion-xl-base-1.0)."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    torch.manual_seed(seed)
    tokenizer = _tokenizer(pad_token="<|endoftext|>")
    tokenizer_2 = _tokenizer(pad_token="!")  # SDXL's second tokenizer pads with "!"
    text_encoder = CLIPTextModel(_text_config(tokenizer, hidden=32, layers=3))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, hidden=64, layers=3))
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 4),
        transformer_layers_per_block=(1, 1, 1),
        cross_attention_dim=32 + 64,  # both encoders' hidden states are concatenated
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        # six time ids plus text encoder 2's pooled projection, as in SDXL (6*256 + 1280)
        projection_class_embeddings_input_dim=6 * time_embed_dim + 64,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16, 32, 32),  # four levels: SDXL's 8x downsampling
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=256,
        scaling_factor=0.13025,  # SDXL's VAE scaling factor
    )
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )
    pipeline.save_pretrained(directory, safe_serialization=True)


def build_tiny_clip(directory: Path, seed: int = TINY_CLIP_SEED) -> None:
    """Write a tiny CLIPModel folder (same layout as openai/clip-vit-large-patch14)."""
    torch.manual_seed(seed)
    tokenizer = _tokenizer(pad_token="<|endoftext|>")
    text = _text_config(tokenizer, hidden=32, layers=2).to_dict()
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=64,
        patch_size=16,
    )
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32))
    processor = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    processor.save_pretrained(directory)


def build_tiny_taesd(directory: Path, seed: int = BUILTIN_SEED) -> None:
    """Write a tiny AutoencoderTiny folder (madebyollin/taesdxl's layout: 4 latent channels, x8)."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=4,
    ).save_pretrained(directory, safe_serialization=True)


def build(name: str, directory: Path) -> None:
    """Write the built-in model `name` (one of models.BUILTIN_MODELS) to `directory`."""
    generators = {TINY_SDXL: build_tiny_sdxl, TINY_CLIP: build_tiny_clip, TINY_TAESD: build_tiny_taesd}
    generators[name](directory)
