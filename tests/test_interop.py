"""Metadata, model card, `export`, `import-simpletuner` and `configure`: what other tools and users read."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import HubStandIn, new_project, read_json, run, set_params, trained_pipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save
from typer.testing import CliRunner

from sdxl_lib.config import TrainParams, parse_params
from sdxl_lib.data.plan import is_eval
from sdxl_lib.export import (
    KOHYA_WEIGHTS,
    LORA_WEIGHTS,
    lora_components,
    lora_file,
    lora_state,
    read_lora,
    save_lora,
)
from sdxl_lib.interop.metadata import bucket_info, tag_frequency
from sdxl_lib.interop.simpletuner import import_config
from sdxl_lib.models import TINY_SDXL
from sdxl_lib.sources import model_path, pin_model
from stages.cli import build_app

app = build_app()

# The SimpleTuner SDXL quickstart's examples (../shared/reference/000_f6aa9dcf0b5bb480.txt), verbatim.
QUICKSTART_CONFIG = {
    "model_type": "lora",
    "model_family": "sdxl",
    "model_flavour": "base-1.0",
    "output_dir": "/home/user/output/models",
    "validation_resolution": "1024x1024,1280x768",
    "validation_guidance": 3.4,
    "use_gradient_checkpointing": True,
    "learning_rate": 1e-4,
}
QUICKSTART_QUANTISED = {
    "base_model_precision": "int8-quanto",
    "text_encoder_1_precision": "no_change",
    "text_encoder_2_precision": "no_change",
    "optimizer": "optimi-lion",
}
QUICKSTART_BACKEND = [
    {
        "id": "pseudo-camera-10k-sdxl",
        "type": "local",
        "crop": True,
        "crop_aspect": "square",
        "crop_style": "random",
        "resolution": 1.0,
        "minimum_image_size": 0.25,
        "maximum_image_size": 1.0,
        "target_downsample_size": 1.0,
        "resolution_type": "area",
        "cache_dir_vae": "cache/vae/sdxl/pseudo-camera-10k",
        "instance_data_dir": "/home/user/simpletuner/datasets/pseudo-camera-10k",
        "disabled": False,
        "skip_file_discovery": "",
        "caption_strategy": "filename",
        "metadata_backend": "discovery",
    },
    {
        "id": "text-embeds",
        "type": "local",
        "dataset_type": "text_embeds",
        "default": True,
        "cache_dir": "cache/text/sdxl/pseudo-camera-10k",
        "disabled": False,
        "write_batch_size": 128,
    },
]


def trained_adapters(text_encoders: bool, use_dora: bool = False) -> dict[str, torch.nn.Module]:
    return trained_pipeline(TrainParams(lora_rank=4, lora_alpha=8, use_dora=use_dora), text_encoders)[1]


def header(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


def test_every_file_carries_metadata_and_its_own_hashes(tmp_path: Path) -> None:
    save_lora(
        trained_adapters(text_encoders=True), tmp_path, metadata={"ss_steps": "7", "modelspec.title": "t"}
    )
    implementations = {}
    for name in (LORA_WEIGHTS, KOHYA_WEIGHTS):
        metadata = header(tmp_path / name)
        data = (tmp_path / name).read_bytes()
        (length,) = struct.unpack("<Q", data[:8])
        content = hashlib.sha256(data[8 + length :]).hexdigest()  # the tensors, not the header
        assert metadata["modelspec.hash_sha256"] == f"0x{content}"
        assert metadata["sshs_model_hash"] == content
        ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
        legacy = hashlib.sha256(save(load_file(tmp_path / name), ss_only)[0x100000:0x110000]).hexdigest()
        assert metadata["sshs_legacy_hash"] == legacy[:8]
        assert metadata["ss_steps"] == "7" and metadata["modelspec.title"] == "t"
        assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "8.0")
        assert metadata["ss_network_module"] == "networks.lora"
        implementations[name] = metadata["modelspec.implementation"]
    assert implementations == {
        LORA_WEIGHTS: "diffusers",
        KOHYA_WEIGHTS: "https://github.com/Stability-AI/generative-models",
    }
    assert "lora_adapter_metadata" not in header(tmp_path / KOHYA_WEIGHTS)  # diffusers would misread it


def test_metadata_values_have_known_answers() -> None:
    rows = [("a", "cat, red, sitting"), ("a", "cat,blue"), ("b", "dog, red, red")]
    assert tag_frequency(rows) == {
        "a": {"blue": 1, "cat": 2, "red": 1, "sitting": 1},
        "b": {"dog": 1, "red": 1},
    }
    info = bucket_info([(1024, 1024), (1152, 896), (1024, 1024)])
    assert info == {
        "buckets": {
            "0": {"resolution": [1024, 1024], "count": 2},
            "1": {"resolution": [1152, 896], "count": 1},
        }
    }


@pytest.mark.parametrize("text_encoders", [False, True])
def test_lora_format_picks_the_files(text_encoders: bool, tmp_path: Path) -> None:
    models = trained_adapters(text_encoders)
    save_lora(models, tmp_path / "kohya", lora_format="kohya")
    save_lora(models, tmp_path / "diffusers", lora_format="diffusers")
    assert [p.name for p in (tmp_path / "kohya").iterdir()] == [KOHYA_WEIGHTS]
    assert [p.name for p in (tmp_path / "diffusers").iterdir()] == [LORA_WEIGHTS]
    assert lora_file(tmp_path / "kohya").name == KOHYA_WEIGHTS
    for folder in ("kohya", "diffusers"):
        assert lora_components(lora_file(tmp_path / folder)) == set(models)


def test_read_lora_gives_back_what_was_saved(tmp_path: Path) -> None:
    models = trained_adapters(text_encoders=True, use_dora=True)
    save_lora(models, tmp_path, lora_format="diffusers")
    layers, configs = read_lora(tmp_path / LORA_WEIGHTS)
    assert set(layers) == set(models) and configs["unet"]["r"] == 4 and configs["text_encoder"]["use_dora"]
    for name, model in models.items():
        expected = lora_state(model)
        assert layers[name].keys() == expected.keys()
        assert all(torch.equal(layers[name][k], expected[k]) for k in expected)


def test_kohya_only_with_dora_is_refused() -> None:
    with pytest.raises(Exception, match="lora_format kohya with use_dora"):
        parse_params({"train": {"use_dora": True, "lora_format": "kohya"}})


def test_trained_lora_has_metadata_and_a_model_card(demo_project: Path) -> None:
    params = yaml.safe_load((demo_project / "params.yaml").read_text())
    metadata = header(demo_project / "models/lora" / KOHYA_WEIGHTS)
    plan = pq.read_table(demo_project / "data/buckets/plan.parquet").to_pylist()
    train = {r["sample_id"] for r in plan if r["split"] == "train"}
    assert metadata["ss_steps"] == str(params["train"]["max_train_steps"])
    assert metadata["ss_num_train_images"] == str(len(train))
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["modelspec.resolution"] == "256x256"
    assert metadata["ss_network_dim"] == str(params["train"]["lora_rank"])
    buckets = json.loads(metadata["ss_bucket_info"])["buckets"].values()
    assert sum(b["count"] for b in buckets) == sum(r["split"] == "train" for r in plan)  # flips included
    card = (demo_project / "models/lora/README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert {"lora", "text-to-image", "diffusers", "stable-diffusion-xl"} <= set(front["tags"])
    prompts = params["validation"]["validation_prompt"]
    assert [w["text"] for w in front["widget"]] == prompts  # the demo validates at one resolution
    for entry in front["widget"]:
        assert Image.open(demo_project / "models/lora" / entry["output"]["url"]).size == (256, 256)
    assert "load_lora_weights" in card and "final_train_loss" in card


@pytest.mark.parametrize("lora_format", ["kohya", "diffusers"])
def test_export_writes_the_same_lora_with_its_metadata(
    demo_project: Path, lora_format: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    run(["sdxl-lora", "export", str(out), "--format", lora_format], demo_project)
    name = KOHYA_WEIGHTS if lora_format == "kohya" else LORA_WEIGHTS
    assert sorted(p.name for p in out.iterdir()) == sorted([name, "README.md", "images"])
    exported, trained = load_file(out / name), load_file(demo_project / "models/lora" / name)
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in trained)
    assert header(out / name) == header(demo_project / "models/lora" / name)
    card = (out / "README.md").read_text()
    assert "eval_loss" in card  # the evaluate stage's numbers join the card once it has run
    front = yaml.safe_load(card.split("---")[1])
    assert all((out / w["output"]["url"]).is_file() for w in front["widget"])


def write_quickstart(folder: Path, config: dict, datasets: Path) -> tuple[Path, Path]:
    backend = json.loads(json.dumps(QUICKSTART_BACKEND))
    backend[0]["instance_data_dir"] = str(datasets)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "multidatabackend.json").write_text(json.dumps(backend))
    return folder / "config.json", folder / "multidatabackend.json"


def test_quickstart_imports_with_every_key_accounted_for(tmp_path: Path) -> None:
    config, backend = write_quickstart(
        tmp_path, QUICKSTART_CONFIG | QUICKSTART_QUANTISED, tmp_path / "images"
    )
    result = run(["sdxl-lora", "import-simpletuner", str(config), str(backend), "-o", "out.yaml"], tmp_path)
    params = parse_params(yaml.safe_load((tmp_path / "out.yaml").read_text()))
    assert params.model.pretrained_model_name_or_path == "stabilityai/stable-diffusion-xl-base-1.0"
    assert params.validation.sizes == [(1024, 1024), (1280, 768)]
    assert params.validation.validation_guidance == 3.4
    assert params.train.gradient_checkpointing and params.train.learning_rate == 1e-4
    assert params.train.optimizer == "lion"
    # where the file is silent, SimpleTuner's defaults, not ours
    assert (params.train.lora_rank, params.train.lora_dropout, params.train.train_batch_size) == (16, 0.1, 4)
    assert params.train.lr_scheduler == "constant_with_warmup" and params.train.checkpoints_total_limit == 5
    assert [(d.id, d.source) for d in params.download.datasets] == [
        ("pseudo-camera-10k-sdxl", str(tmp_path / "images"))
    ]
    dataset = params.bucket.for_dataset("pseudo-camera-10k-sdxl")
    assert (dataset.resolution, dataset.resolution_type, dataset.minimum_image_size) == (1.0, "area", 0.25)
    assert (dataset.crop, dataset.crop_aspect, dataset.crop_style) == (True, "square", "random")
    assert (dataset.maximum_image_size, dataset.target_downsample_size) == (1.0, 1.0)
    assert dataset.caption_strategy == "filename"
    out = result.stdout
    ignored = [line for line in out.splitlines() if line.startswith("ignored ")]
    for key in (
        "output_dir",
        "base_model_precision",
        "text_encoder_1_precision",
        "cache_dir_vae",
        "text-embeds",
    ):
        assert any(key in line for line in ignored), key
    assert "SimpleTuner default (the file is silent, ours differs): train.lora_dropout = 0.1" in out
    # learning_rate 1e-4 is usual and the image folder is not there to count; bf16 is a GPU's setting
    assert [line for line in out.splitlines() if line.startswith("warning:")] == [
        "warning: mixed_precision bf16 on a machine without a GPU: CPU autocast is far slower than fp32 "
        "(BENCHMARKS.md); set train.mixed_precision: no to try it here"
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "full"}, "model_type is 'full'"),
        ({"model_family": "flux"}, "model_family is 'flux'"),
        ({"model_flavour": "refiner-1.0"}, "model_flavour 'refiner-1.0'"),
        ({"optimizer": "soap"}, "optimizer 'soap' has no equivalent"),
        ({"use_dora": True, "lora_init_type": "pissa"}, "lora_init_type pissa"),
        ({"mixed_precision": "fp8"}, "train.mixed_precision"),
        ({"report_to": "comet_ml"}, "train.report_to"),
    ],
)
def test_import_refuses_what_cannot_run_here(
    change: dict, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config, backend = write_quickstart(tmp_path, QUICKSTART_CONFIG | change, tmp_path / "images")
    result = CliRunner().invoke(app, ["import-simpletuner", str(config), str(backend)])
    assert result.exit_code == 2 and message in result.output and result.exception is not None
    assert "Traceback" not in result.output and not (tmp_path / "params.yaml").exists()


def test_trackers_and_the_eval_interval_import(tmp_path: Path) -> None:
    settings = {"report_to": "tensorboard", "eval_steps_interval": 50}
    config, backend = write_quickstart(tmp_path, QUICKSTART_CONFIG | settings, tmp_path / "images")
    params = import_config(config, backend).params
    assert (params.train.report_to, params.train.eval_steps) == ("tensorboard", 50)


def demo_images(folder: Path, minimum_train: int) -> None:
    """Photos-to-be named by their captions (caption_strategy filename), big enough for the
    quickstart's minimum_image_size of 0.25 megapixels, until the eval split has one too."""
    folder.mkdir()
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "cyan", "pink"]
    train = held_out = 0
    for i, colour in enumerate(colours * 3):
        image = Image.new("RGB", (576 + 64 * (i % 3), 512), colour)
        image.paste((i * 40 % 256, 90, 200), (40 + i * 7, 60, 300 + i * 5, 400))
        path = folder / f"a {colour} wall with a square {i}.png"
        image.save(path)
        if is_eval(hashlib.sha256(path.read_bytes()).hexdigest()[:32], 0.1, 42):
            held_out += 1
        else:
            train += 1
        if train >= minimum_train and held_out:
            return
    raise AssertionError("no eval image among the generated ones")


