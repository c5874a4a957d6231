"""The pure pieces of a training step, checked against diffusers and by known answers."""

from __future__ import annotations

import random
from collections import Counter

import torch
from diffusers import DDPMScheduler, StableDiffusionXLPipeline

from sdxl_lib.evaluate.eval_loss import eval_timesteps
from sdxl_lib.models import TINY_SDXL
from sdxl_lib.sources import model_path, pin_model
from sdxl_lib.train.utils import (
    BatchOrder,
    draw_noise,
    draw_timestep,
    epoch_batches,
    epoch_samples,
    per_sample_loss,
    snr,
    snr_loss_weights,
    time_ids,
    timestep_weights,
    training_target,
)


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
    assert all(len(b) == 3 for b in batches)  # partial batches are topped up from their bucket
    drawn = Counter(r["sample_id"] for b in batches for r in b)
    assert set(drawn) == {r["sample_id"] for r in rows}
    assert sum(drawn.values()) == 9 + 6 and sum(n - 1 for n in drawn.values()) == 2 + 1
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


def test_min_snr_weights_for_epsilon_and_v_prediction() -> None:
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    timesteps = torch.tensor([0, 100, 500, 999])
    values = snr(scheduler, timesteps)
    alpha_bar = scheduler.alphas_cumprod[timesteps].double()
    torch.testing.assert_close(values, (alpha_bar / (1 - alpha_bar)).float())
    assert values[0] > 5 > values[-1]  # low noise: high SNR, clipped; high noise: not clipped
    epsilon = snr_loss_weights(values, 5.0, "epsilon")
    torch.testing.assert_close(epsilon, torch.minimum(values, torch.tensor(5.0)) / values)
    assert epsilon[-1] == 1.0 and epsilon[0] < 1.0
    v = snr_loss_weights(values, 5.0, "v_prediction")
    torch.testing.assert_close(v, torch.minimum(values, torch.tensor(5.0)) / (values + 1))
    zero_snr = snr_loss_weights(torch.tensor([0.0, 1.0]), 5.0, "epsilon")
    assert zero_snr.tolist() == [0.0, 1.0]


def test_timestep_bias_makes_the_chosen_steps_likelier() -> None:
    uniform = timestep_weights(1000, "none", 3.0, 0, 1000, 0.25)
    assert torch.allclose(uniform, torch.full((1000,), 1e-3))
    later = timestep_weights(1000, "later", 3.0, 0, 1000, 0.25)
    assert torch.isclose(later[999], 3 * later[0]) and later[750] == later[999] and later[749] == later[0]
    earlier = timestep_weights(1000, "earlier", 2.0, 0, 1000, 0.1)
    assert torch.isclose(earlier[99], 2 * earlier[100])
    ranged = timestep_weights(1000, "range", 4.0, 200, 300, 0.25)
    assert ranged[200] == ranged[299] and ranged[300] == ranged[199]
    assert torch.isclose(ranged[200], 4 * ranged[300])
    generator = torch.Generator().manual_seed(0)
    draws = torch.cat([draw_timestep(generator, later) for _ in range(4000)])
    assert 0.45 < (draws >= 750).float().mean() < 0.55  # 3 x 0.25 / (3 x 0.25 + 0.75) = 0.5


def test_offset_noise_adds_a_constant_per_channel_with_its_probability() -> None:
    plain = draw_noise((4, 8, 8), torch.Generator().manual_seed(1), 0.0, 1.0)
    offset = draw_noise((4, 8, 8), torch.Generator().manual_seed(1), 0.5, 1.0)
    shift = offset - plain
    assert shift.abs().sum() > 0 and torch.allclose(shift, shift[:, :1, :1].expand_as(shift))
    never = draw_noise((4, 8, 8), torch.Generator().manual_seed(1), 0.5, 0.0)
    assert torch.equal(never, plain)
    applied = [
        not torch.equal(
            draw_noise((4, 2, 2), torch.Generator().manual_seed(i), 0.5, 0.25),
            draw_noise((4, 2, 2), torch.Generator().manual_seed(i), 0.0, 0.25),
        )
        for i in range(400)
    ]
    assert 0.18 < sum(applied) / 400 < 0.32


def test_huber_loss_is_l2_like_near_zero_and_l1_like_far_away() -> None:
    target = torch.zeros(2, 1, 1, 1)
    prediction = torch.tensor([0.01, 10.0]).view(2, 1, 1, 1)
    l2 = per_sample_loss(prediction, target, "l2", 0.1)
    huber = per_sample_loss(prediction, target, "huber", 0.1)
    assert torch.allclose(l2, torch.tensor([1e-4, 100.0]))
    assert abs(huber[0] - 1e-4) < 1e-5  # 2c(sqrt(d^2+c^2)-c) ~ d^2 for d << c
    assert abs(huber[1] - 2 * 0.1 * (10.0 - 0.1)) < 0.01  # ~ 2c|d| for d >> c
