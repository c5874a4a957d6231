"""Known-answer and property tests for buckets and crops (SimpleTuner's rules), and the bucket
stage's bookkeeping: every file planned or skipped with a reason."""

from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from sdxl_lib.config import BucketParams, DatasetSettings
from sdxl_lib.data.buckets import (
    bucket_size,
    choose_aspect,
    downsampled_size,
    flipped,
    is_too_small,
    plan_crop,
)
from sdxl_lib.data.images import caption_from_filename, open_rgb, resize_and_crop
from sdxl_lib.data.plan import build_plan
from sdxl_lib.errors import UserError


@pytest.mark.parametrize(
    ("aspect", "params", "size"),
    [
        (1.46, {"resolution": 1.0, "resolution_type": "area"}, (1216, 832)),
        (1.0, {"resolution": 1.0, "resolution_type": "area"}, (1024, 1024)),
        (1.0, {"resolution": 1024, "resolution_type": "pixel_area"}, (1024, 1024)),
        (0.75, {"resolution": 1024, "resolution_type": "pixel_area"}, (896, 1152)),
        (1.5, {"resolution": 1024, "resolution_type": "pixel"}, (1536, 1024)),
        (0.67, {"resolution": 512, "resolution_type": "pixel"}, (512, 768)),
        (100.0, {"resolution": 0.05, "resolution_type": "area"}, (1920, 64)),  # H 19 -> 64 floor
    ],
)
def test_bucket_sizes(aspect: float, params: dict, size: tuple[int, int]) -> None:
    assert bucket_size(aspect, DatasetSettings(**params)) == size


def crop(width: int, height: int, key: str = "x", **settings: object):
    return plan_crop(width, height, DatasetSettings(**settings), seed=0, rng_key=key)


def test_center_crop_of_landscape() -> None:
    plan = crop(384, 256, resolution=256)
    # aspect 1.5 at 256² area -> 320x192; cover: scale 0.833 -> 320x213; centre crop 21 rows
    assert (plan.target_width, plan.target_height) == (320, 192)
    assert (plan.intermediate_width, plan.intermediate_height) == (320, 213)
    assert (plan.crop_left, plan.crop_top) == (0, 10)


def test_square_corner_and_random_crops() -> None:
    plan = crop(512, 256, resolution=256, crop_aspect="square", crop_style="corner")
    assert (plan.target_width, plan.target_height, plan.intermediate_width) == (256, 256, 512)
    assert (plan.crop_left, plan.crop_top) == (256, 0)  # bottom-right corner
    offsets = {
        crop(512, 256, k, resolution=256, crop_aspect="square", crop_style="random").crop_left
        for k in "abcdefghij"
    }
    assert len(offsets) > 1 and all(0 <= o <= 256 for o in offsets)


def test_crop_false_keeps_aspect_and_crops_only_the_remainder() -> None:
    plan = crop(512, 256, resolution=256, crop=False, crop_aspect="square")
    assert plan.aspect == 2.0 and plan.intermediate_width - plan.target_width <= 64


def test_closest_and_random_crop_aspects() -> None:
    choices = {"crop_aspect_buckets": [0.75, 1.0, {"aspect": 1.5, "weight": 3.0}]}
    closest = DatasetSettings(crop_aspect="closest", **choices)
    assert choose_aspect(1600, 1000, closest, random.Random(0)) == 1.5
    assert choose_aspect(900, 1000, closest, random.Random(0)) == 1.0
    assert choose_aspect(700, 1000, closest, random.Random(0)) == 0.75
    rand = DatasetSettings(crop_aspect="random", **choices)
    drawn = Counter(choose_aspect(1000, 1000, rand, random.Random(i)) for i in range(2000))
    assert set(drawn) == {0.75, 1.0, 1.5} and 2.4 < drawn[1.5] / drawn[1.0] < 3.6  # weights respected


def test_downsampling_before_crop_keeps_more_of_the_scene() -> None:
    settings = {"resolution": 1024, "resolution_type": "pixel_area", "crop_aspect": "square"}
    shrink = {"maximum_image_size": 1536, "target_downsample_size": 1280}
    assert downsampled_size(4000, 4000, DatasetSettings(**settings, **shrink)) == (1280, 1280)
    assert downsampled_size(1200, 1200, DatasetSettings(**settings, **shrink)) is None
    plan = crop(4000, 4000, **settings, **shrink)
    assert (plan.intermediate_width, plan.target_width) == (1280, 1024)  # crop taken from 1280²
    assert crop(4000, 4000, **settings).intermediate_width == 1024  # otherwise resized to cover


