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


def sample_posterior(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """z = mean + std·eps: a fresh draw from the cached VAE posterior each time a sample is used."""
    eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32)
    return mean.float() + std.float() * eps


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
    """One epoch's batches: each drawn from a single bucket, shuffled reproducibly per epoch."""
    rng = random.Random(derived_seed(seed, epoch))
    buckets: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for row in epoch_samples(rows, rng):
        buckets[(row["target_width"], row["target_height"])].append(row)
    batches = []
    for key in sorted(buckets):
        members = buckets[key]
        rng.shuffle(members)
        batches += [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
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

    def __getitem__(self, index: int) -> list[dict]:
        epoch = bisect.bisect_right(self._starts, index) - 1
        while True:
            batches = self._load(epoch)
            if len(self._starts) == epoch + 1:
                self._starts.append(self._starts[epoch] + len(batches))
            if index < self._starts[epoch + 1]:
                return batches[index - self._starts[epoch]]
            epoch += 1