def test_imported_quickstart_runs_under_dvc_repro(tmp_path: Path) -> None:
    """The quickstart's own config and dataloader, with model and images pointed at local copies."""
    model = tmp_path / "sdxl-base"
    shutil.copytree(model_path(pin_model(TINY_SDXL)), model)
    demo_images(tmp_path / "pseudo-camera-10k", minimum_train=4)
    config = {k: v for k, v in QUICKSTART_CONFIG.items() if k != "model_flavour"}
    config["pretrained_model_name_or_path"] = str(model)
    project = new_project(tmp_path / "project")
    files = write_quickstart(tmp_path, config, tmp_path / "pseudo-camera-10k")
    run(["sdxl-lora", "import-simpletuner", *map(str, files), "-o", "params.yaml"], project)
    # CLIP's local copy. Sized for a CPU: fp32, as bf16 autocast on a CPU is some 40x slower
    # (BENCHMARKS.md), one step of the epoch's two, evaluate's renders at 512x512 in 4 sampling steps
    # instead of two 1 MP sizes in SimpleTuner's 30, no base-model grid at step 0 nor renders at the
    # end of train, and 4 eval timesteps (the run as imported passes too; it takes 4 minutes here).
    cpu_sized = {
        "train.mixed_precision": "no",
        "train.max_train_steps": 1,
        "validation.validation_resolution": "512x512",
        "validation.validation_num_inference_steps": 4,
        "validation.validation_steps": None,
        "train.validate_at_end": False,
        "evaluate.eval_timesteps": 4,
    }
    set_params(project, {"evaluate.clip_model": "builtin:tiny-clip", **cpu_sized})
    run(["dvc", "repro"], project)
    summary = read_json(project / "data/buckets/summary.json")
    assert summary, "bucket ran"
    plan = pq.read_table(project / "data/buckets/plan.parquet").to_pylist()
    assert {(r["target_width"], r["target_height"]) for r in plan} == {(1024, 1024)}  # 1 MP, square crops
    metadata = header(project / "models/lora" / KOHYA_WEIGHTS)
    assert metadata["ss_network_dim"] == "16" and metadata["ss_resolution"] == "(1024, 1024)"
    assert read_json(project / "metrics/evaluate/metrics.json")["eval_loss"] > 0


