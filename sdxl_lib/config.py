"""The one config schema: every stage reads `params.yaml` through `load_params`.

Key names follow SimpleTuner's (`lora_rank`, `crop_aspect`, `resolution_type`, ...) with the
same meanings, because that is the vocabulary our users arrive with. Defaults live here only.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sdxl_lib.errors import UserError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelParams(Section):
    pretrained_model_name_or_path: str = "builtin:tiny-sdxl"
    revision: str = "main"
    pretrained_vae_model_name_or_path: str | None = None
    vae_revision: str = "main"


class ValidationParams(Section):
    validation_prompts: list[str] = ["a red circle on a blue background"]
    validation_resolution: str = Field("1024x1024", pattern=r"^\d+x\d+$")
    validation_guidance: float = Field(5.0, ge=0.0)
    validation_num_inference_steps: int = Field(30, ge=1)
    validation_seed: int = 0

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) parsed from `WxH`."""
        width, height = self.validation_resolution.split("x")
        return int(width), int(height)


class DatasetSource(Section):
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    # `builtin:demo`, a local directory, or a Hub dataset repo id (`owner/name`).
    source: str
    revision: str = "main"


class DownloadParams(Section):
    datasets: list[DatasetSource] = [DatasetSource(id="demo", source="builtin:demo")]

    @model_validator(mode="after")
    def _unique_ids(self) -> DownloadParams:
        ids = [d.id for d in self.datasets]
        if not ids:
            raise ValueError("list at least one dataset")
        if len(set(ids)) != len(ids):
            raise ValueError(f"dataset ids must be unique, got {ids}")
        return self


class BucketParams(Section):
    resolution: float = Field(1024, gt=0)
    resolution_type: Literal["pixel", "area", "pixel_area"] = "pixel_area"
    minimum_image_size: float | None = Field(None, ge=0)
    crop: bool = True
    crop_aspect: Literal["square", "preserve"] = "preserve"
    crop_style: Literal["random", "center", "corner"] = "center"
    caption_strategy: Literal["filename", "textfile", "instanceprompt"] = "textfile"
    instance_prompt: str | None = None
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = 42

    @model_validator(mode="after")
    def _instance_prompt_given(self) -> BucketParams:
        if self.caption_strategy == "instanceprompt" and not self.instance_prompt:
            raise ValueError("caption_strategy 'instanceprompt' needs bucket.instance_prompt")
        return self


class EncodeParams(Section):
    vae_batch_size: int = Field(4, ge=1)
    text_batch_size: int = Field(16, ge=1)
    vae_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    text_encoder_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    cache_dtype: Literal["fp32", "fp16", "bf16"] = "bf16"
    shard_size_mb: int = Field(512, ge=1)


class TrainParams(Section):
    lora_rank: int = Field(16, ge=1)
    lora_alpha: float | None = Field(None, gt=0)  # None means = lora_rank, as in SimpleTuner
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    lora_target_modules: list[str] = ["to_k", "to_q", "to_v", "to_out.0"]
    learning_rate: float = Field(1e-4, gt=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_weight_decay: float = Field(1e-2, ge=0)
    adam_epsilon: float = Field(1e-8, gt=0)
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "polynomial"
    ] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    train_batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_train_steps: int = Field(1000, ge=1)
    max_grad_norm: float = Field(1.0, gt=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    gradient_checkpointing: bool = False
    checkpointing_steps: int = Field(500, ge=1)
    checkpoints_total_limit: int = Field(2, ge=1)
    validate_at_end: bool = True
    seed: int = 42

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _unquoted_no(cls, value: Any) -> Any:
        """YAML reads an unquoted `no` (as `dvc exp run -S` writes it) as false."""
        return "no" if value is False else value


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


def _section_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class that owns the field at `loc`, for did-you-mean suggestions."""
    model: type[BaseModel] = Params
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        annotation = model.model_fields[part].annotation
        inner = getattr(annotation, "__args__", (annotation,))[0]
        if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
            return None
        model = inner
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
    value = error.get("input")
    got = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"{source}: {key}: {message}{got}"


def parse_params(raw: dict[str, Any], source: str = "params.yaml") -> Params:
    """Validate a params mapping; every problem becomes one line naming the key."""
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise UserError("\n".join(_describe(e, source) for e in err.errors())) from None


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
