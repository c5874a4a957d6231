"""Load: thousands of images with a few percent bad ones through download, bucket and both encoders."""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
from conftest import new_project, run
from PIL import Image

IMAGES, BAD_EACH, DUPLICATES = 2000, 20, 20
WORDS = ["red", "green", "blue", "circle", "square", "field", "house", "tree"]


def soak_dataset(folder: Path) -> None:
    """IMAGES distinct images of varied sizes and formats, then BAD_EACH zero-byte files, truncated
    JPEGs and text files named .jpg each (3% bad), and DUPLICATES byte copies."""
    folder.mkdir()
    rng = random.Random(0)
    for i in range(IMAGES):
        size = (rng.randrange(80, 200), rng.randrange(80, 200))
        image = Image.new("RGB", size, (i % 256, i // 256 % 256, rng.randrange(256)))
        name = f"{i:05d}_{rng.choice(WORDS)}_{rng.choice(WORDS)}"  # captions repeat: few to encode
        image.save(folder / f"{name}.{rng.choice(['png', 'jpg'])}")
    for i in range(BAD_EACH):
        (folder / f"zero_{i}.jpg").write_bytes(b"")
        buffer = io.BytesIO()
        Image.new("RGB", (128, 128), (i, 0, 0)).save(buffer, "JPEG")
        (folder / f"truncated_{i}.jpg").write_bytes(buffer.getvalue()[:300])
        (folder / f"text_{i}.jpg").write_text("not an image")
    for path in sorted(folder.glob("0*"))[:DUPLICATES]:
        (folder / f"copy_of_{path.name}").write_bytes(path.read_bytes())


def test_soak_bucket_and_encode_thousands_of_images(tmp_path: Path) -> None:
    soak_dataset(tmp_path / "images")
    project = new_project(
        tmp_path / "project",
        {
            "download.datasets": [{"id": "soak", "source": str(tmp_path / "images")}],
            "bucket.resolution": 64,
            "bucket.minimum_image_size": None,
            "bucket.caption_strategy": "filename",
            "bucket.random_flip": False,
            "encode.vae_batch_size": 16,
            "encode.text_batch_size": 64,
        },
    )
    run(["dvc", "repro", "encode_latents", "encode_text"], project, timeout=600)

    summary = json.loads((project / "data/buckets/summary.json").read_text())
    files = IMAGES + 3 * BAD_EACH + DUPLICATES
    assert summary["kept"] + sum(summary["skipped"].values()) == files
    assert summary["kept"] == IMAGES and summary["train"] + summary["eval"] == IMAGES
    assert summary["skipped"] == {"unreadable": 3 * BAD_EACH, "duplicate": DUPLICATES}
    skipped = pq.read_table(project / "data/buckets/skipped.parquet").to_pylist()
    bad = Counter(
        Path(row["path"]).name.split("_")[0] for row in skipped if row["reason"].startswith("unreadable")
    )
    assert bad == {"zero": BAD_EACH, "truncated": BAD_EACH, "text": BAD_EACH}

    plan = pq.read_table(project / "data/buckets/plan.parquet")
    latents = pq.read_table(project / "data/latents/index.parquet")
    assert sorted(latents.column("variant_id").to_pylist()) == sorted(plan.column("variant_id").to_pylist())
    texts = pq.read_table(project / "data/text/index.parquet")
    assert set(texts.column("caption").to_pylist()) == set(plan.column("caption").to_pylist()) | {""}
