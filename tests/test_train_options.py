"""Every train option changes what is trained: each is checked against a baseline run of the same
length on the demo caches, in process (the stage itself is exercised in test_pipeline)."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import RecordingServer, read_tsv, run, tiny_pipeline
from diffusers import StableDiffusionXLPipeline
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb.proto import wandb_internal_pb2

from sdxl_lib import paths
from sdxl_lib.config import WEBHOOK_URL_ENV, TrainParams, parse_params
from sdxl_lib.errors import UserError
from sdxl_lib.export import KOHYA_WEIGHTS, LORA_WEIGHTS, save_lora
from sdxl_lib.sources import model_path, read_lock
from sdxl_lib.train.loop import train
from sdxl_lib.train.lora import TARGET_PRESETS, lora_config
from sdxl_lib.train.optimizers import make_optimizer
from sdxl_lib.train.utils import epoch_batches

STEPS = 3


@pytest.fixture(scope="module")
def project(demo_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    copy = tmp_path_factory.mktemp("options") / "project"
    shutil.copytree(demo_project, copy, symlinks=True)
    return copy


def train_with(
    project: Path, monkeypatch: pytest.MonkeyPatch, validation: dict | None = None, **overrides: object
) -> dict:
    """Train STEPS steps in `project` with train.<key> (and `validation`) overrides; returns the LoRA."""
    train_run(project, monkeypatch, validation, **overrides)
    return load_file(project / paths.LORA / LORA_WEIGHTS)


def train_run(
    project: Path, monkeypatch: pytest.MonkeyPatch, validation: dict | None = None, **overrides: object
) -> dict:
    """train_with's run; returns what train reports (steps, seconds, final loss)."""
    monkeypatch.chdir(project)
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["train"].update(
        {
            "max_train_steps": STEPS,
            "validate_at_end": False,
            "checkpointing_steps": 1000,
            "eval_steps": None,
            **overrides,
        }
    )
    raw["validation"].update(validation or {})
    result = train(parse_params(raw), read_lock(paths.LOCK))
    assert result is not None  # the main process reports
    return result


@pytest.fixture(scope="module")
def baseline(project: Path) -> dict:
    with pytest.MonkeyPatch.context() as monkeypatch:
        return train_with(project, monkeypatch)