def test_size_limits_use_the_resolution_unit() -> None:
    area = DatasetSettings(resolution=1.0, resolution_type="area", minimum_image_size=512)
    assert is_too_small(500, 500, area) and not is_too_small(512, 512, area)
    assert is_too_small(700, 300, DatasetSettings(resolution_type="pixel", minimum_image_size=512))
    assert not is_too_small(10, 10, DatasetSettings())  # no minimum: upscale instead
    assert crop(100, 80, resolution=256).intermediate_width >= 256


def test_flipped_variant_is_the_mirror_image_of_the_crop(tmp_path: Path) -> None:
    image = Image.effect_noise((300, 200), 64).convert("RGB")
    image.save(tmp_path / "noise.png")
    plan = crop(300, 200, resolution=128, crop_style="random", crop_aspect="square")
    mirror = flipped(plan)
    assert mirror.crop_left == plan.intermediate_width - plan.crop_left - plan.target_width

    def planned(p) -> Image.Image:
        return resize_and_crop(
            open_rgb(tmp_path / "noise.png"),
            (p.intermediate_width, p.intermediate_height),
            p.crop_left,
            p.crop_top,
            (p.target_width, p.target_height),
            flip=p.flip,
        )

    assert planned(mirror).tobytes() == planned(plan).transpose(Image.Transpose.FLIP_LEFT_RIGHT).tobytes()


def test_recorded_crop_is_the_crop_used(tmp_path: Path) -> None:
    image = Image.effect_noise((300, 200), 64).convert("RGB")
    image.save(tmp_path / "noise.png")
    plan = crop(300, 200, resolution=128, crop_style="random")
    cropped = resize_and_crop(
        open_rgb(tmp_path / "noise.png"),
        (plan.intermediate_width, plan.intermediate_height),
        plan.crop_left,
        plan.crop_top,
        (plan.target_width, plan.target_height),
    )
    by_hand = image.resize((plan.intermediate_width, plan.intermediate_height), Image.Resampling.LANCZOS)
    box = (
        plan.crop_left,
        plan.crop_top,
        plan.crop_left + plan.target_width,
        plan.crop_top + plan.target_height,
    )
    assert cropped.tobytes() == by_hand.crop(box).tobytes()


dimension = st.integers(min_value=16, max_value=8000)
any_settings = st.fixed_dictionaries(
    {
        "resolution_type": st.sampled_from(["pixel", "area", "pixel_area"]),
        "crop": st.booleans(),
        "crop_aspect": st.sampled_from(["square", "preserve", "closest", "random"]),
        "crop_style": st.sampled_from(["random", "center", "corner"]),
        "downsample": st.booleans(),
        "edge": st.sampled_from([256, 512, 768, 1024, 1536]),
    }
)


@settings(max_examples=400, deadline=None)
@given(width=dimension, height=dimension, choice=any_settings, key=st.text(max_size=8))
def test_crop_properties(width: int, height: int, choice: dict, key: str) -> None:
    edge = choice["edge"]
    resolution = edge if choice["resolution_type"] != "area" else edge**2 / 1e6
    extra = (
        {"maximum_image_size": edge * 1.5, "target_downsample_size": edge * 1.25}
        if choice["downsample"]
        else {}
    )
    if choice["resolution_type"] == "area" and extra:
        extra = {k: v**2 / 1e6 for k, v in extra.items()}
    s = DatasetSettings(
        resolution=resolution,
        resolution_type=choice["resolution_type"],
        crop=choice["crop"],
        crop_aspect=choice["crop_aspect"],
        crop_style=choice["crop_style"],
        crop_aspect_buckets=[0.5, 0.75, 1.0, 1.33, 2.0],
        **extra,
    )
    for plan in (p := plan_crop(width, height, s, 1, key), flipped(p)):
        # the crop lies inside the intermediate image, which keeps the source aspect
        assert 0 <= plan.crop_left <= plan.intermediate_width - plan.target_width
        assert 0 <= plan.crop_top <= plan.intermediate_height - plan.target_height
        assert (
            abs(plan.intermediate_width / plan.intermediate_height - width / height)
            <= (width / height) * (1 / plan.intermediate_height + 1 / plan.intermediate_width) + 1e-9
        )
        assert plan.target_width % 64 == 0 and plan.target_height % 64 == 0
    if choice["resolution_type"] != "pixel" and 0.25 <= p.aspect <= 4:
        # area within what rounding each side of (edge·sqrt(ar), edge/sqrt(ar)) to 64 can change
        edge = bucket_size(1.0, s)[0]
        w0, h0 = edge * math.sqrt(p.aspect), edge / math.sqrt(p.aspect)
        ratio = p.target_width * p.target_height / edge**2
        assert (1 - 32 / w0) * (1 - 32 / h0) - 1e-9 <= ratio <= (1 + 32 / w0) * (1 + 32 / h0) + 1e-9
    if 0.25 <= p.aspect <= 4:  # aspect error bounded by the rounding of each side to 64
        bound = p.aspect * (32 / p.target_width + 32 / p.target_height) / (1 - 32 / p.target_height)
        assert abs(p.target_width / p.target_height - p.aspect) <= bound + 1e-9
    if not choice["crop"] or choice["crop_aspect"] == "preserve":
        assert p.aspect == max(0.01, round(width / height, 2))


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation(tmp_path: Path, orientation: int, suffix: str) -> None:
    image = Image.new("RGB", (400, 200), "red")
    exif = image.getexif()
    exif[274] = orientation
    image.save(tmp_path / f"photo{suffix}", exif=exif)
    plan, _, _ = build_plan([("d", tmp_path)], BucketParams(resolution=128, eval_fraction=0), tmp_path, 1)
    row = plan.to_pylist()[0]
    upright = (200, 400) if orientation >= 5 else (400, 200)  # 5-8 rotate by 90 degrees
    assert (
        (row["original_width"], row["original_height"])
        == upright
        == open_rgb(tmp_path / f"photo{suffix}").size
    )
    # a portrait photo stored landscape lands in a portrait bucket
    assert (row["target_width"] < row["target_height"]) == (orientation >= 5)