def test_configure_writes_params_that_validate(tmp_path: Path) -> None:
    demo_images(tmp_path / "photos", minimum_train=2)
    answers = [
        "builtin:tiny-sdxl",
        str(tmp_path / "nowhere"),
        str(tmp_path / "photos"),
        "filename",
        "512",
        "8",
    ]
    answers += ["300", "1", "2e-4", "", "a photo of a wall"]  # precision: the default, "no" on a CPU
    result = CliRunner().invoke(
        app, ["configure", "-o", str(tmp_path / "params.yaml")], input="\n".join(answers)
    )
    assert result.exit_code == 0, result.output
    assert "not a folder with images" in result.output  # the wrong folder was asked again
    params = parse_params(yaml.safe_load((tmp_path / "params.yaml").read_text()))
    assert params.train.lora_rank == 8 and params.train.max_train_steps == 300
    assert params.train.mixed_precision == ("bf16" if torch.cuda.is_available() else "no")
    assert params.download.datasets[0].source == str((tmp_path / "photos").resolve())
    assert params.bucket.resolution == 512 and params.bucket.caption_strategy == "filename"


def test_configure_warns_and_asks_before_writing_a_risky_setup(tmp_path: Path) -> None:
    demo_images(tmp_path / "photos", minimum_train=1)
    images = len(list((tmp_path / "photos").iterdir()))
    answers = ["builtin:tiny-sdxl", str(tmp_path / "photos"), "filename", "512", "8", "300"]
    answers += [str(images + 1), "0.5", "no", "a wall", "n"]
    result = CliRunner().invoke(
        app, ["configure", "-o", str(tmp_path / "params.yaml")], input="\n".join(answers)
    )
    assert result.exit_code == 1
    assert f"the datasets hold {images} images, fewer than" in result.output
    assert "learning_rate 0.5 is far outside" in result.output
    assert not (tmp_path / "params.yaml").exists()


