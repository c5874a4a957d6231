"""The pure pieces of a training step, checked against diffusers and by known answers."""

from __future__ import annotations

import random
from collections import Counter

import torch
from diffusers import DDPMScheduler, StableDiffusionXLPipeline

from sdxl_lib.evaluate.eval_loss import eval_timesteps
from sdxl_lib.models.builtin import TINY_SDXL
from sdxl_lib.sources import model_path, pin_model
from sdxl_lib.train.utils import BatchOrder, epoch_batches, epoch_samples, time_ids, training_target


def row(
    sample_id: str,
    w: int = 320,
    h: int = 192,
    flip: bool = False,
    repeats: int = 0,
    probability: float = 1.0,
    **crop: int,
) -> dict:
    return {
        "sample_id": sample_id,
        "variant_id": sample_id + ("-flip" if flip else ""),
        "flip": flip,
        "repeats": repeats,
        "probability": probability,
        "target_width": w,
        "target_height": h,
        "intermediate_width": crop.get("iw", 341),
        "intermediate_height": crop.get("ih", 192),
        "crop_left": crop.get("left", 10),
        "crop_top": crop.get("top", 0),
    }


def test_time_ids_for_known_crop_match_the_pipeline() -> None:
    sample = row("a", iw=341, ih=192, left=10, top=0)
    assert time_ids(sample).tolist() == [192, 341, 0, 10, 192, 320]
    # The numbers the SDXL pipeline itself builds for (original size, crop top-left, target size).
    pipeline = StableDiffusionXLPipeline.from_pretrained(
        model_path(pin_model(TINY_SDXL)), use_safetensors=True
    )
    expected = pipeline._get_add_time_ids(
        (192, 341),
        (0, 10),
        (192, 320),
        dtype=torch.float32,
        text_encoder_projection_dim=pipeline.text_encoder_2.config.projection_dim,
    )
    assert torch.equal(time_ids(sample)[None], expected)


def test_batches_come_from_one_bucket_and_cover_the_epoch() -> None:
    rows = [row(f"s{i}") for i in range(7)] + [row(f"p{i}", w=192, h=320) for i in range(5)]
    batches = epoch_batches(rows, 3, seed=1, epoch=0)
    assert all(len({(r["target_width"], r["target_height"]) for r in b}) == 1 for b in batches)
    assert Counter(r["sample_id"] for b in batches for r in b) == Counter(r["sample_id"] for r in rows)
    assert epoch_batches(rows, 3, 1, 0) == batches and epoch_batches(rows, 3, 1, 1) != batches


def test_batch_order_indexes_across_epochs() -> None:
    rows = [row(f"s{i}", probability=0.6) for i in range(7)]
    order = BatchOrder(rows, 2, seed=3)
    flat = [b for epoch in range(4) for b in epoch_batches(rows, 2, 3, epoch)]
    assert len({len(epoch_batches(rows, 2, 3, e)) for e in range(4)}) > 1  # epochs differ in length
    assert [order[i] for i in range(len(flat))] == flat
    assert BatchOrder(rows, 2, seed=3)[len(flat) - 1] == flat[-1]  # random access, as on resume


def test_epoch_draws_one_variant_per_image_with_repeats_and_probability() -> None:
    rows = [row("a"), row("a", flip=True), row("b", repeats=2), row("c", probability=0.0)]
    draws = [epoch_samples(rows, random.Random(i)) for i in range(200)]
    assert all(Counter(r["sample_id"] for r in d) == {"a": 1, "b": 3} for d in draws)
    flips = sum(r["flip"] for d in draws for r in d)
    assert 60 < flips < 140  # the mirrored variant about half the time


def test_training_target_by_prediction_type() -> None:
    latents, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    eps = DDPMScheduler(prediction_type="epsilon")
    assert torch.equal(training_target(eps, latents, noise, t), noise)
    v = DDPMScheduler(prediction_type="v_prediction")
    alpha = v.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    sigma = (1 - v.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(training_target(v, latents, noise, t), alpha * noise - sigma * latents)


def test_eval_timesteps_span_the_schedule() -> None:
    assert eval_timesteps(DDPMScheduler(), 28)[[0, -1]].tolist() == [0, 999]
    assert len(set(eval_timesteps(DDPMScheduler(), 28).tolist())) == 28
