"""The pure pieces of a training step, checked against diffusers and by known answers."""

from __future__ import annotations

from collections import Counter

import torch
from diffusers import DDPMScheduler, StableDiffusionXLPipeline

from sdxl_lib.evaluate.eval_loss import eval_timesteps
from sdxl_lib.models.builtin import TINY_SDXL
from sdxl_lib.sources import model_path, pin_model
from sdxl_lib.train.utils import BatchOrder, epoch_batches, time_ids, training_target


def row(sample_id: str, w: int = 320, h: int = 192, **crop: int) -> dict:
    return {
        "sample_id": sample_id,
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
    rows = [row(f"s{i}") for i in range(5)]
    order = BatchOrder(rows, 2, seed=3)
    flat = epoch_batches(rows, 2, 3, 0) + epoch_batches(rows, 2, 3, 1)
    assert [order[i] for i in range(len(flat))] == flat
    assert order[len(flat) - 1] == flat[-1] and order[0] == flat[0]  # random access


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
