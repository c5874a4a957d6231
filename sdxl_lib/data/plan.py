"""The bucket stage's work: every image becomes a planned sample or a skipped row with a reason."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pyarrow as pa
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from sdxl_lib.config import BucketParams
from sdxl_lib.data.buckets import is_too_small, plan_crop
from sdxl_lib.data.images import IMAGE_EXTENSIONS, caption_from_filename

PLAN_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("dataset_id", pa.string()),
        ("path", pa.string()),
        ("caption", pa.string()),
        ("split", pa.string()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("intermediate_width", pa.int32()),
        ("intermediate_height", pa.int32()),
        ("crop_left", pa.int32()),
        ("crop_top", pa.int32()),
        ("target_width", pa.int32()),
        ("target_height", pa.int32()),
        ("aspect", pa.float32()),
    ]
)
SKIPPED_SCHEMA = pa.schema([("path", pa.string()), ("reason", pa.string())])
EXIF_ORIENTATION = 274
SIDEWAYS = {5, 6, 7, 8}  # orientations that swap width and height


def upright_size(path: Path) -> tuple[int, int]:
    """(width, height) after EXIF transpose, read from the header without decoding pixels."""
    with Image.open(path) as image:
        width, height = image.size
        if image.getexif().get(EXIF_ORIENTATION) in SIDEWAYS:
            return height, width
        return width, height


def caption_for(path: Path, params: BucketParams) -> tuple[str, str]:
    """(caption, where it came from). `textfile` falls back to the file name when no sidecar exists."""
    if params.caption_strategy == "instanceprompt":
        return str(params.instance_prompt), "instance_prompt"
    sidecar = path.with_suffix(".txt")
    if params.caption_strategy == "textfile" and sidecar.is_file():
        text = sidecar.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            return text, "textfile"
    return caption_from_filename(path), "filename"


def is_eval(sample_id: str, fraction: float) -> bool:
    """Stable split: a sample's side depends only on its content hash, not on the rest of the data."""
    return int(sample_id[:8], 16) / 2**32 < fraction


def build_plan(
    datasets: list[tuple[str, Path]], params: BucketParams, root: Path
) -> tuple[pa.Table, pa.Table, dict]:
    """Plan every image in the given (dataset id, folder) pairs.

    Returns the plan table, the skipped table and a summary of counts. Paths are stored relative
    to `root` (the project) so a plan is the same on every machine.
    """
    rows: list[dict] = []
    skipped: list[dict] = []
    seen: dict[str, str] = {}
    sources: Counter[str] = Counter()
    files = [(d, p) for d, folder in datasets for p in sorted(folder.rglob("*")) if p.is_file()]
    for dataset_id, path in tqdm(files, desc="bucket", unit="file"):
        relative = path.relative_to(root).as_posix()
        suffix = path.suffix.lower()
        if suffix == ".txt":
            continue  # caption sidecars are read with their image
        if suffix not in IMAGE_EXTENSIONS:
            skipped.append({"path": relative, "reason": f"unsupported_extension {suffix or '(none)'}"})
            continue
        try:
            width, height = upright_size(path)
        except (UnidentifiedImageError, OSError) as err:
            skipped.append({"path": relative, "reason": f"unreadable: {err}"})
            continue
        sample_id = hashlib.sha256(path.read_bytes()).hexdigest()[:32]
        if sample_id in seen:
            skipped.append({"path": relative, "reason": f"duplicate of {seen[sample_id]}"})
            continue
        seen[sample_id] = relative
        if is_too_small(width, height, params):
            skipped.append({"path": relative, "reason": "too_small"})
            continue
        caption, source = caption_for(path, params)
        sources[source] += 1
        crop = plan_crop(width, height, params, sample_id)
        rows.append(
            {
                "sample_id": sample_id,
                "dataset_id": dataset_id,
                "path": relative,
                "caption": caption,
                "split": "eval" if is_eval(sample_id, params.eval_fraction) else "train",
                "original_width": width,
                "original_height": height,
                "intermediate_width": crop.intermediate_width,
                "intermediate_height": crop.intermediate_height,
                "crop_left": crop.crop_left,
                "crop_top": crop.crop_top,
                "target_width": crop.target_width,
                "target_height": crop.target_height,
                "aspect": crop.aspect,
            }
        )
    if params.eval_fraction > 0 and len(rows) > 1 and all(r["split"] == "train" for r in rows):
        min(rows, key=lambda r: r["sample_id"])["split"] = "eval"  # keep at least one held out
    buckets = Counter(f"{r['target_width']}x{r['target_height']}" for r in rows)
    summary = {
        "kept": len(rows),
        "train": sum(r["split"] == "train" for r in rows),
        "eval": sum(r["split"] == "eval" for r in rows),
        "skipped": dict(Counter(s["reason"].split(" ")[0].rstrip(":") for s in skipped)),
        "caption_sources": dict(sources),
        "buckets": dict(sorted(buckets.items())),
    }
    plan = pa.Table.from_pylist(rows, schema=PLAN_SCHEMA)
    return plan, pa.Table.from_pylist(skipped, schema=SKIPPED_SCHEMA), summary