def test_export_pushes_to_the_hub_and_the_token_stays_secret(demo_project: Path, tmp_path: Path) -> None:
    token = "hf_sdxlLoraTestToken0123456789"
    hub = HubStandIn(token)
    out = tmp_path / "dist"
    env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": token, "HF_HUB_OFFLINE": "0"}
    result = run(["sdxl-lora", "export", str(out), "--push-to-hub", "alice/demo-lora"], demo_project, **env)
    assert f"{hub.url}/alice/demo-lora/commit/0abc" in result.stdout and not hub.unknown_posts
    local = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert hub.files == local and {LORA_WEIGHTS, KOHYA_WEIGHTS, "README.md"} <= local.keys()
    assert hub.authorizations == {f"Bearer {token}"}
    assert token not in result.stdout + result.stderr
    for folder in (out, demo_project):
        assert not [p for p in folder.rglob("*") if p.is_file() and token.encode() in p.read_bytes()]
    # a wrong token: one line saying what to do, and still no token in the output
    failed = run(
        ["sdxl-lora", "export", str(out), "--push-to-hub", "alice/demo-lora"],
        demo_project,
        check=False,
        **(env | {"HF_TOKEN": "hf_wrong"}),
    )
    assert failed.returncode == 2 and "push to alice/demo-lora failed (HTTP 401)" in failed.stderr
    assert "Traceback" not in failed.stderr and "hf_wrong" not in failed.stdout + failed.stderr
