"""The bucket stage's work: every image becomes planned samples or a skipped row with a reason."""

from __future__ import annotations

import hashlib
import io
import math
import os
import warnings
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import fields
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from sdxl_lib.config import BucketParams, DatasetSettings
from sdxl_lib.data.buckets import CropPlan, aspect_out_of_range, flipped, is_too_small, plan_crop
from sdxl_lib.data.images import IMAGE_EXTENSIONS, caption_from_filename
from sdxl_lib.errors import UserError

PLAN_SCHEMA = pa.schema(
    [
        ("variant_id", pa.string()),
        ("sample_id", pa.string()),
        ("dataset_id", pa.string()),
        ("path", pa.string()),
        ("caption", pa.string()),
        ("caption_source", pa.string()),
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
        ("flip", pa.bool_()),
        ("repeats", pa.int32()),
        ("probability", pa.float32()),
    ]
)
SKIPPED_SCHEMA = pa.schema([("path", pa.string()), ("reason", pa.string())])
EXIF_ORIENTATION = 274
MIN_SIDE = 16  # pixels; smaller is under two latent pixels: nothing to learn from at any resolution
SIDEWAYS = {5, 6, 7, 8}  # orientations that swap width and height
# Which setting to change for each skip reason, for the "nothing left to train on" message.
REASON_SETTINGS = {
    "too_small": "minimum_image_size",
    "aspect_out_of_range": "minimum_aspect_ratio / maximum_aspect_ratio",
    "dataset_disabled": "disabled",
    "bucket_too_small": "bucket_pruning (or train.train_batch_size)",
    "missing_from_metadata": "the parquet metadata table",
}


def upright_size(image: Image.Image, data: bytes) -> tuple[int, int]:
    """(width, height) after EXIF transpose, from the header without decoding pixels.

    Pillow looks for a PNG's EXIF by decoding the whole image (the chunk may follow the pixels),
    so a PNG whose bytes hold no eXIf chunk at all is known to be upright without asking it.
    """
    width, height = image.size
    if image.format == "PNG" and b"eXIf" not in data:
        return width, height
    if image.getexif().get(EXIF_ORIENTATION) in SIDEWAYS:
        return height, width
    return width, height