def test_every_file_is_planned_or_skipped_with_a_reason(tmp_path: Path) -> None:
    Image.new("RGB", (256, 256), "blue").save(tmp_path / "a_blue_square.png")
    (tmp_path / "a_blue_square.txt").write_text("a sidecar caption\nsecond line ignored\n")
    Image.new("RGB", (256, 256), "blue").save(tmp_path / "copy.png")  # same bytes
    Image.new("RGB", (300, 200), "green").save(tmp_path / "012_green_field.png")
    Image.new("RGB", (32, 32), "red").save(tmp_path / "tiny.png")
    Image.new("RGB", (1000, 100), "red").save(tmp_path / "banner.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "notes.doc").write_bytes(b"x")
    params = BucketParams(resolution=128, minimum_image_size=64, maximum_aspect_ratio=4.0, eval_fraction=0.0)
    plan, skipped, summary = build_plan([("d", tmp_path)], params, tmp_path, 1)
    captions = dict(zip(plan.column("path").to_pylist(), plan.column("caption").to_pylist(), strict=True))
    assert captions == {"012_green_field.png": "green field", "a_blue_square.png": "a sidecar caption"}
    reasons = dict(zip(skipped.column("path").to_pylist(), skipped.column("reason").to_pylist(), strict=True))
    assert reasons == {
        "copy.png": "duplicate of a_blue_square.png",
        "tiny.png": "too_small",
        "banner.png": "aspect_out_of_range",
        "broken.jpg": reasons["broken.jpg"],
        "notes.doc": "unsupported_extension .doc",
    }
    assert reasons["broken.jpg"].startswith("unreadable")
    assert summary["kept"] == 2 and sum(summary["skipped"].values()) == 5


def test_caption_strategies(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    Image.new("RGB", (128, 128), "blue").save(folder / "007_blue_thing.png")
    Image.new("RGB", (128, 128), "red").save(folder / "red.png")
    (folder / "red.txt").write_text("a red sidecar")
    pq.write_table(
        pa.table(
            {
                "filename": ["007_blue_thing.png", "red.png"],
                "caption": ["from table", "red row"],
                "width": [128, 128],
                "height": [128, 128],
            }
        ),
        folder / "metadata.parquet",
    )

    def captions(**settings: object) -> dict[str, str]:
        plan, skipped, _ = build_plan(
            [("d", folder)], BucketParams(resolution=128, eval_fraction=0, **settings), tmp_path, 1
        )
        # the metadata table is read with the images under `parquet`, an unused file otherwise
        reported = [] if settings["caption_strategy"] == "parquet" else ["d/metadata.parquet"]
        assert skipped.column("path").to_pylist() == reported
        return dict(zip(plan.column("path").to_pylist(), plan.column("caption").to_pylist(), strict=True))

    assert captions(caption_strategy="filename") == {"d/007_blue_thing.png": "blue thing", "d/red.png": "red"}
    assert captions(caption_strategy="textfile") == {
        "d/007_blue_thing.png": "blue thing",
        "d/red.png": "a red sidecar",
    }
    assert set(captions(caption_strategy="instanceprompt", instance_prompt="sks").values()) == {"sks"}
    assert captions(caption_strategy="parquet", parquet={}) == {
        "d/007_blue_thing.png": "from table",
        "d/red.png": "red row",
    }


def squares(folder: Path, count: int, size: tuple[int, int] = (128, 128)) -> None:
    """`count` distinct plain images (distinct across folders too, so none is a duplicate)."""
    folder.mkdir(parents=True, exist_ok=True)
    shade = sum(folder.name.encode()) % 200
    for i in range(count):
        Image.new("RGB", size, (i * 7 % 256, i, shade)).save(folder / f"img_{size[0]}_{i}.png")


def test_flip_repeats_probability_disabled_and_eval_datasets(tmp_path: Path) -> None:
    squares(tmp_path / "main", 4)
    squares(tmp_path / "held", 2)
    squares(tmp_path / "off", 2)
    params = BucketParams(
        resolution=128,
        eval_fraction=0,
        random_flip=True,
        repeats=2,
        probability=0.5,
        datasets={"held": {"dataset_type": "eval"}, "off": {"disabled": True}},
    )
    folders = [("main", tmp_path / "main"), ("held", tmp_path / "held"), ("off", tmp_path / "off")]
    plan, skipped, summary = build_plan(folders, params, tmp_path, 1)
    rows = plan.to_pylist()
    assert Counter((r["dataset_id"], r["split"], r["flip"]) for r in rows) == {
        ("main", "train", False): 4,
        ("main", "train", True): 4,
        ("held", "eval", False): 2,
    }
    assert all(r["repeats"] == 2 and r["probability"] == 0.5 for r in rows)
    assert skipped.column("reason").to_pylist() == ["dataset_disabled"] * 2
    assert summary["flipped_variants"] == 4


@pytest.mark.parametrize("policy", ["merge", "oversubscribe", "drop"])
def test_bucket_pruning(tmp_path: Path, policy: str) -> None:
    squares(tmp_path, 6, (128, 128))
    squares(tmp_path, 1, (256, 128))  # alone in a 2:1 bucket
    params = BucketParams(resolution=128, eval_fraction=0, bucket_pruning=policy)
    plan, skipped, summary = build_plan([("d", tmp_path)], params, tmp_path, 4)
    wide = [r for r in plan.to_pylist() if r["path"].startswith("img_256")]
    assert summary["pruning"] == {"policy": policy, "buckets": 1, "images": 1, "kept_small": 0}
    if policy == "merge":
        assert (wide[0]["target_width"], wide[0]["target_height"]) == (
            128,
            128,
        )  # cropped to the square bucket
    elif policy == "oversubscribe":
        assert wide[0]["repeats"] == 3  # seen 4 times an epoch: one full batch
    else:
        assert not wide and skipped.column("reason").to_pylist() == ["bucket_too_small"]


def test_empty_result_says_which_setting_dropped_what(tmp_path: Path) -> None:
    squares(tmp_path, 3, (64, 64))
    squares(tmp_path, 1, (900, 100))
    params = BucketParams(resolution=128, minimum_image_size=100, maximum_aspect_ratio=3)
    with pytest.raises(UserError) as caught:
        build_plan([("d", tmp_path)], params, tmp_path, 1)
    assert str(caught.value) == (
        "no images left to train on out of 4 files: 3 too_small (minimum_image_size); "
        "1 aspect_out_of_range (minimum_aspect_ratio / maximum_aspect_ratio)"
    )


def test_split_is_stable_and_keeps_one_eval_sample(tmp_path: Path) -> None:
    squares(tmp_path, 6)
    params = BucketParams(resolution=128, eval_fraction=0.01)
    first, _, summary = build_plan([("d", tmp_path)], params, tmp_path, 1)
    second, _, _ = build_plan([("d", tmp_path)], params, tmp_path, 1, workers=1)
    assert summary["eval"] >= 1 and first.equals(second)


def test_parallel_scan_equals_sequential(tmp_path: Path) -> None:
    for i in range(80):
        Image.new("RGB", (100 + i, 160), (i, 0, 0)).save(tmp_path / f"i{i}.png")
    params = BucketParams(resolution=128, crop_style="random")
    parallel, _, _ = build_plan([("d", tmp_path)], params, tmp_path, 1, workers=2)
    sequential, _, _ = build_plan([("d", tmp_path)], params, tmp_path, 1, workers=1)
    assert parallel.equals(sequential)


def test_caption_from_filename() -> None:
    assert caption_from_filename(Path("007_a_red_dog.png")) == "a red dog"
    assert caption_from_filename(Path("a   cat 12.jpg")) == "a cat"


def test_eval_split_is_seeded_and_stable_under_growth(tmp_path: Path) -> None:
    squares(tmp_path / "a", 40)
    params = BucketParams(resolution=128, eval_fraction=0.3)

    def held_out(seed: int) -> set[str]:
        plan, _, _ = build_plan(
            [("a", tmp_path / "a")], params.model_copy(update={"seed": seed}), tmp_path, 1
        )
        return {r["sample_id"] for r in plan.to_pylist() if r["split"] == "eval"}

    first = held_out(1)
    assert first != held_out(2)
    squares(tmp_path / "a" / "more", 10)  # new images never move the old ones across the split
    assert held_out(1) & first == first
