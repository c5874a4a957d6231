"""Artifact locations, relative to the project root; `dvc.yaml` names the same paths."""

from pathlib import Path

RAW = Path("data/raw")
LOCK = Path("data/lock.json")
BUCKETS = Path("data/buckets")
PLAN = BUCKETS / "plan.parquet"
SKIPPED = BUCKETS / "skipped.parquet"
BUCKET_SUMMARY = BUCKETS / "summary.json"
BUCKET_METRICS = Path("metrics/bucket")
BUCKET_HISTOGRAM = BUCKET_METRICS / "buckets.json"
CONTACT_SHEET = BUCKET_METRICS / "contact_sheet.png"
LATENTS = Path("data/latents")
TEXT = Path("data/text")
ENCODE_METRICS = Path("metrics/encode")  # what each encoding run encoded, reused and removed
LORA = Path("models/lora")
CHECKPOINTS = Path("models/checkpoints")
TRAIN_METRICS = Path("metrics/train")
VALIDATION_IMAGES = TRAIN_METRICS / "validation"
EVAL_METRICS = Path("metrics/evaluate")
TRACKER_LOGS = Path("logs")  # train.report_to: tensorboard / wandb files, not versioned
