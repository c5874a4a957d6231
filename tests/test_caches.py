"""Cached tensors equal what the models compute for exactly the planned inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from accelerate import PartialState
from conftest import read_json
from diffusers import StableDiffusionXLPipeline
from PIL import Image, ImageOps

from sdxl_lib.cache.latents import LatentCache, OnlineLatents, encode_latents
from sdxl_lib.cache.text import TextCache, encode_captions, encode_prompts
from sdxl_lib.models.loading import load_text_encoders, load_vae
from sdxl_lib.sources import model_path


def crop_by_hand(path: Path, row: dict) -> torch.Tensor:
    """The recorded crop, rebuilt with PIL and numpy only (not the library's helpers)."""
    image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    image = image.resize((row["intermediate_width"], row["intermediate_height"]), Image.Resampling.LANCZOS)
    if row["flip"]:
        image = ImageOps.mirror(image)
    box = (
        row["crop_left"],
        row["crop_top"],
        row["crop_left"] + row["target_width"],
        row["crop_top"] + row["target_height"],
    )
    array = np.asarray(image.crop(box), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def test_cached_latents_equal_vae_posterior_of_recorded_crop(demo_project: Path) -> None:
    lock = read_json(demo_project / "data/lock.json")
    vae = load_vae(lock)
    rows = pq.read_table(demo_project / "data/buckets/plan.parquet").to_pylist()
    cache = LatentCache(
        demo_project / "data/latents", pq.read_table(demo_project / "data/latents/index.parquet")
    )
    assert len({(r["target_width"], r["target_height"]) for r in rows}) > 1
    assert any(r["flip"] for r in rows[::6]) and not all(r["flip"] for r in rows[::6])
    for row in rows[::6]:
        with torch.no_grad():
            posterior = vae.encode(crop_by_hand(demo_project / row["path"], row)).latent_dist
        mean, std = cache.posterior(row["variant_id"])
        assert mean.shape == (4, row["target_height"] // 8, row["target_width"] // 8)
        assert torch.equal(mean, posterior.mean[0]) and torch.equal(std, posterior.std[0])


def test_online_latents_equal_the_cache(demo_project: Path) -> None:
    """vae_cache_disable's online path gives the cached posterior bit for bit (fp32, batch 1)."""
    lock = read_json(demo_project / "data/lock.json")
    rows = pq.read_table(demo_project / "data/buckets/plan.parquet").to_pylist()
    cache = LatentCache.open(demo_project / "data/latents")
    online = OnlineLatents(rows, load_vae(lock), demo_project)
    for row in rows[::5]:
        cached, computed = cache.posterior(row["variant_id"]), online.posterior(row["variant_id"])
        assert all(torch.equal(a, b) for a, b in zip(cached, computed, strict=True)), row["variant_id"]


def test_batched_encoding_matches_single(demo_project: Path, tmp_path: Path) -> None:
    lock = read_json(demo_project / "data/lock.json")
    rows = pq.read_table(demo_project / "data/buckets/plan.parquet").to_pylist()[:6]
    vae = load_vae(lock)
    single, _ = encode_latents(rows, vae, demo_project, tmp_path / "one", 1, "fp32", 64, "v", PartialState())
    batched, _ = encode_latents(
        rows, vae, demo_project, tmp_path / "four", 4, "fp32", 64, "v", PartialState()
    )
    one, four = LatentCache(tmp_path / "one", single), LatentCache(tmp_path / "four", batched)
    for row in rows:
        torch.testing.assert_close(
            one.posterior(row["variant_id"]), four.posterior(row["variant_id"]), atol=1e-5, rtol=1e-5
        )


def test_shards_are_bounded(demo_project: Path, tmp_path: Path) -> None:
    lock = read_json(demo_project / "data/lock.json")
    rows = pq.read_table(demo_project / "data/buckets/plan.parquet").to_pylist()[:5]
    index, _ = encode_latents(rows, load_vae(lock), demo_project, tmp_path, 2, "bf16", 0, "v", PartialState())
    assert len(set(index.column("shard").to_pylist())) == 5  # a 0 MB limit: one entry per shard
    mean, _ = LatentCache(tmp_path, index).posterior(rows[0]["variant_id"])
    assert mean.dtype == torch.bfloat16


def test_cached_text_embeds_equal_pipeline_encode_prompt(demo_project: Path) -> None:
    lock = read_json(demo_project / "data/lock.json")
    pipeline = StableDiffusionXLPipeline.from_pretrained(model_path(lock["model"]), use_safetensors=True)
    index = pq.read_table(demo_project / "data/text/index.parquet")
    cache = TextCache(demo_project / "data/text", index)
    captions = index.column("caption").to_pylist()
    assert "" in captions  # the empty caption, for caption dropout
    plan_captions = set(
        pq.read_table(demo_project / "data/buckets/plan.parquet").column("caption").to_pylist()
    )
    assert set(captions) == plan_captions | {""}
    for caption in [*captions[::5], ""]:
        prompt_embeds, _, pooled, _ = pipeline.encode_prompt(
            caption, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        cached_embeds, cached_pooled = cache.embeds(caption)
        assert cached_embeds.shape == (77, 32 + 64)
        assert torch.equal(cached_embeds, prompt_embeds[0]) and torch.equal(cached_pooled, pooled[0])


def test_batched_text_encoding_matches_single(demo_project: Path) -> None:
    tokenizers, encoders = load_text_encoders(read_json(demo_project / "data/lock.json"))
    captions = ["a red circle", "", "a green square on a blue background"]
    embeds, pooled = encode_prompts(tokenizers, encoders, captions)
    for i, caption in enumerate(captions):
        one_embeds, one_pooled = encode_prompts(tokenizers, encoders, [caption])
        torch.testing.assert_close(embeds[i], one_embeds[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pooled[i], one_pooled[0], atol=1e-5, rtol=1e-5)


def test_long_captions_are_truncated_and_counted(tmp_path: Path, demo_project: Path) -> None:
    tokenizers, encoders = load_text_encoders(read_json(demo_project / "data/lock.json"))
    long_caption = " ".join(["red circle"] * 60)
    index, _ = encode_captions(
        [long_caption, "short"], tokenizers, encoders, tmp_path, 8, "fp32", 64, "t", PartialState()
    )
    truncated = dict(
        zip(index.column("caption").to_pylist(), index.column("truncated").to_pylist(), strict=True)
    )
    assert truncated == {long_caption: True, "short": False, "": False}


def test_rerun_encodes_only_new_keys_and_drops_stale_ones(demo_project: Path, tmp_path: Path) -> None:
    lock = read_json(demo_project / "data/lock.json")
    rows = pq.read_table(demo_project / "data/buckets/plan.parquet").to_pylist()
    vae, state = load_vae(lock), PartialState()

    def encode(subset: list[dict], identity: str = "v") -> tuple:
        return encode_latents(subset, vae, demo_project, tmp_path, 2, "fp32", 1, identity, state)

    first, report = encode(rows[:10])
    assert report == {"encoded": 10, "reused": 0, "removed": 0}
    before = LatentCache(tmp_path, first).posterior(rows[3]["variant_id"])
    index, report = encode(rows[2:12])  # two images gone, two new
    assert report == {"encoded": 2, "reused": 8, "removed": 2}
    assert index.column("variant_id").to_pylist() == sorted(r["variant_id"] for r in rows[2:12])
    after = LatentCache(tmp_path, index).posterior(rows[3]["variant_id"])
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    moved = {**rows[3], "crop_top": rows[3]["crop_top"] + 1}  # a new crop is a new key
    assert encode([rows[2], moved, *rows[4:12]])[1] == {"encoded": 1, "reused": 9, "removed": 1}
    assert encode(rows[2:12], identity="another VAE")[1] == {"encoded": 10, "reused": 0, "removed": 10}
    assert not list(tmp_path.parent.glob(f".{tmp_path.name}-*"))  # no staging or part folders left


def test_recaptioning_encodes_only_the_new_caption(demo_project: Path, tmp_path: Path) -> None:
    tokenizers, encoders = load_text_encoders(read_json(demo_project / "data/lock.json"))

    def encode(captions: list[str]) -> dict:
        return encode_captions(captions, tokenizers, encoders, tmp_path, 4, "fp32", 64, "t", PartialState())[
            1
        ]

    assert encode(["a red dog", "a blue cat"]) == {"encoded": 3, "reused": 0, "removed": 0}  # + empty caption
    assert encode(["a red dog", "a green cat"]) == {"encoded": 1, "reused": 2, "removed": 1}