@pytest.mark.parametrize(
    "overrides",
    [
        {"snr_gamma": 1.0},
        {"noise_offset": 0.1, "noise_offset_probability": 1.0},
        {"input_perturbation": 0.1},
        {"timestep_bias_strategy": "later", "timestep_bias_multiplier": 5.0},
        {"loss_type": "huber"},
        {"caption_dropout_probability": 0.5},
        {"prediction_type": "v_prediction"},
        {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True},
        {"lr_scheduler": "cosine", "lr_warmup_steps": 1},
        {"optimizer": "lion"},
        {"optimizer": "prodigy", "learning_rate": 1.0},
        {"optimizer": "adafactor"},
        {"optimizer": "adamw_schedulefree"},
        {"lora_dropout": 0.2},
        {"lora_alpha": 16},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_option_changes_the_trained_lora(
    overrides: dict, project: Path, baseline: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained = train_with(project, monkeypatch, **overrides)
    assert trained.keys() == baseline.keys()
    assert all(torch.isfinite(t).all() for t in trained.values())
    assert any(not torch.equal(trained[k], baseline[k]) for k in trained), f"{overrides} was ignored"


def test_same_settings_train_the_same_lora(
    project: Path, baseline: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    again = train_with(project, monkeypatch)
    assert all(torch.equal(again[k], baseline[k]) for k in baseline)


def test_epochs_set_the_step_count(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [r for r in pq.read_table(project / paths.PLAN).to_pylist() if r["split"] == "train"]
    per_epoch = len(epoch_batches(rows, 4, 42, 0))
    monkeypatch.chdir(project)
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["train"].update(max_train_steps=None, num_train_epochs=2, validate_at_end=False, eval_steps=None)
    assert train(parse_params(raw), read_lock(paths.LOCK))["steps"] == 2 * per_epoch


def test_ema_is_saved_beside_the_lora_and_loads(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trained = train_with(project, monkeypatch, use_ema=True, ema_decay=0.5)
    ema = load_file(project / paths.LORA / "ema" / LORA_WEIGHTS)
    assert ema.keys() == trained.keys()
    assert any(not torch.equal(ema[k], trained[k]) for k in ema)
    pipeline = StableDiffusionXLPipeline.from_pretrained(
        model_path(read_lock(project / paths.LOCK)["model"]), use_safetensors=True
    )
    pipeline.load_lora_weights(str(project / paths.LORA / "ema"))


@pytest.mark.parametrize("preset", list(TARGET_PRESETS))
def test_target_presets_and_rank(preset: str) -> None:
    unet = tiny_pipeline().unet
    unet.add_adapter(lora_config(TrainParams(lora_target=preset, lora_rank=3)))
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in unet.named_parameters() if ".lora_A." in n}
    assert adapted
    assert all(n.endswith(tuple(TARGET_PRESETS[preset])) for n in adapted)
    assert all(p.shape[0] == 3 for n, p in unet.named_parameters() if ".lora_A." in n)
    has = {
        kind: any(n.endswith(kind) for n in adapted)
        for kind in ("to_q", "ff.net.2", "conv1", "upsamplers.0.conv")
    }
    assert has == {
        "to_q": True,
        "ff.net.2": preset != "attention",
        "conv1": preset == "all",
        "upsamplers.0.conv": preset == "all",
    }


def test_explicit_module_list_replaces_the_preset() -> None:
    unet = tiny_pipeline().unet
    unet.add_adapter(lora_config(TrainParams(lora_target="all", lora_target_modules=["to_v"])))
    assert all(".to_v.lora_" in n for n, p in unet.named_parameters() if "lora_" in n)


def test_dora_adds_magnitude_vectors(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    unet = tiny_pipeline().unet
    unet.add_adapter(lora_config(TrainParams(use_dora=True)))
    assert any("lora_magnitude_vector" in n for n, _ in unet.named_parameters())
    trained = train_with(project, monkeypatch, use_dora=True)
    assert any("magnitude" in k for k in trained)


def test_init_types() -> None:
    def adapter(init: str) -> tuple[torch.nn.Module, dict]:
        unet = tiny_pipeline().unet
        torch.manual_seed(0)
        unet.add_adapter(lora_config(TrainParams(lora_init_type=init)))
        return unet, get_peft_model_state_dict(unet)

    _, default = adapter("default")
    _, gaussian = adapter("gaussian")
    assert all(not t.any() for k, t in default.items() if "lora_B" in k)  # starts as a no-op
    a_default = next(t for k, t in default.items() if "lora_A" in k)
    a_gaussian = next(t for k, t in gaussian.items() if "lora_A" in k)
    assert not torch.equal(a_default, a_gaussian)
    _, pissa = adapter("pissa")
    assert any(t.any() for k, t in pissa.items() if "lora_B" in k)  # principal components


def test_pissa_export_applies_to_the_original_base(tmp_path: Path) -> None:
    """A PiSSA adapter is trained on a modified base; the exported LoRA reproduces base + training on
    the untouched model."""
    unet = tiny_pipeline().unet
    unet.add_adapter(lora_config(TrainParams(lora_init_type="pissa", lora_rank=4)))
    initial = {k: v.clone() for k, v in get_peft_model_state_dict(unet).items()}
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn_like(p))  # "training"

    def output(model: torch.nn.Module) -> torch.Tensor:
        config = model.config
        pooled_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        generator = torch.Generator().manual_seed(0)
        sample = torch.randn(1, 4, 16, 16, generator=generator)
        cond = torch.randn(1, 77, model.config.cross_attention_dim, generator=generator)
        added = {
            "text_embeds": torch.randn(1, pooled_dim, generator=generator),
            "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]]),
        }
        with torch.no_grad():
            return model(sample, torch.tensor([500]), cond, added_cond_kwargs=added).sample

    save_lora({"unet": unet}, tmp_path, {"unet": initial})
    pipeline = tiny_pipeline()
    pipeline.load_lora_weights(str(tmp_path))
    torch.testing.assert_close(output(pipeline.unet), output(unet), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("adamw", "AdamW"),
        ("lion", "Lion"),
        ("prodigy", "Prodigy"),
        ("adafactor", "Adafactor"),
        ("adamw_schedulefree", "AdamWScheduleFree"),
    ],
)
def test_optimizer_by_name(name: str, expected: str) -> None:
    params = [torch.nn.Parameter(torch.ones(3))]
    optimizer = make_optimizer(TrainParams(optimizer=name), params, torch.device("cpu"))
    assert type(optimizer).__name__ == expected


def test_adamw8bit_off_cuda_is_a_clear_error() -> None:
    with pytest.raises(UserError, match="adamw8bit needs a CUDA GPU"):
        make_optimizer(
            TrainParams(optimizer="adamw8bit"), [torch.nn.Parameter(torch.ones(1))], torch.device("cpu")
        )


@pytest.mark.parametrize("lora_format", [LORA_WEIGHTS, KOHYA_WEIGHTS])
def test_init_lora_continues_from_a_saved_lora(
    lora_format: str, project: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """From our diffusers file or our kohya file (read through diffusers' kohya converter)."""
    start = train_with(project, monkeypatch, lora_rank=4, lora_alpha=8, lora_target="attention_mlp")
    saved = tmp_path / "start.safetensors"
    shutil.copy(project / paths.LORA / lora_format, saved)
    # A vanishing learning rate: the result is the file it started from, with its rank and alpha.
    kept = train_with(project, monkeypatch, init_lora=str(saved), learning_rate=1e-30)
    assert kept.keys() == start.keys()
    assert all(torch.allclose(kept[k], start[k], atol=1e-12) for k in start)
    with safe_open(str(project / paths.LORA / LORA_WEIGHTS), "pt") as handle:
        config = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert (config["unet.r"], config["unet.lora_alpha"]) == (4, 8)
    moved = train_with(project, monkeypatch, init_lora=str(saved))
    assert any(not torch.equal(moved[k], start[k]) for k in start)


def test_init_lora_must_be_safetensors(
    project: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pickle = tmp_path / "lora.bin"
    pickle.write_bytes(b"not loaded")
    with pytest.raises(UserError, match="is a pickle file, which can run code"):
        train_with(project, monkeypatch, init_lora=str(pickle))


def lora_b(lora: dict, prefix: str) -> list[torch.Tensor]:
    return [t for k, t in lora.items() if k.startswith(prefix) and "lora_B" in k]


def test_train_text_encoder_trains_both_encoders_and_loads_in_diffusers(
    project: Path, baseline: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    trained = train_with(project, monkeypatch, train_text_encoder=True)
    assert "captions are encoded online" in capsys.readouterr().out
    unet_keys = {k for k in trained if k.startswith("unet.")}
    assert unet_keys == baseline.keys()
    # From the second step on, the U-Net is conditioned by the encoders being trained.
    assert any(not torch.equal(trained[k], baseline[k]) for k in unet_keys)
    for prefix in ("text_encoder.", "text_encoder_2."):
        assert any(t.any() for t in lora_b(trained, prefix)), f"{prefix} LoRA did not move from zero"
    pipeline = tiny_pipeline()
    ids = pipeline.tokenizer_2(["a photo"], padding="max_length", return_tensors="pt").input_ids
    before = pipeline.text_encoder_2(ids)[0]
    pipeline.load_lora_weights(str(project / paths.LORA))
    encoders = {"text_encoder.": pipeline.text_encoder, "text_encoder_2.": pipeline.text_encoder_2}
    for prefix, encoder in encoders.items():
        loaded = sum(".lora_A." in n for n, _ in encoder.named_parameters())
        assert loaded == sum(k.startswith(prefix) and "lora_A" in k for k in trained) > 0
    assert not torch.allclose(pipeline.text_encoder_2(ids)[0], before)


def test_text_encoder_lr_is_the_encoders_own(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trained = train_with(project, monkeypatch, train_text_encoder=True, text_encoder_lr=1e-30)
    assert all(t.abs().max() < 1e-20 for t in lora_b(trained, "text_encoder"))
    assert any(t.abs().max() > 1e-6 for t in lora_b(trained, "unet."))


def test_text_encoder_training_resumes_exactly(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    settings = {"train_text_encoder": True, "use_ema": True, "checkpointing_steps": 2, "eval_steps": 2}
    uninterrupted = train_with(project, monkeypatch, **settings)
    ema = load_file(project / paths.LORA / "ema" / LORA_WEIGHTS)
    eval_log = project / paths.TRAIN_METRICS / "plots/metrics/eval_loss.tsv"
    eval_curve = read_tsv(eval_log)  # captions through the encoders being trained
    shutil.rmtree(project / paths.LORA)
    capsys.readouterr()
    resumed = train_with(project, monkeypatch, **settings)
    assert "(step 2)" in capsys.readouterr().out
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    resumed_ema = load_file(project / paths.LORA / "ema" / LORA_WEIGHTS)
    assert all(torch.equal(resumed_ema[k], ema[k]) for k in ema)
    assert list(eval_curve) == [0, 2, STEPS] and read_tsv(eval_log) == eval_curve


def test_the_step_rate_leaves_out_validation(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reported steps/s times the steps alone: a validation grid after every step (like eval loss
    and checkpoints) is counted apart, so it cannot make training look slower than it is."""
    quick = {"validation_steps": 1, "validation_num_inference_steps": 2, "validation_resolution": "64x64"}
    result = train_run(project, monkeypatch, validation=quick)
    assert result["steps"] == STEPS
    assert 0 < result["step_seconds"] < result["train_seconds"]


def test_model_card_shows_only_images_of_the_exported_weights(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without validate_at_end the last validation (step 2 of 3) is not what the LoRA makes, so the
    card gets no widget images from it."""
    train_with(project, monkeypatch, validation={"validation_steps": 2})
    assert (project / paths.VALIDATION_IMAGES / "step-000002.png").is_file()
    front = yaml.safe_load((project / paths.LORA / "README.md").read_text().split("---\n", 2)[1])
    assert "widget" not in front and not (project / paths.LORA / "images").exists()


def test_training_posts_validation_previews_to_the_webhook(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """validation_preview during a real train run: each validation image sends
    validation_num_inference_steps / validation_preview_steps previews, tagged with the training step.
    The URL comes from the environment and is written to no file (its path is the webhook's secret)."""
    with RecordingServer() as server:
        monkeypatch.setenv(WEBHOOK_URL_ENV, server.url)  # .../hooks/secret-token
        previews = {
            "validation_preview": True,
            "validation_preview_steps": 2,
            "validation_preview_model": "builtin:tiny-taesd",
            "validation_num_inference_steps": 4,
            "validation_steps": None,
        }
        train_with(project, monkeypatch, validation=previews, validate_at_end=True)
    prompts = parse_params(yaml.safe_load((project / "params.yaml").read_text())).validation.prompts
    assert [(d["prompt"], d["step"], d["inference_step"]) for d in server.documents] == [
        (prompt, STEPS, step) for prompt in prompts for step in (2, 4)
    ]
    written = [path for path in project.rglob("*") if path.is_file() and b"secret-token" in path.read_bytes()]
    assert written == []


def wandb_history(run_file: Path) -> dict[str, dict[int, float]]:
    """The logged metrics of an offline W&B run, {name: {step: value}}, read from its .wandb file: a
    7-byte header, then LevelDB-log blocks of 32 KiB whose chunks (crc32, length, type: 1 full,
    2 first, 3 middle, 4 last) carry protobuf Records."""
    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    position, pending, history = 7, b"", {}
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # block trailer
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record.FromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                items = {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
                for name, value in items.items():
                    if not name.startswith("_"):
                        history.setdefault(name, {})[items["_step"]] = value
    return history


def tensorboard_history(run_dir: Path) -> dict[str, dict[int, float]]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


@pytest.mark.parametrize(
    ("report_to", "optimizer"), [("tensorboard", "adamw"), ("wandb", "adamw_schedulefree")]
)
def test_eval_steps_and_trackers_log_the_dvclive_values_and_change_no_training(
    report_to: str, optimizer: str, project: Path, baseline: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Evaluating draws none of training's random numbers and leaves the weights as they were, even
    with schedule-free, whose switch to its averaged weights and back is not exact in floats."""
    plain = baseline if optimizer == "adamw" else train_with(project, monkeypatch, optimizer=optimizer)
    monkeypatch.setenv("WANDB_MODE", "offline")  # no account, no network: W&B writes its run locally
    shutil.rmtree(project / paths.TRACKER_LOGS, ignore_errors=True)
    trained = train_with(project, monkeypatch, optimizer=optimizer, eval_steps=2, report_to=report_to)
    assert all(torch.equal(trained[k], plain[k]) for k in plain)
    logged = {
        name: read_tsv(project / paths.TRAIN_METRICS / "plots/metrics" / f"{name}.tsv")
        for name in ("train_loss", "lr", "eval_loss")
    }
    assert list(logged["eval_loss"]) == [0, 2, STEPS] and list(logged["train_loss"]) == list(range(STEPS))
    if report_to == "tensorboard":
        (run_dir,) = (project / paths.TRACKER_LOGS / "tensorboard").glob("*/sdxl-lora")
        tracked = tensorboard_history(run_dir)
    else:
        (run_file,) = (project / paths.TRACKER_LOGS / "wandb").glob("offline-run-*/run-*.wandb")
        tracked = wandb_history(run_file)
    assert tracked.keys() == logged.keys()
    for name, values in logged.items():
        assert tracked[name] == pytest.approx(values, rel=1e-6), name  # TensorBoard keeps float32


def test_report_to_without_its_package_or_login_is_a_one_line_error(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """W&B without a login, through the train command (W&B keeps its settings per process, so this one
    runs alone); then tensorboard as if not installed."""
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["train"].update(report_to="wandb", max_train_steps=1)
    (project / "wandb-params.yaml").write_text(yaml.safe_dump(raw))
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    no_login = {"WANDB_CONFIG_DIR": str(project / "no-wandb-login"), "NETRC": str(project / "no-netrc")}
    result = run(["sdxl-lora", "train", "--params", "wandb-params.yaml"], project, check=False, **no_login)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    expected = r"^error: train.report_to wandb: .*wandb login.*WANDB_MODE=offline"
    assert re.search(expected, result.stderr, re.MULTILINE | re.IGNORECASE)
    monkeypatch.setattr("sdxl_lib.train.loop.TRACKER_AVAILABLE", {"tensorboard": lambda: False})
    missing = r"tensorboard package is not installed; pip install 'sdxl-lora\[trackers\]'"
    with pytest.raises(UserError, match=missing):
        train_with(project, monkeypatch, report_to="tensorboard")
