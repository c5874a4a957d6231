"""Stable eval loss: the held-out split at fixed timesteps with fixed noise, so every run and every
checkpoint is scored on exactly the same noisy inputs and the numbers are comparable."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from tqdm import tqdm
from transformers import CLIPTokenizer

from sdxl_lib.cache.latents import LatentCache, OnlineLatents
from sdxl_lib.cache.text import TextCache, encode_prompts
from sdxl_lib.train.utils import derived_seed, sample_posterior, time_ids, training_target, unet_prediction


def eval_timesteps(scheduler: DDPMScheduler, count: int) -> torch.Tensor:
    """`count` timesteps evenly spaced over the whole schedule."""
    last = scheduler.config.num_train_timesteps - 1
    return torch.linspace(0, last, count).round().long()


def conditioning_of(
    texts: TextCache | None, tokenizers: list[CLIPTokenizer], encoders: list[torch.nn.Module]
) -> Callable[[str], tuple[torch.Tensor, torch.Tensor]]:
    """A caption's (prompt_embeds, pooled_prompt_embeds): from the text cache, or, when `texts` is
    None (text-encoder LoRAs), from `encoders` as they stand when called."""

    def conditioning(caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        if texts is not None:
            return texts.embeds(caption)
        with torch.no_grad():
            embeds, pooled = encode_prompts(tokenizers, encoders, [caption])
        return embeds[0], pooled[0]

    return conditioning


@torch.no_grad()
def eval_loss_by_timestep(
    unet: UNet2DConditionModel,
    scheduler: DDPMScheduler,
    rows: list[dict],
    latents: LatentCache | OnlineLatents,
    conditioning: Callable[[str], tuple[torch.Tensor, torch.Tensor]],
    scaling: tuple[float, float],
    timesteps: torch.Tensor,
    seed: int,
    batch_size: int,
) -> torch.Tensor:
    """Mean MSE over the rows, one value per timestep. Noise depends only on (seed, sample id).
    `conditioning(caption)` gives its (prompt_embeds, pooled_prompt_embeds)."""
    scale, shift = scaling
    dtype, device = unet.dtype, unet.device
    totals = torch.zeros(len(timesteps), dtype=torch.float64)
    for row in tqdm(sorted(rows, key=lambda r: r["sample_id"]), desc="eval loss", unit="img", leave=False):
        generator = torch.Generator().manual_seed(derived_seed(seed, row["sample_id"]))
        clean = (sample_posterior(*latents.posterior(row["variant_id"]), generator) - shift) * scale
        noise = torch.randn((len(timesteps), *clean.shape), generator=generator)
        prompt_embeds, pooled = conditioning(row["caption"])
        for start in range(0, len(timesteps), batch_size):
            t = timesteps[start : start + batch_size]
            n = len(t)
            clean_batch = clean.expand(n, *clean.shape)
            noisy = scheduler.add_noise(clean_batch, noise[start : start + n], t)
            target = training_target(scheduler, clean_batch, noise[start : start + n], t)
            prediction = unet_prediction(
                unet,
                noisy.to(device),
                t.to(device),
                prompt_embeds.expand(n, *prompt_embeds.shape).to(device),
                pooled.expand(n, *pooled.shape).to(device),
                time_ids(row).expand(n, 6).to(device),
                dtype,
            )
            per_item = F.mse_loss(prediction.float().cpu(), target.float(), reduction="none")
            totals[start : start + n] += per_item.mean(dim=(1, 2, 3)).double()
    return (totals / len(rows)).float()
