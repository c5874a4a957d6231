"""Every params mistake is one line that names the key and what to do."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import run
from typer.testing import CliRunner

from sdxl_lib.config import load_params, parse_params
from sdxl_lib.errors import UserError
from stages.cli import build_app

app = build_app()

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"train": {"learning_rat": 1}}, "unknown key 'train.learning_rat': did you mean 'learning_rate'?"),
        ({"trian": {}}, "unknown key 'trian': did you mean 'train'?"),
        ({"train": {"lora_rank": 0}}, "train.lora_rank: Input should be greater than or equal to 1 (got 0)"),
        (
            {"bucket": {"crop_aspect": "sideways"}},
            "bucket.crop_aspect: Input should be 'square', 'preserve', 'closest' or 'random'",
        ),
        (
            {"bucket": {"datasets": {"demo": {"crop_stlye": "x"}}}},
            "unknown key 'bucket.datasets.demo.crop_stlye': did you mean 'crop_style'?",
        ),
        (
            {"bucket": {"datasets": {"demo": {"crop_aspect": "closest"}}}},
            "bucket: datasets.demo: crop_aspect 'closest' needs crop_aspect_buckets",
        ),
        (
            {"bucket": {"datasets": {"photos": {}}}},
            "params.yaml: bucket.datasets.photos: no dataset 'photos' in download.datasets (ids: demo)",
        ),
        ({"bucket": {"maximum_image_size": 2}}, "set maximum_image_size and target_downsample_size together"),
        (
            {"bucket": {"caption_strategy": "instanceprompt"}},
            "bucket: caption_strategy 'instanceprompt' needs instance_prompt",
        ),
        (
            {"download": {"datasets": [{"id": "a", "source": "x", "revison": "b"}]}},
            "unknown key 'download.datasets.0.revison': did you mean 'revision'?",
        ),
        (
            {"validation": {"validation_resolution": "1024x"}},
            "validation.validation_resolution: String should match",
        ),
        ({"train": {"learning_rate": "fast"}}, "train.learning_rate: Input should be a valid number"),
        (
            {"train": {"lora_dropout": 1.5}},
            "train.lora_dropout: Input should be less than 1 (got 1.5)",
        ),
        ({"bucket": {"eval_fraction": 1}}, "bucket.eval_fraction: Input should be less than 1 (got 1)"),
        ({"download": {"max_extracted_gb": 0}}, "download.max_extracted_gb: Input should be greater than 0"),
        (
            {"model": {"allow_pickle_weights": "maybe"}},
            "model.allow_pickle_weights: Input should be a valid boolean",
        ),
        ({"download": {"datasets": []}}, "download: list at least one dataset"),
        (
            {"download": {"datasets": [{"id": "a", "source": "x"}, {"id": "a", "source": "y"}]}},
            "download: dataset ids must be unique, got ['a', 'a']",
        ),
        (
            {"bucket": {"minimum_aspect_ratio": 2, "maximum_aspect_ratio": 1}},
            "bucket: minimum_aspect_ratio is above maximum_aspect_ratio",
        ),
        (
            {"train": {"use_dora": True, "lora_format": "kohya"}},
            "train: lora_format kohya with use_dora: diffusers (which evaluate loads LoRAs with) drops",
        ),
        (
            {"train": {"optimizer": "adamw_schedulefree", "lr_scheduler": "cosine"}},
            "train: optimizer adamw_schedulefree schedules itself: set lr_scheduler: constant",
        ),
    ],
)
def test_broken_params_files_name_the_key(tmp_path: Path, raw: dict, message: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError) as caught:
        load_params(path)
    assert message in str(caught.value)
    assert str(caught.value).startswith(f"{path}: ") and "\n" not in str(caught.value)


def test_defaults_are_valid_and_unquoted_no_is_accepted() -> None:
    params = parse_params({"train": {"mixed_precision": False}})
    assert params.train.mixed_precision == "no"
    assert parse_params({}).validation.sizes == [(1024, 1024)]


def test_project_params_and_presets_are_valid() -> None:
    params = load_params(ROOT / "params.yaml")
    assert params.model.pretrained_model_name_or_path == "builtin:tiny-sdxl"
    real = load_params(ROOT / "presets/sdxl-base-1.0.yaml")
    assert real.model.pretrained_model_name_or_path == "stabilityai/stable-diffusion-xl-base-1.0"
    assert real.train.mixed_precision == "bf16" and real.train.gradient_checkpointing


def test_invalid_yaml_and_missing_file(tmp_path: Path) -> None:
    broken = tmp_path / "params.yaml"
    broken.write_text("train:\n  lora_rank: [1\n")
    with pytest.raises(UserError, match=r"params.yaml: line \d+ is not valid YAML"):
        load_params(broken)
    with pytest.raises(UserError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_cli_prints_one_line_without_traceback(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("train:\n  lora_rnak: 4\n")
    result = run(["sdxl-lora", "bucket"], tmp_path, check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: params.yaml: unknown key 'train.lora_rnak': did you mean 'lora_rank'?"
    )
    assert "Traceback" not in result.stdout + result.stderr


def test_every_stage_has_help() -> None:
    runner = CliRunner()
    for stage in ("download", "bucket", "encode_latents", "encode_text", "train", "evaluate"):
        result = runner.invoke(app, [stage, "--help"])
        assert result.exit_code == 0 and "--params" in result.output
    assert "--params" in run(["python", "-m", "stages.bucket", "--help"], ROOT).stdout


def test_validation_prompts_and_resolutions_accept_one_or_many() -> None:
    one = parse_params({"validation": {"validation_prompt": "a dog", "validation_resolution": "512"}})
    assert one.validation.prompts == ["a dog"] and one.validation.sizes == [(512, 512)]
    many = parse_params(
        {"validation": {"validation_prompt": ["a", "b"], "validation_resolution": "1024x1024, 1280x768"}}
    )
    assert many.validation.prompts == ["a", "b"] and many.validation.sizes == [(1024, 1024), (1280, 768)]
