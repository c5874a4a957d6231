"""The one config schema: every stage reads `params.yaml` through `load_params`.

Key names follow SimpleTuner's (`lora_rank`, `crop_aspect`, `resolution_type`, ...) with the
same meanings, because that is the vocabulary our users arrive with. Defaults live here only.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from sdxl_lib.errors import UserError

WEBHOOK_URL = r"^https?://"
WEBHOOK_URL_ENV = "SDXL_LORA_WEBHOOK_URL"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelParams(Section):
    pretrained_model_name_or_path: str = "builtin:tiny-sdxl"
    revision: str = "main"
    pretrained_vae_model_name_or_path: str | None = None
    vae_revision: str = "main"
    # Load .bin/.pt/.ckpt weights (base model, VAE, train.init_lora) with torch.load(weights_only=True)
    # where no .safetensors exist; off, such files are refused (unpickling can run code).
    allow_pickle_weights: bool = False


class ValidationParams(Section):
    validation_prompt: str | list[str] = "a red circle on a blue background"  # one or a list
    validation_negative_prompt: str = "blurry, cropped, ugly"  # SimpleTuner's default
    # one or more sizes, comma separated: "1024x1024,1280x768" (a bare "1024" means square)
    validation_resolution: str = Field("1024x1024", pattern=r"^\s*\d+(x\d+)?(\s*,\s*\d+(x\d+)?)*\s*$")
    validation_guidance: float = Field(5.0, ge=0.0)
    validation_num_inference_steps: int = Field(30, ge=1)
    validation_seed: int = 0
    validation_steps: int | None = Field(None, ge=1)  # also during training, with base images at step 0
    # Live previews (SimpleTuner's): every validation_preview_steps denoising steps the latents are
    # decoded by a tiny autoencoder and posted to the webhook as JSON (step, prompt, PNG).
    validation_preview: bool = False
    validation_preview_steps: int = Field(1, ge=1)
    validation_preview_model: str = "madebyollin/taesdxl"  # an AutoencoderTiny, or builtin:tiny-taesd
    webhook_url: str | None = Field(None, pattern=WEBHOOK_URL)  # else $SDXL_LORA_WEBHOOK_URL

    @property
    def webhook(self) -> str | None:
        """Where previews go: webhook_url, else the environment's SDXL_LORA_WEBHOOK_URL. A webhook's
        URL usually carries its secret token, and params are committed and shown by `dvc exp show`."""
        return self.webhook_url or os.environ.get(WEBHOOK_URL_ENV) or None

    @model_validator(mode="after")
    def _preview_needs_a_webhook(self) -> ValidationParams:
        if not self.validation_preview:
            return self
        url = self.webhook
        if url is None:
            raise ValueError(
                f"validation_preview needs a webhook: set the environment variable {WEBHOOK_URL_ENV} "
                "(a secret URL stays out of params.yaml) or webhook_url"
            )
        if not re.match(WEBHOOK_URL, url):  # webhook_url's own pattern has passed: the URL is the env's
            raise ValueError(f"{WEBHOOK_URL_ENV} must be an http:// or https:// URL")
        return self

    @property
    def prompts(self) -> list[str]:
        return [self.validation_prompt] if isinstance(self.validation_prompt, str) else self.validation_prompt

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """(width, height) of each entry of `validation_resolution`."""
        sizes = []
        for entry in self.validation_resolution.split(","):
            width, _, height = entry.strip().partition("x")
            sizes.append((int(width), int(height or width)))
        return sizes


class DatasetSource(Section):
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    # `builtin:demo`, a local directory, or a Hub dataset repo id (`owner/name`).
    source: str
    revision: str = "main"


class DownloadParams(Section):
    datasets: list[DatasetSource] = [DatasetSource(id="demo", source="builtin:demo")]
    # Follow symlinks that point outside a dataset's folder (off: they are skipped and reported).
    allow_symlinks: bool = False
    # An archive in a dataset is unpacked only if its contents fit in this (and in 200x its own size).
    max_extracted_gb: float = Field(100.0, gt=0)

    @model_validator(mode="after")
    def _unique_ids(self) -> DownloadParams:
        ids = [d.id for d in self.datasets]
        if not ids:
            raise ValueError("list at least one dataset")
        if len(set(ids)) != len(ids):
            raise ValueError(f"dataset ids must be unique, got {ids}")
        return self


class AspectBucket(Section):
    aspect: float = Field(gt=0)
    weight: float = Field(1.0, gt=0)


class ParquetMetadata(Section):
    """A metadata table read instead of opening every image (SimpleTuner's `parquet` block)."""

    path: str = "metadata.parquet"  # relative to the dataset folder
    filename_column: str = "filename"
    caption_column: str = "caption"
    width_column: str = "width"
    height_column: str = "height"


class DatasetSettings(Section):
    """How one dataset's images become samples; SimpleTuner's multidatabackend.json keys."""

    resolution: float = Field(1024, gt=0)
    resolution_type: Literal["pixel", "area", "pixel_area"] = "pixel_area"
    minimum_image_size: float | None = Field(None, ge=0)
    maximum_image_size: float | None = Field(None, gt=0)
    target_downsample_size: float | None = Field(None, gt=0)
    minimum_aspect_ratio: float | None = Field(None, gt=0)
    maximum_aspect_ratio: float | None = Field(None, gt=0)
    crop: bool = True
    crop_aspect: Literal["square", "preserve", "closest", "random"] = "preserve"
    crop_aspect_buckets: list[float | AspectBucket] | None = None
    crop_style: Literal["random", "center", "corner"] = "center"
    caption_strategy: Literal["filename", "textfile", "instanceprompt", "parquet"] = "textfile"
    instance_prompt: str | None = None
    parquet: ParquetMetadata | None = None
    random_flip: bool = False
    repeats: int = Field(0, ge=0)  # extra passes per epoch: 0 = each image once (SimpleTuner's meaning)
    probability: float = Field(1.0, ge=0.0, le=1.0)
    disabled: bool = False
    dataset_type: Literal["image", "eval"] = "image"  # eval: held out entirely
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _consistent(self) -> DatasetSettings:
        if self.caption_strategy == "instanceprompt" and not self.instance_prompt:
            raise ValueError("caption_strategy 'instanceprompt' needs instance_prompt")
        if self.caption_strategy == "parquet" and self.parquet is None:
            raise ValueError("caption_strategy 'parquet' needs a parquet block (path, columns)")
        if self.crop_aspect in ("closest", "random") and not self.crop_aspect_buckets:
            raise ValueError(
                f"crop_aspect '{self.crop_aspect}' needs crop_aspect_buckets, e.g. [0.75, 1.0, 1.33]"
            )
        if (self.maximum_image_size is None) != (self.target_downsample_size is None):
            raise ValueError("set maximum_image_size and target_downsample_size together (or neither)")
        low, high = self.minimum_aspect_ratio, self.maximum_aspect_ratio
        if low and high and low > high:
            raise ValueError("minimum_aspect_ratio is above maximum_aspect_ratio")
        return self

    @property
    def aspect_choices(self) -> list[AspectBucket]:
        return [
            b if isinstance(b, AspectBucket) else AspectBucket(aspect=b)
            for b in self.crop_aspect_buckets or []
        ]


# Every dataset key, optional: what `bucket.datasets.<id>` may override.
DatasetOverrides = create_model(
    "DatasetOverrides",
    __base__=Section,
    **{name: (field.annotation | None, None) for name, field in DatasetSettings.model_fields.items()},
)


class BucketParams(DatasetSettings):
    """Defaults for every dataset, per-dataset overrides under `datasets`, and global settings."""

    datasets: dict[str, DatasetOverrides] = {}  # type: ignore[valid-type]
    # What to do with a train bucket holding fewer images than one batch (see README).
    bucket_pruning: Literal["merge", "oversubscribe", "drop"] = "merge"
    seed: int = 42

    @model_validator(mode="after")
    def _overrides_valid(self) -> BucketParams:
        for dataset_id in self.datasets:
            try:
                self.for_dataset(dataset_id)
            except ValidationError as err:
                message = err.errors()[0]["msg"].removeprefix("Value error, ")
                raise ValueError(f"datasets.{dataset_id}: {message}") from None
        return self

    def for_dataset(self, dataset_id: str) -> DatasetSettings:
        """The defaults with this dataset's overrides applied."""
        values = {name: getattr(self, name) for name in DatasetSettings.model_fields}
        override = self.datasets.get(dataset_id)
        if override is not None:
            values.update(override.model_dump(exclude_none=True))
        return DatasetSettings.model_validate(values)


class EncodeParams(Section):
    vae_batch_size: int = Field(4, ge=1)
    text_batch_size: int = Field(16, ge=1)
    vae_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    text_encoder_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    cache_dtype: Literal["fp32", "fp16", "bf16"] = "bf16"
    shard_size_mb: int = Field(512, ge=1)
    # SimpleTuner's switches: train (and evaluate) encode latents when they use them, nothing is
    # stored. `vae_cache_ondemand` implies `vae_cache_disable`, as SimpleTuner's quickstart says.
    vae_cache_ondemand: bool = False
    vae_cache_disable: bool = False

    @property
    def online_vae(self) -> bool:
        return self.vae_cache_ondemand or self.vae_cache_disable


class TrainParams(Section):
    # LoRA (peft). `lora_target` presets are listed in sdxl_lib/train/lora.py; an explicit
    # `lora_target_modules` list replaces the preset.
    lora_rank: int = Field(16, ge=1)
    lora_alpha: float | None = Field(None, gt=0)  # None means = lora_rank, as in SimpleTuner
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    lora_target: Literal["attention", "attention_mlp", "all"] = "attention"
    lora_target_modules: list[str] | None = None
    use_dora: bool = False
    lora_init_type: Literal["default", "gaussian", "pissa", "olora"] = "default"
    # Continue from this LoRA (.safetensors, diffusers or kohya format); its rank, alpha and targets win.
    init_lora: str | None = None
    # Also train LoRAs on both text encoders (the preset's attention / MLP layers, same rank); the
    # captions are then encoded online each step instead of read from the text cache.
    train_text_encoder: bool = False
    text_encoder_lr: float | None = Field(None, gt=0)  # None: learning_rate (as kohya)
    # Optimisation
    optimizer: Literal["adamw", "adamw8bit", "lion", "prodigy", "adafactor", "adamw_schedulefree"] = "adamw"
    learning_rate: float = Field(1e-4, gt=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_weight_decay: float = Field(1e-2, ge=0)
    adam_epsilon: float = Field(1e-8, gt=0)
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "polynomial"
    ] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    lr_num_cycles: int = Field(1, ge=1)  # cosine_with_restarts
    lr_power: float = Field(1.0, gt=0)  # polynomial
    train_batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_train_steps: int | None = Field(None, ge=1)  # wins over num_train_epochs when set
    num_train_epochs: int = Field(1, ge=1)
    max_grad_norm: float = Field(1.0, gt=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    gradient_checkpointing: bool = False
    # Loss and noise
    prediction_type: Literal["epsilon", "v_prediction"] | None = None  # None: the scheduler's own
    snr_gamma: float | None = Field(None, gt=0)
    noise_offset: float = Field(0.0, ge=0)
    noise_offset_probability: float = Field(0.25, ge=0, le=1)
    input_perturbation: float = Field(0.0, ge=0)
    rescale_betas_zero_snr: bool = False
    timestep_bias_strategy: Literal["none", "earlier", "later", "range"] = "none"
    timestep_bias_multiplier: float = Field(1.0, gt=0)
    timestep_bias_begin: int = Field(0, ge=0)
    timestep_bias_end: int = Field(1000, ge=1)
    timestep_bias_portion: float = Field(0.25, gt=0, le=1)
    loss_type: Literal["l2", "huber"] = "l2"
    huber_c: float = Field(0.1, gt=0)
    caption_dropout_probability: float = Field(0.0, ge=0, le=1)
    # EMA of the LoRA weights, saved beside the LoRA
    use_ema: bool = False
    ema_decay: float = Field(0.995, gt=0, lt=1)
    # Which files models/lora holds: diffusers' layout, kohya's (A1111, Forge, ComfyUI), or both
    lora_format: Literal["both", "diffusers", "kohya"] = "both"
    # Checkpoints and the rest
    checkpointing_steps: int = Field(500, ge=1)
    checkpoints_total_limit: int = Field(2, ge=1)
    validate_at_end: bool = True
    # Eval loss (the evaluate section's timesteps and noise) on the held-out split every eval_steps,
    # from the base at step 0 to the end: the `eval_loss` plot against step. Off when None.
    eval_steps: int | None = Field(None, ge=1)
    # Trackers besides DVCLive (always on), through accelerate; their logs go to logs/.
    report_to: Literal["none", "tensorboard", "wandb"] = "none"
    seed: int = 42

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _unquoted_no(cls, value: Any) -> Any:
        """YAML reads an unquoted `no` (as `dvc exp run -S` writes it) as false."""
        return "no" if value is False else value

    @property
    def scheduler_overrides(self) -> dict[str, Any]:
        """Noise-schedule settings that training, evaluation and sampling must all share."""
        overrides: dict[str, Any] = {}
        if self.prediction_type:
            overrides["prediction_type"] = self.prediction_type
        if self.rescale_betas_zero_snr:  # sampling must then start from the last timestep
            overrides.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
        return overrides

    @model_validator(mode="after")
    def _consistent(self) -> TrainParams:
        if self.timestep_bias_strategy == "range" and self.timestep_bias_begin >= self.timestep_bias_end:
            raise ValueError(
                f"timestep_bias_begin ({self.timestep_bias_begin}) must be below "
                f"timestep_bias_end ({self.timestep_bias_end}) for timestep_bias_strategy: range"
            )
        if self.use_dora and self.lora_init_type in ("pissa", "olora"):
            raise ValueError(
                f"lora_init_type {self.lora_init_type} cannot be exported for the original base model "
                "with use_dora (the magnitudes depend on the modified base): use lora_init_type default"
            )
        if self.use_dora and self.lora_format == "kohya":
            raise ValueError(
                "lora_format kohya with use_dora: diffusers (which evaluate loads LoRAs with) drops kohya "
                "files' DoRA magnitudes; use lora_format both"
            )
        if self.optimizer == "adamw_schedulefree" and self.lr_scheduler != "constant":
            raise ValueError(
                "optimizer adamw_schedulefree schedules itself: set lr_scheduler: constant "
                "(its warm-up comes from lr_warmup_steps)"
            )
        return self


class EvaluateParams(Section):
    eval_timesteps: int = Field(28, ge=1, le=1000)
    eval_seed: int = 0
    eval_batch_size: int = Field(4, ge=1)
    clip_model: str = "openai/clip-vit-large-patch14"


class Params(Section):
    model: ModelParams = ModelParams()
    validation: ValidationParams = ValidationParams()
    download: DownloadParams = DownloadParams()
    bucket: BucketParams = BucketParams()
    encode: EncodeParams = EncodeParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()

    @model_validator(mode="after")
    def _bucket_datasets_exist(self) -> Params:
        known = [d.id for d in self.download.datasets]
        for dataset_id in self.bucket.datasets:
            if dataset_id not in known:
                raise ValueError(
                    f"bucket.datasets.{dataset_id}: no dataset '{dataset_id}' in download.datasets "
                    f"(ids: {', '.join(known)})"
                )
        return self


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel inside an annotation like `X`, `X | None`, `list[X]` or `dict[str, X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _section_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class that owns the field at `loc`, for did-you-mean suggestions."""
    model: type[BaseModel] | None = Params
    for part in loc[:-1]:
        if model is None:
            return None
        if part in model.model_fields:  # list indexes and dict keys (dataset ids) are skipped
            model = _model_in(model.model_fields[part].annotation)
    return model


def _describe(error: dict[str, Any], source: str) -> str:
    loc = tuple(p for p in error["loc"] if not str(p).startswith("function-after"))
    key = ".".join(str(p) for p in loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        owner = _section_at(loc)
        choices = list(owner.model_fields) if owner else []
        close = difflib.get_close_matches(str(loc[-1]), choices, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(choices)}"
        return f"{source}: unknown key '{key}': {hint}"
    message = error["msg"].removeprefix("Value error, ")
    if not loc:  # a check across sections names its keys itself
        return f"{source}: {message}"
    value = error.get("input")
    got = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"{source}: {key}: {message}{got}"


def parse_params(raw: dict[str, Any], source: str = "params.yaml") -> Params:
    """Validate a params mapping; every problem becomes one line naming the key."""
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise UserError("\n".join(_describe(e, source) for e in err.errors())) from None


def dump_params(params: Params, header: str) -> str:
    """params.yaml text for `params`, every value spelled out, after `header` (comment lines)."""
    values = params.model_dump(mode="json")
    # per-dataset overrides: only what each dataset sets
    values["bucket"]["datasets"] = {
        dataset_id: override.model_dump(mode="json", exclude_none=True)
        for dataset_id, override in params.bucket.datasets.items()
    }
    comment = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return comment + "\n" + yaml.safe_dump(values, sort_keys=False, allow_unicode=True, width=100)


def sanity_warnings(params: Params, train_images: int | None, has_gpu: bool) -> list[str]:
    """Settings that validate but are probably not what the user wants (checked by `configure` and
    `import-simpletuner`); `train_images`: how many images the datasets hold, where known."""
    cfg = params.train
    warnings = []
    if not has_gpu and cfg.mixed_precision != "no":
        warnings.append(
            f"mixed_precision {cfg.mixed_precision} on a machine without a GPU: CPU autocast is far slower "
            "than fp32 (BENCHMARKS.md); set train.mixed_precision: no to try it here"
        )
    per_step = cfg.train_batch_size * cfg.gradient_accumulation_steps
    if train_images is not None and train_images < per_step:
        warnings.append(
            f"the datasets hold {train_images} images, fewer than train_batch_size x "
            f"gradient_accumulation_steps = {per_step}: one optimizer step would repeat images"
        )
    if not 1e-5 <= cfg.learning_rate <= 1e-3 and cfg.optimizer not in ("prodigy",):
        warnings.append(
            f"learning_rate {cfg.learning_rate:g} is far outside the usual 1e-5..1e-3 for a LoRA "
            "(1e-4 is a common start)"
        )
    return warnings


def load_params(path: Path | str = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: not found; run from the project root or pass --params")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{where} is not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections (model, train, ...)")
    return parse_params(raw, str(path))
