"""Small pure pieces of an SDXL training step, each testable alone."""

from __future__ import annotations

import bisect
import hashlib
import random
from collections import defaultdict

import torch
from diffusers import DDPMScheduler


def time_ids(row: dict) -> torch.Tensor:
    """SDXL micro-conditioning (original size, crop top-left, target size), each as (height, width).

    The "original size" is the resized intermediate image the crop was taken from, so the crop
    offsets and the size they are relative to agree (SimpleTuner does the same).
    """
    return torch.tensor(
        [
            row["intermediate_height"],
            row["intermediate_width"],
            row["crop_top"],
            row["crop_left"],
            row["target_height"],
            row["target_width"],
        ],
        dtype=torch.float32,
    )


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from any parts, stable across runs and processes (unlike `hash`)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def draw_noise(
    shape: tuple[int, ...], generator: torch.Generator, offset: float, offset_probability: float
) -> torch.Tensor:
    """Gaussian noise for one sample; with `offset_probability`, plus `offset` times a random constant
    per channel (offset noise, which lets the model change an image's overall brightness). The same
    draws are made whatever the settings, so changing them never shifts later random numbers."""
    noise = torch.randn(shape, generator=generator)
    apply = torch.rand((), generator=generator).item() < offset_probability
    channel_offset = torch.randn((shape[0], 1, 1), generator=generator)
    return noise + offset * channel_offset if apply else noise


def draw_timestep(generator: torch.Generator, probabilities: torch.Tensor) -> torch.Tensor:
    """One training timestep, drawn with the (possibly biased) `timestep_weights`."""
    return torch.multinomial(probabilities, 1, generator=generator)


def sample_posterior(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """z = mean + std·eps: a fresh draw from the cached VAE posterior each time a sample is used."""
    eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32)
    return mean.float() + std.float() * eps


def unet_prediction(
    unet: torch.nn.Module,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor,
    time_ids: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The SDXL U-Net's prediction for a batch, its inputs cast to the frozen weights' dtype."""
    return unet(
        noisy.to(dtype),
        timesteps,
        prompt_embeds.to(dtype),
        added_cond_kwargs={"text_embeds": pooled_prompt_embeds.to(dtype), "time_ids": time_ids.to(dtype)},
    ).sample


def training_target(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet should predict, by the scheduler's prediction type."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def epoch_samples(rows: list[dict], rng: random.Random) -> list[dict]:
    """One epoch's draws: every image 1 + `repeats` times, each draw kept with its dataset's
    `probability` and taking one of the image's variants (original or mirrored) at random."""
    variants: dict[str, list[dict]] = defaultdict(list)
    for row in sorted(rows, key=lambda r: r["variant_id"]):
        variants[row["sample_id"]].append(row)
    draws = []
    for sample_id in sorted(variants):
        choices = variants[sample_id]
        for _ in range(1 + choices[0]["repeats"]):
            if choices[0]["probability"] < 1 and rng.random() >= choices[0]["probability"]:
                continue
            draws.append(choices[0] if len(choices) == 1 else rng.choice(choices))
    return draws


def epoch_batches(rows: list[dict], batch_size: int, seed: int, epoch: int) -> list[list[dict]]:
    """One epoch's batches: each drawn from a single bucket, shuffled reproducibly per epoch.

    Every batch is full: a bucket's last partial batch is topped up with that bucket's first draws,
    so each process of a multi-process run gets the same amount of work and each step's loss is a
    mean over the same number of samples."""
    rng = random.Random(derived_seed(seed, epoch))
    buckets: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for row in epoch_samples(rows, rng):
        buckets[(row["target_width"], row["target_height"])].append(row)
    batches = []
    for key in sorted(buckets):
        members = buckets[key]
        rng.shuffle(members)
        for start in range(0, len(members), batch_size):
            batches.append([members[(start + i) % len(members)] for i in range(batch_size)])
    rng.shuffle(batches)
    return batches


class BatchOrder:
    """The endless sequence of batches, addressable by index: the data order is a function of
    (seed, index) alone, which is what makes resuming from any step exact. Epochs can differ in
    length (`probability` < 1), so their start offsets are computed once and remembered."""

    def __init__(self, rows: list[dict], batch_size: int, seed: int) -> None:
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self._starts = [0]  # index of the first batch of each epoch computed so far
        self._epoch, self._batches = -1, []

    def _load(self, epoch: int) -> list[list[dict]]:
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, epoch_batches(self.rows, self.batch_size, self.seed, epoch)
        return self._batches

    def epoch_length(self, epoch: int) -> int:
        """Batches in `epoch` (epochs differ in length only when `probability` < 1)."""
        return len(self._load(epoch))

    def __getitem__(self, index: int) -> list[dict]:
        epoch = bisect.bisect_right(self._starts, index) - 1
        while True:
            batches = self._load(epoch)
            if len(self._starts) == epoch + 1:
                self._starts.append(self._starts[epoch] + len(batches))
            if index < self._starts[epoch + 1]:
                return batches[index - self._starts[epoch]]
            epoch += 1


def snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep."""
    alpha_bar = scheduler.alphas_cumprod.to(torch.float64)[timesteps]
    return (alpha_bar / (1 - alpha_bar)).float()


def snr_loss_weights(snr_values: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(snr, gamma) / snr for epsilon targets,
    min(snr, gamma) / (snr + 1) for v targets. A zero-SNR timestep (rescaled betas) gets weight 0 for
    epsilon rather than a division by zero."""
    clipped = torch.minimum(snr_values, torch.full_like(snr_values, gamma))
    if prediction_type == "v_prediction":
        return clipped / (snr_values + 1)
    return torch.where(snr_values > 0, clipped / snr_values.clamp_min(1e-12), torch.zeros_like(snr_values))


def timestep_weights(
    num_timesteps: int, strategy: str, multiplier: float, begin: int, end: int, portion: float
) -> torch.Tensor:
    """Relative probabilities of drawing each timestep: uniform, or `multiplier` times more likely
    for the `portion` of earliest (low-noise) or latest (high-noise) timesteps, or for [begin, end)."""
    weights = torch.ones(num_timesteps)
    span = int(num_timesteps * portion)
    if strategy == "earlier":
        weights[:span] *= multiplier
    elif strategy == "later":
        weights[num_timesteps - span :] *= multiplier
    elif strategy == "range":
        weights[begin:end] *= multiplier
    return weights / weights.sum()


def per_sample_loss(
    prediction: torch.Tensor, target: torch.Tensor, loss_type: str, huber_c: float
) -> torch.Tensor:
    """One loss value per sample: mean squared error, or the pseudo-Huber loss
    2c(sqrt(d^2 + c^2) - c), which is l2-like near 0 and l1-like for outliers."""
    difference = prediction.float() - target.float()
    if loss_type == "huber":
        elementwise = 2 * huber_c * (torch.sqrt(difference**2 + huber_c**2) - huber_c)
    else:
        elementwise = difference**2
    return elementwise.mean(dim=tuple(range(1, difference.dim())))