def verify_pixels(image: Image.Image, data: bytes) -> None:
    """Raise if the pixel data of the just-opened `image` (whose bytes are `data`) is truncated or
    corrupt, at a cost fit for every file of a dataset: a JPEG is decoded at 1/8 scale (libjpeg still
    reads every byte of it), a PNG checked by its chunk checksums, a WebP was checked by its decoder
    when opened; anything else (GIF, BMP, TIFF) is decoded whole."""
    if image.format == "PNG":
        with Image.open(io.BytesIO(data)) as fresh:  # verify() must come straight after opening
            fresh.verify()
    elif image.format == "JPEG":
        image.draft(image.mode, (image.width // 8, image.height // 8))
        image.load()
    elif image.format != "WEBP":
        image.load()


def scan_file(job: tuple[Path, bool]) -> tuple[str, tuple[int, int] | None, str | None]:
    """(content hash, upright size or None, skip reason or None) for one file; runs in worker processes."""
    path, read_size = job
    try:
        data = path.read_bytes()
        sample_id = hashlib.sha256(data).hexdigest()[:32]
        if not read_size:
            return sample_id, None, None
        with warnings.catch_warnings():
            # between Pillow's warning and error sizes lie real photos (90-180 MP): those are kept
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                size = upright_size(image, data)
                verify_pixels(image, data)
        return sample_id, size, None
    except Image.DecompressionBombError:
        return "", None, f"decompression_bomb: over {2 * Image.MAX_IMAGE_PIXELS} pixels"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        return "", None, f"unreadable: {err}"


def scan_files(paths: list[Path], read_size: list[bool], workers: int) -> list[tuple]:
    """Hash, measure and check files on all cores (pixels are decoded only as far as the check needs)."""
    jobs = list(zip(paths, read_size, strict=True))
    progress = tqdm(total=len(jobs), desc="bucket: scan", unit="file")
    if workers <= 1 or len(jobs) < 64:
        results = []
        for job in jobs:
            results.append(scan_file(job))
            progress.update()
    else:
        with ProcessPoolExecutor(workers) as pool:
            results = []
            for result in pool.map(scan_file, jobs, chunksize=64):
                results.append(result)
                progress.update()
    progress.close()
    return results


def read_caption(path: Path, settings: DatasetSettings) -> tuple[str, str]:
    """(caption, where it came from). `textfile` reads the first non-empty line of the .txt sidecar
    and falls back to the file name when the sidecar is missing, empty, or not UTF-8 text; the
    source says which, so the bucket summary counts each case."""
    if settings.caption_strategy == "instanceprompt":
        return str(settings.instance_prompt), "instance_prompt"
    if settings.caption_strategy == "filename":
        return caption_from_filename(path), "filename"
    sidecar = path.with_suffix(".txt")
    if not sidecar.is_file():
        return caption_from_filename(path), "filename_no_sidecar"
    try:
        text: str | None = sidecar.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:  # NUL decodes as UTF-8, but no caption holds one
        return caption_from_filename(path), "filename_sidecar_not_utf8"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if not first:
        return caption_from_filename(path), "filename_sidecar_empty"
    return first, "textfile"


def read_metadata_table(folder: Path, settings: DatasetSettings) -> dict[str, tuple[str, int, int]]:
    """filename -> (caption, width, height) from the dataset's parquet metadata."""
    meta = settings.parquet
    assert meta is not None
    path = folder / meta.path
    if not path.is_file():
        raise UserError(f"{path}: missing; caption_strategy 'parquet' reads it (bucket parquet.path)")
    columns = [meta.filename_column, meta.caption_column, meta.width_column, meta.height_column]
    table = pq.read_table(path)
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise UserError(f"{path}: no column {', '.join(missing)} (has {', '.join(table.column_names)})")
    rows = zip(*(table.column(c).to_pylist() for c in columns), strict=True)
    return {str(name): (str(caption), int(w), int(h)) for name, caption, w, h in rows}


def is_eval(sample_id: str, fraction: float, seed: int) -> bool:
    """Seeded, stable split: a sample's side depends on (seed, its content hash) only, so adding
    images never moves existing ones between train and eval."""
    digest = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


def _row(base: dict, crop: CropPlan) -> dict:
    plan = {f.name: getattr(crop, f.name) for f in fields(crop)}
    suffix = "-flip" if crop.flip else ""
    return {**base, **plan, "variant_id": base["sample_id"] + suffix}


def bucket_of(row: dict) -> tuple[int, int]:
    return row["target_width"], row["target_height"]


def prune_buckets(
    rows: list[dict],
    settings: dict[str, DatasetSettings],
    params: BucketParams,
    batch_size: int,
    skipped: list[dict],
) -> dict:
    """Handle train buckets holding fewer images than one batch, by `bucket_pruning`."""
    counts = Counter(bucket_of(r) for r in rows if r["split"] == "train")
    small = {b for b, n in counts.items() if n < batch_size}
    healthy = [b for b, n in counts.items() if n >= batch_size]
    affected = [r for r in rows if r["split"] == "train" and bucket_of(r) in small]
    report = {
        "policy": params.bucket_pruning,
        "buckets": len(small),
        "images": len(affected),
        "kept_small": 0,
    }
    for row in affected:
        if params.bucket_pruning == "drop":
            rows.remove(row)
            skipped.append({"path": row["path"], "reason": "bucket_too_small"})
        elif params.bucket_pruning == "oversubscribe":
            row["repeats"] = max(row["repeats"], math.ceil(batch_size / counts[bucket_of(row)]) - 1)
        else:  # merge into the nearest healthy bucket (by aspect) this image can be planned into
            own = math.log(row["target_width"] / row["target_height"])
            for width, height in sorted(healthy, key=lambda b: abs(math.log(b[0] / b[1]) - own)):
                crop = plan_crop(
                    row["original_width"],
                    row["original_height"],
                    settings[row["dataset_id"]],
                    params.seed,
                    row["sample_id"],
                    aspect=round(width / height, 2),
                )
                if (crop.target_width, crop.target_height) == (width, height):
                    row.update(_row(row, crop))
                    break
            else:
                report["kept_small"] += 1
    return report


def build_plan(
    datasets: list[tuple[str, Path]],
    params: BucketParams,
    root: Path,
    batch_size: int,
    workers: int | None = None,
    skipped_earlier: list[dict] | None = None,
) -> tuple[pa.Table, pa.Table, dict]:
    """Plan every image in the given (dataset id, folder) pairs.

    Returns the plan table, the skipped table (with `skipped_earlier`: the files `download` did not
    copy) and a summary of counts. Paths are stored relative to `root` (the project) so a plan is
    the same on every machine.
    """
    workers = workers or os.cpu_count() or 1
    settings = {dataset_id: params.for_dataset(dataset_id) for dataset_id, _ in datasets}
    skipped: list[dict] = list(skipped_earlier or [])
    candidates: list[tuple[str, Path, tuple[str, int, int] | None]] = []
    for dataset_id, folder in datasets:
        s = settings[dataset_id]
        metadata = read_metadata_table(folder, s) if s.caption_strategy == "parquet" else None
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            relative = path.relative_to(root).as_posix()
            suffix = path.suffix.lower()
            if suffix == ".txt" or (s.parquet and path == folder / s.parquet.path):
                continue  # captions and metadata are read with their images
            if s.disabled:
                skipped.append({"path": relative, "reason": "dataset_disabled"})
            elif suffix not in IMAGE_EXTENSIONS:
                skipped.append({"path": relative, "reason": f"unsupported_extension {suffix or '(none)'}"})
            elif metadata is not None and path.relative_to(folder).as_posix() not in metadata:
                skipped.append({"path": relative, "reason": "missing_from_metadata"})
            else:
                known = metadata[path.relative_to(folder).as_posix()] if metadata is not None else None
                candidates.append((dataset_id, path, known))

    files_seen = len(candidates) + len(skipped)
    scans = scan_files([p for _, p, _ in candidates], [k is None for _, _, k in candidates], workers)
    rows: list[dict] = []
    seen: dict[str, str] = {}
    sources: Counter[str] = Counter()
    for (dataset_id, path, known), (sample_id, size, error) in zip(candidates, scans, strict=True):
        relative, s = path.relative_to(root).as_posix(), settings[dataset_id]
        if error:
            skipped.append({"path": relative, "reason": error})
            continue
        if sample_id in seen:
            skipped.append({"path": relative, "reason": f"duplicate of {seen[sample_id]}"})
            continue
        seen[sample_id] = relative
        width, height = (known[1], known[2]) if known else size  # type: ignore[misc]
        if min(width, height) < MIN_SIDE:
            skipped.append({"path": relative, "reason": f"degenerate_size {width}x{height}"})
            continue
        if is_too_small(width, height, s):
            skipped.append({"path": relative, "reason": "too_small"})
            continue
        if aspect_out_of_range(width, height, s):
            skipped.append({"path": relative, "reason": "aspect_out_of_range"})
            continue
        caption, source = (known[0], "parquet") if known else read_caption(path, s)
        sources[source] += 1
        held_out = s.dataset_type == "eval" or is_eval(sample_id, s.eval_fraction, params.seed)
        base = {
            "sample_id": sample_id,
            "dataset_id": dataset_id,
            "path": relative,
            "caption": caption,
            "caption_source": source,
            "split": "eval" if held_out else "train",
            "original_width": width,
            "original_height": height,
            "repeats": s.repeats,
            "probability": s.probability,
        }
        rows.append(_row(base, plan_crop(width, height, s, params.seed, sample_id)))

    train_rows = [r for r in rows if r["split"] == "train"]
    wants_eval = any(s.eval_fraction > 0 for s in settings.values())
    if wants_eval and len(train_rows) > 1 and len(train_rows) == len(rows):
        min(train_rows, key=lambda r: r["sample_id"])["split"] = "eval"  # hold out at least one
    pruning = prune_buckets(rows, settings, params, batch_size, skipped)
    if not any(r["split"] == "train" for r in rows):
        raise UserError(no_training_data_message(files_seen, skipped, rows))
    rows += [
        _row(r, flipped(CropPlan(**{k: r[k] for k in CropPlan.__dataclass_fields__})))
        for r in rows
        if r["split"] == "train" and settings[r["dataset_id"]].random_flip
    ]
    rows.sort(key=lambda r: (r["dataset_id"], r["path"], r["flip"]))
    train_samples = sum(1 + r["repeats"] for r in rows if r["split"] == "train")
    if train_samples < batch_size:
        raise UserError(
            f"the datasets give {train_samples} training samples per epoch (images, flips and repeats), "
            f"fewer than one batch of train.train_batch_size {batch_size}: lower train_batch_size, add "
            "images, or raise repeats"
        )

    samples = [r for r in rows if not r["flip"]]
    buckets: dict[str, Counter[str]] = defaultdict(Counter)
    for r in samples:
        buckets[f"{r['target_width']}x{r['target_height']}"][r["split"]] += 1
    summary = {
        "kept": len(samples),
        "train": sum(r["split"] == "train" for r in samples),
        "eval": sum(r["split"] == "eval" for r in samples),
        "flipped_variants": len(rows) - len(samples),
        "skipped": dict(Counter(s["reason"].split(" ")[0].rstrip(":") for s in skipped)),
        "caption_sources": dict(sources),
        "buckets": {name: dict(c) for name, c in sorted(buckets.items())},
        "pruning": pruning,
    }
    plan = pa.Table.from_pylist(rows, schema=PLAN_SCHEMA)
    return plan, pa.Table.from_pylist(skipped, schema=SKIPPED_SCHEMA), summary


def no_training_data_message(files: int, skipped: list[dict], rows: list[dict]) -> str:
    """Say exactly which settings removed how many images, never just "no images"."""
    reasons = Counter(s["reason"].split(" ")[0].rstrip(":") for s in skipped)
    parts = [
        f"{n} {reason} ({REASON_SETTINGS[reason]})" if reason in REASON_SETTINGS else f"{n} {reason}"
        for reason, n in reasons.most_common()
    ]
    held_out = sum(r["split"] == "eval" for r in rows)
    if held_out:
        parts.append(f"{held_out} held out for eval (eval_fraction / dataset_type)")
    detail = "; ".join(parts) or "the dataset folders are empty"
    return f"no images left to train on out of {files} files: {detail}"
