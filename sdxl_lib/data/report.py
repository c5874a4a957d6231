"""What the bucket stage shows people: a table, a histogram (as DVC plot data), a contact sheet."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from sdxl_lib.data.images import open_rgb

THUMB_HEIGHT = 128
LABEL_HEIGHT = 18


def bucket_table(summary: dict) -> str:
    """Images per bucket and skipped files per reason, as an aligned text table."""
    lines = [f"{'bucket':>10}  {'train':>6}  {'eval':>6}"]
    for name, counts in summary["buckets"].items():
        lines.append(f"{name:>10}  {counts.get('train', 0):>6}  {counts.get('eval', 0):>6}")
    lines.append(f"{'total':>10}  {summary['train']:>6}  {summary['eval']:>6}")
    for reason, count in sorted(summary["skipped"].items()):
        lines.append(f"skipped {reason}: {count}")
    pruning = summary["pruning"]
    if pruning["buckets"]:
        lines.append(
            f"bucket_pruning {pruning['policy']}: {pruning['images']} images in {pruning['buckets']} "
            f"buckets smaller than one batch ({pruning['kept_small']} left as they were)"
        )
    if summary["flipped_variants"]:
        lines.append(f"random_flip: {summary['flipped_variants']} mirrored variants planned")
    lines.append(summary_line(summary))
    return "\n".join(lines)


def summary_line(summary: dict) -> str:
    """One line a person reads first: kept and skipped by reason, and where the captions came from."""
    skipped = summary["skipped"]
    by_reason = ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items(), key=lambda kv: -kv[1]))
    reasons = f" ({by_reason})" if by_reason else ""
    captions = ", ".join(f"{source} {n}" for source, n in sorted(summary["caption_sources"].items()))
    return (
        f"bucket: {summary['kept']} images kept ({summary['train']} train, {summary['eval']} eval), "
        f"{sum(skipped.values())} skipped{reasons} -> data/buckets/skipped.parquet; "
        f"captions: {captions}"
    )


def histogram_rows(summary: dict) -> list[dict]:
    """One row per bucket for `dvc plots` (a horizontal bar chart of images per bucket)."""
    return [
        {"bucket": name, "images": counts.get("train", 0) + counts.get("eval", 0)}
        for name, counts in summary["buckets"].items()
    ]


def _thumbnail_with_crop(row: dict, root: Path) -> Image.Image:
    """The source image, small, with the planned crop outlined (in source coordinates)."""
    image = open_rgb(root / row["path"])
    scale_x = image.width / row["intermediate_width"]
    scale_y = image.height / row["intermediate_height"]
    box = (
        row["crop_left"] * scale_x,
        row["crop_top"] * scale_y,
        (row["crop_left"] + row["target_width"]) * scale_x,
        (row["crop_top"] + row["target_height"]) * scale_y,
    )
    thumb_scale = THUMB_HEIGHT / image.height
    thumb = image.resize((max(1, round(image.width * thumb_scale)), THUMB_HEIGHT))
    draw = ImageDraw.Draw(thumb)
    draw.rectangle([round(v * thumb_scale) for v in box], outline=(255, 0, 64), width=3)
    return thumb


def contact_sheet(rows: list[dict], root: Path, per_bucket: int = 4, max_buckets: int = 8) -> Image.Image:
    """A few samples of each bucket (largest buckets first), each crop drawn on its source image."""
    by_bucket: dict[str, list[dict]] = {}
    for row in sorted((r for r in rows if not r["flip"]), key=lambda r: r["sample_id"]):
        by_bucket.setdefault(f"{row['target_width']}x{row['target_height']}", []).append(row)
    chosen = sorted(by_bucket.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:max_buckets]
    strips = []
    for name, members in chosen:
        thumbs = [_thumbnail_with_crop(r, root) for r in members[:per_bucket]]
        width = sum(t.width for t in thumbs) + 4 * (len(thumbs) + 1)
        strip = Image.new("RGB", (max(width, 200), THUMB_HEIGHT + LABEL_HEIGHT + 4), "white")
        ImageDraw.Draw(strip).text((4, 2), f"{name}: {len(members)} images", fill="black")
        x = 4
        for thumb in thumbs:
            strip.paste(thumb, (x, LABEL_HEIGHT))
            x += thumb.width + 4
        strips.append(strip)
    sheet = Image.new("RGB", (max(s.width for s in strips), sum(s.height for s in strips)), "white")
    y = 0
    for strip in strips:
        sheet.paste(strip, (0, y))
        y += strip.height
    return sheet
