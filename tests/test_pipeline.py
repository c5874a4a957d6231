"""The whole pipeline under DVC on the demo: outputs, caching, experiments, LoRA quality, resume."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from conftest import (
    BIN,
    DEMO_STEPS,
    QUIET_TRAIN,
    copy_demo,
    new_project,
    read_json,
    read_tsv,
    run,
    set_params,
    train_here,
)
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from sdxl_lib.config import load_params
from sdxl_lib.evaluate.run import evaluate
from sdxl_lib.export import KOHYA_WEIGHTS, LORA_WEIGHTS
from sdxl_lib.sources import model_path, read_lock
from sdxl_lib.train.utils import BatchOrder
from stages.cli import build_app


def test_repro_writes_every_artifact(demo_project: Path) -> None:
    for path in [
        "data/lock.json",
        "data/buckets/plan.parquet",
        "data/buckets/skipped.parquet",
        "data/latents/index.parquet",
        "data/text/index.parquet",
        f"models/lora/{LORA_WEIGHTS}",
        "metrics/train/metrics.json",
        "metrics/train/plots/metrics/train_loss.tsv",
        "metrics/evaluate/metrics.json",
        "metrics/evaluate/eval_loss_by_timestep.json",
    ]:
        assert (demo_project / path).is_file(), path
    summary = read_json(demo_project / "data/buckets/summary.json")
    skipped = pq.read_table(demo_project / "data/buckets/skipped.parquet").to_pylist()
    plan = pq.read_table(demo_project / "data/buckets/plan.parquet")
    images = list((demo_project / "data/raw/demo").glob("*.png"))
    # Every image is either planned or reported skipped with a reason.
    originals = plan.filter(pc.invert(plan.column("flip")))
    assert originals.num_rows + len(skipped) == len(images)
    assert summary["flipped_variants"] == summary["train"]  # random_flip in the demo
    assert summary["skipped"] == {"too_small": len(skipped)} and len(skipped) > 0
    assert summary["eval"] > 0 and len(summary["buckets"]) >= 3
    grids = sorted(p.name for p in (demo_project / "metrics/train/validation").glob("*.png"))
    # the base model, then every DEMO_STEPS // 2
    assert grids == [f"step-{step:06d}.png" for step in (0, DEMO_STEPS // 2, DEMO_STEPS)]
    assert Image.open(demo_project / "metrics/train/validation" / grids[-1]).size == (256, 4 * 256)
    assert (demo_project / "metrics/bucket/contact_sheet.png").is_file()
    histogram = read_json(demo_project / "metrics/bucket/buckets.json")
    assert sum(b["images"] for b in histogram) == summary["kept"]


def test_second_repro_does_nothing(demo_project: Path) -> None:
    status = run(["dvc", "status", "--json"], demo_project)
    assert json.loads(status.stdout) == {}
    again = run(["dvc", "repro"], demo_project)
    assert "Running stage" not in again.stdout


def test_lora_beats_base_on_eval_loss(demo_project: Path) -> None:
    metrics = read_json(demo_project / "metrics/evaluate/metrics.json")
    assert metrics["eval_loss"] < 0.95 * metrics["eval_loss_base"], metrics
    assert 0 <= metrics["clip_score_min"] <= metrics["clip_score"] <= metrics["clip_score_max"] <= 100


def test_dvc_metrics_show_lists_the_metrics(demo_project: Path) -> None:
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], demo_project).stdout)
    values = {k: v for file in shown[""]["data"].values() for k, v in file["data"].items()}
    for name in ("eval_loss", "eval_loss_base", "clip_score", "clip_score_base", "final_train_loss"):
        assert name in values, name


def test_lora_loads_in_diffusers_and_changes_output(demo_project: Path) -> None:
    lock = read_json(demo_project / "data/lock.json")
    pipeline = StableDiffusionXLPipeline.from_pretrained(model_path(lock["model"]), use_safetensors=True)
    pipeline.set_progress_bar_config(disable=True)

    def generate() -> torch.Tensor:
        return pipeline(
            "a red circle on a blue background",
            height=128,
            width=128,
            num_inference_steps=4,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images

    before = generate()
    pipeline.load_lora_weights(str(demo_project / "models/lora"))
    loaded = sum("lora_A" in name for name, _ in pipeline.unet.named_parameters())
    assert loaded == len(load_file(demo_project / "models/lora" / LORA_WEIGHTS)) // 2
    assert (generate() - before).abs().max() > 1e-3


def test_eval_loss_during_training_runs_from_the_base_to_what_evaluate_reports(demo_project: Path) -> None:
    """train.eval_steps (DEMO_STEPS // 2 here) scores as evaluate does: the same held-out inputs, so the curve
    starts at the base model's eval loss and ends at the LoRA's."""
    curve = read_tsv(demo_project / "metrics/train/plots/metrics/eval_loss.tsv")
    final = read_json(demo_project / "metrics/evaluate/metrics.json")
    assert list(curve) == [0, DEMO_STEPS // 2, DEMO_STEPS]
    assert curve[0] == pytest.approx(final["eval_loss_base"], rel=1e-5)
    assert curve[DEMO_STEPS] == pytest.approx(final["eval_loss"], rel=1e-5)
    assert curve[DEMO_STEPS] != curve[0]


def test_resume_from_checkpoint_equals_uninterrupted(demo_project: Path, tmp_path: Path) -> None:
    """A rerun after a 'crash' resumes from the last checkpoint and ends bit-identical."""
    project = copy_demo(demo_project, tmp_path / "copy")
    uninterrupted = load_file(project / "models/lora" / LORA_WEIGHTS)
    eval_curve = read_tsv(project / "metrics/train/plots/metrics/eval_loss.tsv")
    checkpoints = sorted((project / "models/checkpoints").glob("checkpoint-*"))
    assert checkpoints, "the demo run should have left a mid-run checkpoint"
    shutil.rmtree(project / "models/lora")
    # What a kill can leave behind: a half-written summary and log lines past the checkpoint.
    (project / "metrics/train/metrics.json").write_text('{"train_loss": 0.9')
    with (project / "metrics/train/plots/metrics/train_loss.tsv").open("a") as log:
        log.write(f"{DEMO_STEPS}\t0.5\n{DEMO_STEPS + 1}\t0.")
    result = run(["sdxl-lora", "train"], project)
    assert f"resuming from models/checkpoints/{checkpoints[-1].name}" in result.stdout + result.stderr
    logged = (project / "metrics/train/plots/metrics/train_loss.tsv").read_text().splitlines()[1:]
    assert [int(line.split("\t")[0]) for line in logged] == list(range(DEMO_STEPS))
    # the checkpoint's step is scored again on resuming, to the same value
    assert read_tsv(project / "metrics/train/plots/metrics/eval_loss.tsv") == eval_curve
    resumed = load_file(project / "models/lora" / LORA_WEIGHTS)
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def start_training(cmd: list[str], project: Path, steps: int, **popen: object) -> subprocess.Popen[str]:
    """Start `cmd` in `project` and return once the new run has logged `steps` steps (or ended).
    Its output goes to `project/run.log` (a pipe nobody reads could fill up and stall it)."""
    losses = project / "metrics/train/plots/metrics/train_loss.tsv"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    with (project / "run.log").open("w") as log:
        process = subprocess.Popen(cmd, cwd=project, env=env, stdout=log, stderr=log, text=True, **popen)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if losses.is_file() and len(losses.read_text().splitlines()) > steps:
            break
        time.sleep(0.01)
    return process


def test_kill_9_during_dvc_repro_then_repro_gives_the_uninterrupted_lora(
    demo_project: Path, tmp_path: Path
) -> None:
    """SIGKILL the whole `dvc repro` at a random step (possibly mid-checkpoint); the next `dvc repro`
    resumes from the last complete checkpoint and ends with the same LoRA, bit for bit."""
    steps = {"train.max_train_steps": 12, "train.checkpointing_steps": 3}
    project = copy_demo(demo_project, tmp_path / "killed", {**QUIET_TRAIN, **steps})
    uninterrupted = train_here(project)
    shutil.rmtree(project / "models")
    shutil.rmtree(project / "metrics/train/plots")  # the step count below is read from the new run's log
    kill_after = random.Random().randint(4, 9)  # after the first checkpoint, well before the end
    process = start_training(["dvc", "repro", "train"], project, kill_after, start_new_session=True)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (project / "models/lora" / LORA_WEIGHTS).exists(), f"killed too late (step {kill_after})"
    result = run(["dvc", "repro", "train"], project)
    assert "resuming from models/checkpoints/checkpoint-" in result.stdout + result.stderr, kill_after
    resumed = load_file(project / "models/lora" / LORA_WEIGHTS)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted), (
        f"killed at step {kill_after}"
    )
    logged = (project / "metrics/train/plots/metrics/train_loss.tsv").read_text().splitlines()[1:]
    assert [int(line.split("\t")[0]) for line in logged] == list(range(12))


def kill_9_at_a_random_moment(cmd: list[str], project: Path, latest: float) -> float:
    """Run `cmd` in its own process group and SIGKILL the group at a random moment before it ends;
    returns the moment. A run that ends first tells how long it takes, and the next try aims inside."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    while True:
        moment, started = random.uniform(0.5, latest), time.monotonic()
        with (project / "run.log").open("w") as log:
            process = subprocess.Popen(
                cmd, cwd=project, env=env, stdout=log, stderr=log, start_new_session=True
            )
        try:
            process.wait(timeout=moment)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return moment
        latest = 0.9 * (time.monotonic() - started)


@pytest.mark.parametrize(
    ("stage", "cache", "latest"),
    [
        ("download", None, 6.0),
        ("bucket", None, 6.0),
        ("encode_latents", "data/latents", 6.0),
        ("encode_text", "data/text", 6.0),
        ("evaluate", None, 12.0),
    ],
)
def test_kill_9_in_any_stage_then_repro_gives_the_uninterrupted_outputs(
    demo_project: Path, tmp_path: Path, stage: str, cache: str | None, latest: float
) -> None:
    """Every artifact is written to a temporary name and renamed into place, and the persistent
    caches are rebuilt from whatever a killed run left: the rerun's outputs are the uninterrupted ones
    (DVC's lock records their hashes). Train has its own test above."""
    project = copy_demo(demo_project, tmp_path / stage)
    uninterrupted = (project / "dvc.lock").read_text()
    if cache:  # as on a first run, so the kill can land in the middle of writing shards
        shutil.rmtree(project / cache)
    moment = kill_9_at_a_random_moment(["dvc", "repro", "-f", "-s", stage], project, latest)
    result = run(["dvc", "repro"], project)
    # `dvc repro` completed, so the workspace holds what the lock says
    assert (project / "dvc.lock").read_text() == uninterrupted, (
        f"killed after {moment:.2f} s\n{result.stdout}"
    )


def test_nan_loss_stops_naming_the_step_and_samples_and_keeps_the_last_good_checkpoint(
    demo_project: Path, tmp_path: Path
) -> None:
    """One cached latent turned to NaN (what an fp16 VAE can produce) poisons the step that draws it."""
    steps = {"train.max_train_steps": 12, "train.checkpointing_steps": 2}
    project = copy_demo(demo_project, tmp_path / "nan", {**QUIET_TRAIN, **steps})
    for output in ("models", "metrics/train"):
        shutil.rmtree(project / output)
    cfg = load_params(project / "params.yaml").train
    rows = [
        r for r in pq.read_table(project / "data/buckets/plan.parquet").to_pylist() if r["split"] == "train"
    ]
    order = BatchOrder(rows, cfg.train_batch_size, cfg.seed)
    seen = {r["variant_id"] for r in order[0] + order[1] + order[2]}
    step = next(k for k in range(3, 12) if any(r["variant_id"] not in seen for r in order[k]))
    victim = next(r["variant_id"] for r in order[step] if r["variant_id"] not in seen)
    index = pq.read_table(project / "data/latents/index.parquet").to_pylist()
    entry = next(e for e in index if e["variant_id"] == victim)
    shard = project / "data/latents" / entry["shard"]
    tensors = load_file(shard)
    tensors[f"{entry['key']}.mean"] = torch.full_like(tensors[f"{entry['key']}.mean"], float("nan"))
    shard.unlink()  # a link into the demo's DVC cache: replace it, never write through it
    save_file(tensors, shard)

    result = run(["sdxl-lora", "train"], project, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert f"error: loss became nan at step {step + 1} (samples " in error and victim in error, error
    assert "learning_rate" in error and "fp16" in error
    assert not list((project / "models/lora").glob("*.safetensors"))
    checkpoints = sorted((project / "models/checkpoints").glob("checkpoint-*"))
    assert checkpoints[-1].name == f"checkpoint-{step // 2 * 2:06d}"
    for weights in checkpoints[-1].glob("*.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(weights).values())


def test_ctrl_c_writes_a_checkpoint_and_the_rerun_finishes_the_same(
    demo_project: Path, tmp_path: Path
) -> None:
    steps = {"train.max_train_steps": 16, "train.checkpointing_steps": 1000}
    project = copy_demo(demo_project, tmp_path / "interrupted", {**QUIET_TRAIN, **steps})
    uninterrupted = train_here(project)
    shutil.rmtree(project / "models")
    shutil.rmtree(project / "metrics/train")
    process = start_training(["sdxl-lora", "train"], project, 6)
    process.send_signal(signal.SIGINT)
    process.wait(timeout=300)
    output = (project / "run.log").read_text()
    assert process.returncode == 2, output
    assert "error: interrupted: checkpoint of step" in output and "Traceback" not in output
    assert len(list((project / "models/checkpoints").glob("checkpoint-*"))) == 1
    result = run(["sdxl-lora", "train"], project)
    assert "resuming from models/checkpoints/checkpoint-" in result.stdout + result.stderr
    resumed = load_file(project / "models/lora" / LORA_WEIGHTS)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def test_evaluate_lora_scores_any_lora_file_as_the_evaluate_stage_does(
    demo_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second evaluation of the same LoRA gives the stage's eval loss exactly; the kohya layout (what
    other trainers write) evaluated by the command gives it up to float rounding."""
    stage = read_json(demo_project / "metrics/evaluate/metrics.json")
    with monkeypatch.context() as inside:
        inside.chdir(demo_project)
        lora = demo_project / "models/lora" / LORA_WEIGHTS
        again = evaluate(
            load_params("params.yaml"), read_lock(Path("data/lock.json")), tmp_path / "again", lora
        )
    assert (again["metrics"]["eval_loss"], again["metrics"]["eval_loss_base"]) == (
        stage["eval_loss"],
        stage["eval_loss_base"],
    )
    kohya = demo_project / "models/lora" / KOHYA_WEIGHTS
    result = run(["sdxl-lora", "evaluate-lora", str(kohya), "-o", str(tmp_path / "kohya")], demo_project)
    assert "evaluate-lora lora_kohya.safetensors: eval_loss" in result.stdout
    scored = read_json(tmp_path / "kohya/metrics.json")
    assert scored["eval_loss"] == pytest.approx(stage["eval_loss"], rel=1e-5)
    assert (
        scored["eval_loss_base"] == stage["eval_loss_base"]
        and scored["eval_samples"] == stage["eval_samples"]
    )
    assert len(list((tmp_path / "kohya/images").glob("lora_*.png"))) == 4
    refused = CliRunner().invoke(build_app(), ["evaluate-lora", str(tmp_path / "lora.ckpt")])
    assert refused.exit_code == 2 and "not a .safetensors file" in refused.output


def test_preview_settings_rerun_nothing(demo_project: Path, tmp_path: Path) -> None:
    """Previews only watch a run: turning them on or pointing them elsewhere changes no artifact."""
    project = copy_demo(demo_project, tmp_path / "previews")
    previews = {
        "validation_preview": True,
        "validation_preview_steps": 5,
        "webhook_url": "http://127.0.0.1:9/",
    }
    set_params(project, {f"validation.{key}": value for key, value in previews.items()})
    assert "Data and pipelines are up to date" in run(["dvc", "status"], project).stdout


def test_changed_learning_rate_reruns_only_train_and_evaluate(demo_project: Path, tmp_path: Path) -> None:
    project = copy_demo(demo_project, tmp_path / "exp", {**QUIET_TRAIN, "train.max_train_steps": 4})
    run(["git", "add", "-A"], project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "demo run"], project)
    params = (project / "params.yaml").read_text()
    set_params(project, {"train.learning_rate": 0.0005})
    status = json.loads(run(["dvc", "status", "--json"], project).stdout)
    assert set(status) == {"train"}  # evaluate follows once train's output changes
    (project / "params.yaml").write_text(params)
    result = run(["dvc", "exp", "run", "-S", "train.learning_rate=0.0005"], project)
    ran = {line.split("'")[1] for line in result.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"train", "evaluate"}, result.stdout
    shown = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    assert "eval_loss" in json.dumps(shown)


def test_vae_cache_disable_trains_the_same_lora_as_the_cache(demo_project: Path, tmp_path: Path) -> None:
    project = copy_demo(demo_project, tmp_path / "online", {**QUIET_TRAIN, "train.max_train_steps": 6})
    cached = train_here(project)
    set_params(project, {"encode.vae_cache_disable": True})
    result = run(["dvc", "repro", "train"], project)
    assert "train and evaluate encode latents online" in result.stdout
    report = read_json(project / "metrics/encode/latents.json")
    assert report["encoded"] == 0 and report["removed"] > 0
    assert not list((project / "data/latents").glob("*.safetensors"))
    online = load_file(project / "models/lora" / LORA_WEIGHTS)
    assert online.keys() == cached.keys()
    assert all(torch.equal(online[k], cached[k]) for k in online)


def test_bf16_checkpointing_and_accumulation_train(demo_project: Path, tmp_path: Path) -> None:
    """The settings a real GPU run uses (bf16 autocast, gradient checkpointing, accumulation) train."""
    project = copy_demo(
        demo_project,
        tmp_path / "bf16",
        {
            "train.mixed_precision": "bf16",
            "train.gradient_checkpointing": True,
            "train.max_train_steps": 2,
            "train.gradient_accumulation_steps": 2,
            "validation.validation_steps": 2,
            "validation.validation_prompt": "a red circle",  # one prompt: bf16 autocast on a CPU is slow
            "validation.validation_resolution": "128x128,192x128",
            "validation.validation_num_inference_steps": 2,
            "train.eval_steps": None,  # likewise
        },
    )
    before = load_file(project / "models/lora" / LORA_WEIGHTS)
    run(["sdxl-lora", "train"], project)
    after = load_file(project / "models/lora" / LORA_WEIGHTS)
    assert all(torch.isfinite(t).all() and t.dtype == torch.float32 for t in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in after)
    assert len((project / "metrics/train/plots/metrics/train_loss.tsv").read_text().splitlines()) == 3
    grids = sorted((project / "metrics/train/validation").glob("*.png"))
    assert [g.name for g in grids] == ["step-000000.png", "step-000002.png"]
    assert Image.open(grids[-1]).size == (256 + 384, 256)  # a column per resolution


def test_text_encoder_lora_trains_and_evaluates_under_dvc(demo_project: Path, tmp_path: Path) -> None:
    """train_text_encoder with the GPU settings (bf16, gradient checkpointing); evaluate then encodes
    the captions with the LoRA's text encoders, and scores it apart from the base."""
    settings = {
        "train.train_text_encoder": True,
        "train.mixed_precision": "bf16",
        "train.gradient_checkpointing": True,
        "train.max_train_steps": 3,
    }
    project = copy_demo(demo_project, tmp_path / "text_encoder", {**QUIET_TRAIN, **settings})
    result = run(["dvc", "repro"], project)
    assert "captions are encoded online" in result.stdout
    lora = load_file(project / "models/lora" / LORA_WEIGHTS)
    assert {key.split(".", 1)[0] for key in lora} == {"unet", "text_encoder", "text_encoder_2"}
    assert all(torch.isfinite(t).all() for t in lora.values())
    metrics = read_json(project / "metrics/evaluate/metrics.json")
    assert math.isfinite(metrics["eval_loss"]) and metrics["eval_loss"] != metrics["eval_loss_base"]


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_two_process_training_matches_one_process_with_the_doubled_batch(
    demo_project: Path, tmp_path: Path, train_text_encoder: bool
) -> None:
    """`torchrun` / `accelerate launch` start a real distributed (gloo) run; the main process writes,
    and 2 processes x batch 2 train what 1 process x batch 4 does (to float tolerance: the gradient
    is summed across processes in a different order)."""
    settings = {
        "train.max_train_steps": 3,
        "train.train_batch_size": 4,
        "train.train_text_encoder": train_text_encoder,
    }
    project = copy_demo(demo_project, tmp_path / "ddp", {**QUIET_TRAIN, **settings})
    single = train_here(project)
    shutil.rmtree(project / "models")
    set_params(project, {"train.train_batch_size": 2})
    result = run(["torchrun", "--nproc_per_node", "2", "-m", "stages.train"], project)
    assert result.stdout.count("train: 3 steps on 2 process(es)") == 1
    double = load_file(project / "models/lora" / LORA_WEIGHTS)
    assert double.keys() == single.keys()
    assert any(not torch.equal(double[k], torch.zeros_like(double[k])) for k in double)
    for key in single:
        torch.testing.assert_close(double[key], single[key], atol=1e-5, rtol=1e-4)


def test_dvc_plots_show_renders_buckets_and_contact_sheet(demo_project: Path, tmp_path: Path) -> None:
    out = tmp_path / "plots"
    run(["dvc", "plots", "show", "-o", str(out)], demo_project)
    html = (out / "index.html").read_text()
    assert "Images per bucket" in html and "bar" in html  # the histogram's vega spec
    assert "contact_sheet.png" in html
    assert list(out.rglob("*contact_sheet.png"))  # the image is copied next to the page


def test_two_process_encoding_equals_one_process_byte_for_byte(demo_project: Path, tmp_path: Path) -> None:
    outputs = {}
    for processes in (1, 2):
        batches = {"encode.vae_batch_size": 3, "encode.text_batch_size": 5, "encode.shard_size_mb": 1}
        project = copy_demo(demo_project, tmp_path / f"p{processes}", batches)
        for stage in ("encode_latents", "encode_text"):
            shutil.rmtree(project / "data" / stage.removeprefix("encode_"))
            launcher = ["torchrun", "--nproc_per_node", str(processes), "-m", f"stages.{stage}"]
            # Same threads per process in both runs (torchrun gives each of several processes one):
            # CPU kernels sum in another order with another thread count.
            result = run(launcher, project, OMP_NUM_THREADS="1")
            assert f"on {processes} process(es)" in result.stdout
        outputs[processes] = {
            p.relative_to(project).as_posix(): p.read_bytes()
            for p in sorted((project / "data").glob("*/*"))
            if p.parent.name in ("latents", "text")
        }
    assert len(outputs[1]) > 4 and outputs[1] == outputs[2]


def test_adding_images_reencodes_only_them(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i in range(20):
        Image.new("RGB", (128 + 64 * (i % 3), 128), (i * 12, 80, 160)).save(
            images / f"photo_{chr(97 + i)}.png"
        )
    project = new_project(
        tmp_path / "project", {"bucket.random_flip": False, "bucket.minimum_image_size": None}
    )
    set_params(project, {"bucket.eval_fraction": 0.1})
    params = (project / "params.yaml").read_text().replace("builtin:demo", str(images))
    (project / "params.yaml").write_text(params)
    run(["dvc", "repro", "encode_latents", "encode_text"], project)
    assert read_json(project / "metrics/encode/latents.json")["encoded"] == 20
    for i in (20, 21):
        Image.new("RGB", (128, 192), (i * 12, 10, 10)).save(images / f"photo_{chr(97 + i)}.png")
    run(["dvc", "repro", "-f", "download"], project)
    run(["dvc", "repro", "encode_latents", "encode_text"], project)
    assert read_json(project / "metrics/encode/latents.json") == {"encoded": 2, "reused": 20, "removed": 0}
    assert read_json(project / "metrics/encode/text.json")["encoded"] == 2


def test_changed_library_code_reruns_its_stage(demo_project: Path, tmp_path: Path) -> None:
    project = copy_demo(demo_project, tmp_path / "code")
    with (project / "sdxl_lib/evaluate/clip_score.py").open("a") as source:
        source.write("\n# a changed line\n")
    status = json.loads(run(["dvc", "status", "--json"], project).stdout)
    assert set(status) == {"evaluate"}
