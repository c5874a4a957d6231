"""SimpleTuner's `config.json` and `multidatabackend.json` as our params: the same key names mean the
same things, so most keys copy over; the rest are translated, ignored with a reason, or refused."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdxl_lib.config import (
    DatasetSettings,
    EncodeParams,
    ModelParams,
    Params,
    ParquetMetadata,
    TrainParams,
    ValidationParams,
    parse_params,
)
from sdxl_lib.errors import UserError

FLAVOURS = {
    "base-1.0": "stabilityai/stable-diffusion-xl-base-1.0",
    "base-0.9": "stabilityai/stable-diffusion-xl-base-0.9",
}
# SimpleTuner's defaults (its option registry) where they differ from ours: they apply where the
# imported file is silent, so the run trains as it would have in SimpleTuner.
SIMPLETUNER_DEFAULTS: dict[str, Any] = {
    "train.lora_dropout": 0.1,
    "train.learning_rate": 4e-7,
    "train.lr_scheduler": "constant_with_warmup",
    "train.lr_power": 0.8,
    "train.train_batch_size": 4,
    "train.checkpoints_total_limit": 5,
    "train.gradient_checkpointing": True,
    "train.noise_offset": 0.1,
    "validation.validation_guidance": 7.5,
    "validation.validation_steps": 100,
    "bucket.crop": False,
}
# Where we keep our own value although SimpleTuner's default differs, and why.
OUR_CHOICES = {
    "train.seed": "42 (SimpleTuner draws a random seed; a DVC experiment must be reproducible)",
    "train.lora_format": "both (SimpleTuner writes diffusers only; the kohya file is extra)",
}
# Our keys keep SimpleTuner's names and meanings, so a key of theirs that is one of ours copies as it is.
SECTIONS = {
    "model": ModelParams,
    "validation": ValidationParams,
    "encode": EncodeParams,
    "train": TrainParams,
}
DATASET_KEYS = [k for k in DatasetSettings.model_fields if k not in ("dataset_type", "parquet")]
OPTIMIZERS = {
    "adamw_bf16": "adamw",
    "optimi-adamw": "adamw",
    "adamw": "adamw",
    "optimi-lion": "lion",
    "lion": "lion",
    "bnb-adamw8bit": "adamw8bit",
    "adamw8bit": "adamw8bit",
    "prodigy": "prodigy",
    "adafactor": "adafactor",
    "adamw_schedulefree": "adamw_schedulefree",
}
SAME_AS_OURS = "no setting needed: sdxl-lora always does this"
IGNORED = {
    "output_dir": "outputs go to the pipeline's own paths (models/lora, metrics/), versioned by DVC",
    "base_model_precision": "the base model runs in mixed_precision; quantised base weights are not "
    "supported (the SDXL quickstart does not recommend them either)",
    "text_encoder_1_precision": "the text encoders run in encode.text_encoder_dtype",
    "text_encoder_2_precision": "the text encoders run in encode.text_encoder_dtype",
    "resume_from_checkpoint": "train resumes by itself from models/checkpoints after an interruption",
    "attention_mechanism": "PyTorch's scaled-dot-product attention is always used",
    "push_to_hub": "publishing is its own step: `sdxl-lora export dist --push-to-hub <hub_model_id>`",
    "hub_model_id": "publishing is its own step: `sdxl-lora export dist --push-to-hub <hub_model_id>`",
    "webhook_config": "its Discord / raw message formats are not ours; the URL in SDXL_LORA_WEBHOOK_URL (or "
    "validation.webhook_url) receives the previews as JSON (README, Watch validation images form)",
}
# Keys read above by their own rules (not copied as they are).
TRANSLATED = {
    *["model_type", "model_family", "model_flavour", "lora_type", "data_backend_config"],
    *["use_gradient_checkpointing", "max_train_steps", "snr_gamma", "optimizer"],
    *["validation_resolution", "lora_format", "eval_steps_interval"],
}
DATASET_IGNORED = {
    "type": "read as the dataset's source",
    "instance_data_dir": "read as the dataset's source",
    "dataset_name": "read as the dataset's source",
    "id": "read as the dataset's id",
    "cache_dir_vae": "latents are cached by encode_latents in data/latents (DVC-tracked)",
    "cache_dir": "text embeddings are cached by encode_text in data/text (DVC-tracked)",
    "metadata_backend": "image sizes are read by the bucket stage (or the parquet table)",
    "skip_file_discovery": SAME_AS_OURS,
    "vae_cache_clear_each_epoch": "cached latents are exact crops and reused across epochs",
    "write_batch_size": "encode.text_batch_size sets the text encoder's batch",
    "default": "there is one text embedding cache",
    "prepend_instance_prompt": "not supported: put the instance prompt in the captions",
    "only_instance_prompt": "use caption_strategy: instanceprompt",
}
DATASET_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Imported:
    params: Params
    ignored: list[tuple[str, str]]  # (key, why)
    defaults: list[tuple[str, Any]]  # (key, value): SimpleTuner's defaults that applied


def read_json(path: Path, kind: type) -> Any:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    if not isinstance(value, kind):
        raise UserError(f"{path}: expected a JSON {'object' if kind is dict else 'list'}")
    return value


def validation_resolution(value: Any) -> str:
    """SimpleTuner accepts `1024`, `1024x768,1280x768` and megapixels (`1.0`); ours takes pixels."""
    sizes = []
    for entry in str(value).split(","):
        entry = entry.strip()
        if re.fullmatch(r"\d*\.\d+", entry):  # megapixels: the square of that area, in multiples of 64
            edge = round((float(entry) * 1024**2) ** 0.5 / 64) * 64
            entry = f"{edge}x{edge}"
        sizes.append(entry)
    return ",".join(sizes)


def import_config(config_path: Path, backend_path: Path | None = None) -> Imported:
    config = {key.removeprefix("--"): value for key, value in read_json(config_path, dict).items()}
    source = config_path.name
    refuse = {
        "model_type": ("lora", "sdxl-lora trains LoRAs only; full fine-tuning is SimpleTuner's"),
        "model_family": ("sdxl", "sdxl-lora trains Stable Diffusion XL only"),
        "lora_type": ("standard", "LyCORIS adapters are not supported; use the standard (peft) LoRA"),
    }
    for key, (wanted, why) in refuse.items():
        if config.get(key, wanted) != wanted:
            raise UserError(f"{source}: {key} is {config[key]!r}: {why}")

    values: dict[str, Any] = {}
    for section, schema in SECTIONS.items():
        for key in schema.model_fields:
            if key in config and key not in TRANSLATED:
                values[f"{section}.{key}"] = config[key]
    for key in DATASET_KEYS:
        if key in config:  # top-level dataset keys are the defaults of every dataset
            values[f"bucket.{key}"] = config[key]
    if "use_gradient_checkpointing" in config:
        values["train.gradient_checkpointing"] = config["use_gradient_checkpointing"]
    if "model_flavour" in config and "pretrained_model_name_or_path" not in config:
        flavour = config["model_flavour"]
        if flavour not in FLAVOURS:
            raise UserError(
                f"{source}: model_flavour {flavour!r} is not an SDXL base model sdxl-lora trains "
                f"(known: {', '.join(FLAVOURS)}); refiners have another architecture"
            )
        values["model.pretrained_model_name_or_path"] = FLAVOURS[flavour]
    elif "pretrained_model_name_or_path" not in config:
        values["model.pretrained_model_name_or_path"] = FLAVOURS["base-1.0"]  # SimpleTuner's default
    if "max_train_steps" in config:
        values["train.max_train_steps"] = config["max_train_steps"] or None  # 0: epochs decide
    if "snr_gamma" in config:
        values["train.snr_gamma"] = config["snr_gamma"] or None  # 0: off
    if "optimizer" in config:
        if config["optimizer"] not in OPTIMIZERS:
            raise UserError(
                f"{source}: optimizer {config['optimizer']!r} has no equivalent here "
                f"(importable: {', '.join(OPTIMIZERS)})"
            )
        values["train.optimizer"] = OPTIMIZERS[config["optimizer"]]
    if "validation_resolution" in config:
        values["validation.validation_resolution"] = validation_resolution(config["validation_resolution"])
    if "eval_steps_interval" in config:
        values["train.eval_steps"] = config["eval_steps_interval"] or None  # 0: off
    if "lora_format" in config:
        values["train.lora_format"] = {"comfyui": "kohya"}.get(config["lora_format"], config["lora_format"])

    copied = {key.split(".", 1)[1] for key in values}
    ignored = [
        (key, IGNORED.get(key, "no equivalent in sdxl-lora"))
        for key in config
        if key not in copied and key not in TRANSLATED
    ]
    defaults = [(key, value) for key, value in SIMPLETUNER_DEFAULTS.items() if key not in values]
    raw = nested(values | dict(defaults))
    backend = backend_path or (
        Path(config["data_backend_config"]) if "data_backend_config" in config else None
    )
    if backend is not None:
        datasets, overrides = import_datasets(backend, ignored)
        raw["download"] = {"datasets": datasets}
        raw["bucket"]["datasets"] = overrides
    try:
        params = parse_params(raw, f"{source} (imported)")
    except UserError as err:
        raise UserError(f"the imported settings are not valid here:\n{err}") from None
    return Imported(params, ignored, defaults)


def import_datasets(
    path: Path, ignored: list[tuple[str, str]]
) -> tuple[list[dict[str, str]], dict[str, dict[str, Any]]]:
    """multidatabackend.json's image datasets: their sources, and their settings as per-dataset
    overrides of the bucket section."""
    datasets, overrides = [], {}
    for position, entry in enumerate(read_json(path, list)):
        where = f"{path.name} entry {position}"
        dataset_id = str(entry.get("id", ""))
        kind = entry.get("dataset_type", "image")
        if kind in ("text_embeds", "image_embeds"):
            ignored.append((f"{where} ({dataset_id})", "caches are the encode stages' outputs, kept by DVC"))
            continue
        if kind not in ("image", "eval"):
            raise UserError(f"{where}: dataset_type {kind!r} is not supported (image and eval are)")
        if not DATASET_ID.match(dataset_id):
            raise UserError(f"{where}: id {dataset_id!r}: use letters, digits, '.', '_' and '-' only")
        backend = entry.get("type", "local")
        if backend == "local" and entry.get("instance_data_dir"):
            source = str(entry["instance_data_dir"])
        elif backend == "huggingface" and entry.get("dataset_name"):
            source = str(entry["dataset_name"])
        else:
            raise UserError(
                f"{where}: type {backend!r}: only local folders (instance_data_dir) and Hugging Face "
                "datasets (dataset_name) are read; copy the images to a folder first"
            )
        datasets.append({"id": dataset_id, "source": source})
        settings = {key: entry[key] for key in DATASET_KEYS if key in entry}
        if kind == "eval":
            settings["dataset_type"] = "eval"
        if isinstance(entry.get("parquet"), dict):
            fields = ParquetMetadata.model_fields
            settings["parquet"] = {k: v for k, v in entry["parquet"].items() if k in fields}
        for key in entry:
            if key not in settings and key not in ("dataset_type", "parquet"):
                ignored.append((f"{where}.{key}", DATASET_IGNORED.get(key, "no equivalent in sdxl-lora")))
        overrides[dataset_id] = settings
    if not datasets:
        raise UserError(f"{path}: no image dataset (only text or image embedding caches)")
    return datasets, overrides


def nested(values: dict[str, Any]) -> dict[str, Any]:
    """{"train.lora_rank": 16} -> {"train": {"lora_rank": 16}}."""
    raw: dict[str, Any] = {"bucket": {}}
    for key, value in values.items():
        section, name = key.split(".", 1)
        raw.setdefault(section, {})[name] = value
    return raw
