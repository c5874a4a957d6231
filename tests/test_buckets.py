"""Known-answer bucket sizes and crops (SimpleTuner's rules) and the bucket stage's bookkeeping."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from sdxl_lib.config import BucketParams
from sdxl_lib.data.buckets import bucket_size, is_too_small, plan_crop
from sdxl_lib.data.images import caption_from_filename, open_rgb, resize_and_crop
from sdxl_lib.data.plan import build_plan


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
    assert bucket_size(aspect, BucketParams(**params)) == size


def test_center_crop_of_landscape() -> None:
    plan = plan_crop(384, 256, BucketParams(resolution=256), "x")
    # aspect 1.5 at 256² area -> 320x192; cover: scale 0.833 -> 320x213; centre crop 21 rows
    assert (plan.target_width, plan.target_height) == (320, 192)
    assert (plan.intermediate_width, plan.intermediate_height) == (320, 213)
    assert (plan.crop_left, plan.crop_top) == (0, 10)


def test_square_corner_and_random_crops() -> None:
    square = BucketParams(resolution=256, crop_aspect="square", crop_style="corner")
    plan = plan_crop(512, 256, square, "x")
    assert (plan.target_width, plan.target_height, plan.intermediate_width) == (256, 256, 512)
    assert (plan.crop_left, plan.crop_top) == (256, 0)  # bottom-right corner
    rand = BucketParams(resolution=256, crop_aspect="square", crop_style="random")
    offsets = {plan_crop(512, 256, rand, key).crop_left for key in "abcdefghij"}
    assert len(offsets) > 1 and all(0 <= o <= 256 for o in offsets)
    assert plan_crop(512, 256, rand, "a") == plan_crop(512, 256, rand, "a")


def test_crop_false_keeps_aspect_and_crops_only_the_remainder() -> None:
    plan = plan_crop(512, 256, BucketParams(resolution=256, crop=False, crop_aspect="square"), "x")
    assert plan.aspect == 2.0 and plan.intermediate_width - plan.target_width <= 64


def test_minimum_image_size_units() -> None:
    area = BucketParams(resolution=1.0, resolution_type="area", minimum_image_size=512)
    assert is_too_small(500, 500, area) and not is_too_small(512, 512, area)
    assert is_too_small(700, 300, BucketParams(resolution_type="pixel", minimum_image_size=512))
    assert not is_too_small(10, 10, BucketParams())  # no minimum: upscale instead


def test_recorded_crop_is_the_crop_used(tmp_path: Path) -> None:
    image = Image.effect_noise((300, 200), 64).convert("RGB")
    image.save(tmp_path / "noise.png")
    plan = plan_crop(300, 200, BucketParams(resolution=128, crop_style="random"), "k")
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


def test_exif_rotation_swaps_the_recorded_size(tmp_path: Path) -> None:
    image = Image.new("RGB", (400, 200), "red")
    exif = image.getexif()
    exif[274] = 6  # rotate 90° on display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    plan, _, _ = build_plan([("d", tmp_path)], BucketParams(resolution=128), tmp_path)
    row = plan.to_pylist()[0]
    assert (row["original_width"], row["original_height"]) == (200, 400)
    assert open_rgb(tmp_path / "rotated.jpg").size == (200, 400)


def test_every_file_is_planned_or_skipped_with_a_reason(tmp_path: Path) -> None:
    Image.new("RGB", (256, 256), "blue").save(tmp_path / "a_blue_square.png")
    (tmp_path / "a_blue_square.txt").write_text("a sidecar caption\n")
    Image.new("RGB", (256, 256), "blue").save(tmp_path / "copy.png")  # same bytes
    Image.new("RGB", (300, 200), "green").save(tmp_path / "012_green_field.png")
    Image.new("RGB", (32, 32), "red").save(tmp_path / "tiny.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "notes.doc").write_bytes(b"x")
    params = BucketParams(resolution=128, minimum_image_size=64, eval_fraction=0.0)
    plan, skipped, summary = build_plan([("d", tmp_path)], params, tmp_path)
    captions = dict(zip(plan.column("path").to_pylist(), plan.column("caption").to_pylist(), strict=True))
    assert captions == {"012_green_field.png": "green field", "a_blue_square.png": "a sidecar caption"}
    reasons = dict(zip(skipped.column("path").to_pylist(), skipped.column("reason").to_pylist(), strict=True))
    assert reasons["copy.png"] == "duplicate of a_blue_square.png"
    assert reasons["tiny.png"] == "too_small"
    assert reasons["broken.jpg"].startswith("unreadable")
    assert reasons["notes.doc"] == "unsupported_extension .doc"
    assert summary["kept"] == 2 and sum(summary["skipped"].values()) == 4


def test_split_is_stable_and_keeps_one_eval_sample(tmp_path: Path) -> None:
    for i in range(6):
        Image.new("RGB", (128, 128), (i * 40, 0, 0)).save(tmp_path / f"img_{i}.png")
    params = BucketParams(resolution=128, eval_fraction=0.01)
    first, _, summary = build_plan([("d", tmp_path)], params, tmp_path)
    second, _, _ = build_plan([("d", tmp_path)], params, tmp_path)
    assert summary["eval"] >= 1 and first.equals(second)


def test_caption_from_filename() -> None:
    assert caption_from_filename(Path("007_a_red_dog.png")) == "a red dog"
    assert caption_from_filename(Path("a   cat 12.jpg")) == "a cat"
