"""The training loop, in one place, top to bottom (nanoGPT style: options change values only)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import is_tensorboard_available, is_wandb_available
from diffusers import StableDiffusionXLPipeline
from diffusers.optimization import get_scheduler
from dvclive import Live
from peft.utils import set_peft_model_state_dict
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.profiler import record_function
from tqdm import tqdm
from transformers import CLIPTokenizer

from sdxl_lib import paths
from sdxl_lib.cache.latents import LatentCache, OnlineLatents, open_latents
from sdxl_lib.cache.shards import INDEX, prefetched
from sdxl_lib.cache.text import TextCache, encode_prompts
from sdxl_lib.config import Params, TrainParams, ValidationParams
from sdxl_lib.distributed import cpu_launch
from sdxl_lib.errors import UserError
from sdxl_lib.evaluate.eval_loss import conditioning_of, eval_loss_by_timestep, eval_timesteps
from sdxl_lib.evaluate.images import generate_validation_images, image_grid
from sdxl_lib.evaluate.previews import Previews, Webhook
from sdxl_lib.export import lora_state, save_lora, save_widget_images, write_card
from sdxl_lib.interop.metadata import training_metadata
from sdxl_lib.io import write_png, write_text
from sdxl_lib.models.loading import (
    latent_scaling,
    load_noise_scheduler,
    load_pipeline,
    load_preview_decoder,
    load_text_encoders,
    load_unet,
)
from sdxl_lib.train.lora import load_init_lora, lora_config
from sdxl_lib.train.optimizers import make_optimizer, set_optimizer_mode
from sdxl_lib.train.utils import (
    BatchOrder,
    derived_seed,
    draw_noise,
    draw_timestep,
    per_sample_loss,
    sample_posterior,
    snr,
    snr_loss_weights,
    time_ids,
    timestep_weights,
    training_target,
    unet_prediction,
)

TRACKER_AVAILABLE = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
WEIGHT_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def run_fingerprint(params: Params, lock: dict[str, Any]) -> str:
    """What a checkpoint must match to be resumed: train params, base model and cached inputs."""
    digest = hashlib.sha256(params.train.model_dump_json().encode())
    digest.update(params.encode.model_dump_json().encode())
    if params.train.init_lora and Path(params.train.init_lora).is_file():  # a missing one: load's error
        digest.update(Path(params.train.init_lora).read_bytes())
    digest.update(json.dumps(lock["model"], sort_keys=True).encode())
    for index in (paths.LATENTS / INDEX, paths.TEXT / INDEX, paths.PLAN):
        digest.update(index.read_bytes())
    return digest.hexdigest()


def latest_checkpoint(fingerprint: str) -> Path | None:
    """The newest complete checkpoint of this very run, if a crashed run left one."""
    if not paths.CHECKPOINTS.is_dir():
        return None
    for candidate in sorted(paths.CHECKPOINTS.glob("checkpoint-*"), reverse=True):
        state = candidate / "state.json"
        if state.is_file() and json.loads(state.read_text())["fingerprint"] == fingerprint:
            return candidate
    return None


def save_checkpoint(
    models: dict[str, torch.nn.Module],
    optimizer: Any,
    lr_scheduler: Any,
    ema: list[torch.Tensor] | None,
    step: int,
    fingerprint: str,
    keep: int,
) -> None:
    """Write into a temporary folder and rename, so a checkpoint on disk is never half written."""
    paths.CHECKPOINTS.mkdir(parents=True, exist_ok=True)
    for stale in paths.CHECKPOINTS.glob(".tmp-*"):  # a checkpoint being written when a run was killed
        shutil.rmtree(stale)
    tmp = Path(tempfile.mkdtemp(dir=paths.CHECKPOINTS, prefix=".tmp-"))
    for name, model in models.items():
        save_file(lora_state(model), str(tmp / f"{name}.safetensors"))
    if ema is not None:
        save_file({str(i): t.cpu() for i, t in enumerate(ema)}, str(tmp / "ema.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "fingerprint": fingerprint}))
    os.replace(tmp, paths.CHECKPOINTS / f"checkpoint-{step:06d}")
    for old in sorted(paths.CHECKPOINTS.glob("checkpoint-*"))[:-keep]:
        shutil.rmtree(old)


def batch_inputs(
    batch: list[dict],
    generators: list[torch.Generator],
    latents: LatentCache | OnlineLatents,
    texts: TextCache | None,
    scaling: tuple[float, float],
    caption_dropout_probability: float = 0.0,
) -> dict[str, Any]:
    """A batch's clean UNet inputs on the CPU: a fresh draw from each cached posterior, scaled as the
    VAE says, its captions (empty when dropped) with their cached conditioning (unless `texts` is
    None: train_text_encoder encodes them itself) and SDXL time ids. Each sample's random draws come
    from its own generator."""
    scale, shift = scaling
    model_input, captions = [], []
    for row, generator in zip(batch, generators, strict=True):
        model_input.append(sample_posterior(*latents.posterior(row["variant_id"]), generator))
        dropped = torch.rand((), generator=generator).item() < caption_dropout_probability
        captions.append("" if dropped else row["caption"])
    inputs: dict[str, Any] = {
        "model_input": (torch.stack(model_input) - shift) * scale,
        "time_ids": torch.stack([time_ids(row) for row in batch]),
        "captions": captions,
    }
    if texts is not None:
        embeds = [texts.embeds(caption) for caption in captions]
        inputs["prompt_embeds"] = torch.stack([e[0] for e in embeds])
        inputs["pooled_prompt_embeds"] = torch.stack([e[1] for e in embeds])
    return inputs


def total_steps(cfg: TrainParams, order: BatchOrder) -> int:
    """`max_train_steps`, or `num_train_epochs` epochs of optimizer steps (each one takes
    `gradient_accumulation_steps` batches per process)."""
    if cfg.max_train_steps:
        return cfg.max_train_steps
    return cfg.num_train_epochs * math.ceil(order.epoch_length(0) / cfg.gradient_accumulation_steps)


def train(params: Params, lock: dict[str, Any]) -> dict[str, float] | None:
    """Train the LoRA; returns a summary on the main process and None on the others."""
    cfg = params.train
    if cfg.report_to != "none" and not TRACKER_AVAILABLE[cfg.report_to]():
        raise UserError(
            f"train.report_to {cfg.report_to}: the {cfg.report_to} package is not installed; "
            "pip install 'sdxl-lora[trackers]' or set report_to: none"
        )
    fingerprint = run_fingerprint(params, lock)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        cpu=cpu_launch(),
        # Text encoder 1's last layer feeds nothing SDXL uses (it takes the penultimate hidden
        # states), so its LoRA gets no gradient; DDP must be told to expect that.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.train_text_encoder)],
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_dir=paths.TRACKER_LOGS / "tensorboard" / fingerprint[:12],  # a resumed run continues it
    )
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    dtype = WEIGHT_DTYPES[cfg.mixed_precision]

    # Data: the cached latents (or the VAE, with vae_cache_disable) and text embeds of the train
    # split, read lazily from shards. Each step's global batch of train_batch_size x processes comes
    # from one bucket; process r takes every r-th sample, so N processes see what one process with
    # N times the batch would.
    plan = pq.read_table(paths.PLAN).to_pylist()
    rows = [r for r in plan if r["split"] == "train"]
    eval_rows = [r for r in plan if r["split"] == "eval"] if cfg.eval_steps else []
    if cfg.eval_steps and not eval_rows:
        raise UserError("train.eval_steps needs held-out images: set bucket.eval_fraction above 0")
    if not any(r["probability"] > 0 for r in rows):
        raise UserError("every dataset has probability 0: raise bucket probability for at least one")
    if len(rows) < cfg.train_batch_size:
        raise UserError(
            f"train.train_batch_size is {cfg.train_batch_size} but the train split has only "
            f"{len(rows)} images; lower the batch size or add images"
        )
    latents = open_latents(params.encode, lock, rows + eval_rows, device)
    texts = None if cfg.train_text_encoder else TextCache.open(paths.TEXT)
    order = BatchOrder(rows, cfg.train_batch_size * world, cfg.seed)
    max_steps = total_steps(cfg, order)
    scaling = latent_scaling(lock)

    # Model: the frozen U-Net (and text encoders, with train_text_encoder) in the compute dtype,
    # LoRA weights in fp32. `models` holds what is trained, by pipeline component name.
    noise_scheduler = load_noise_scheduler(lock, **cfg.scheduler_overrides)
    prediction_type = noise_scheduler.config.prediction_type
    probabilities = timestep_weights(
        noise_scheduler.config.num_train_timesteps,
        cfg.timestep_bias_strategy,
        cfg.timestep_bias_multiplier,
        cfg.timestep_bias_begin,
        cfg.timestep_bias_end,
        cfg.timestep_bias_portion,
    )
    models: dict[str, torch.nn.Module] = {"unet": load_unet(lock, dtype).requires_grad_(False)}
    tokenizers: list[CLIPTokenizer] = []
    if cfg.train_text_encoder:
        tokenizers, encoders = load_text_encoders(lock, dtype)
        models.update(text_encoder=encoders[0], text_encoder_2=encoders[1])
        accelerator.print(
            "train: train_text_encoder is on, so captions are encoded online by the text encoders "
            "being trained (the text cache is not read)"
        )
    torch.manual_seed(cfg.seed)  # LoRA init
    allow_pickle = params.model.allow_pickle_weights
    loaded = load_init_lora(models, cfg.init_lora, allow_pickle) if cfg.init_lora else set()
    if loaded:
        accelerator.print(f"train: continuing from {cfg.init_lora} (its rank, alpha and targets)")
    for name, model in models.items():
        if name not in loaded:
            model.add_adapter(lora_config(cfg, text_encoder=name != "unet"))
    trainable = {name: [p for p in model.parameters() if p.requires_grad] for name, model in models.items()}
    lora_params = [p for params in trainable.values() for p in params]
    for p in lora_params:
        p.data = p.data.float()
    # PiSSA/OLoRA start from the base weights; the export needs that start to undo it.
    initial = (
        {name: {k: v.clone() for k, v in lora_state(m).items()} for name, m in models.items()}
        if cfg.lora_init_type in ("pissa", "olora")
        else None
    )
    ema = [p.detach().clone() for p in lora_params] if cfg.use_ema else None
    if cfg.gradient_checkpointing:
        for name, model in models.items():
            if name == "unet":
                model.enable_gradient_checkpointing()
            else:  # non-reentrant: the frozen embeddings give the LoRA layers no grad-requiring input
                model.gradient_checkpointing_enable({"use_reentrant": False})
    groups = [{"params": trainable["unet"]}]
    if cfg.train_text_encoder:
        encoder_params = trainable["text_encoder"] + trainable["text_encoder_2"]
        groups.append({"params": encoder_params, "lr": cfg.text_encoder_lr or cfg.learning_rate})
    optimizer = make_optimizer(cfg, groups, device)
    # Stepped once per optimizer step by hand (not prepared), so its count is the step count.
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler,
        optimizer,
        num_warmup_steps=cfg.lr_warmup_steps,
        num_training_steps=max_steps,
        num_cycles=cfg.lr_num_cycles,
        power=cfg.lr_power,
    )
    *prepared, optimizer = accelerator.prepare(*models.values(), optimizer)
    models = dict(zip(models, prepared, strict=True))  # DDP-wrapped when distributed
    # train_text_encoder: the conditioning is trained too, so captions go through these each step
    text_encoders = [models["text_encoder"], models["text_encoder_2"]] if tokenizers else []
    unwrapped = {name: accelerator.unwrap_model(model) for name, model in models.items()}

    # Resume automatically from a checkpoint of this same run (e.g. `dvc repro` after a crash).
    start_step = 0
    checkpoint = latest_checkpoint(fingerprint)
    if checkpoint is not None:
        for name, model in unwrapped.items():
            set_peft_model_state_dict(model, load_file(checkpoint / f"{name}.safetensors"))
        optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
        lr_scheduler.load_state_dict(torch.load(checkpoint / "lr_scheduler.pt", weights_only=True))
        if ema is not None:
            saved = load_file(checkpoint / "ema.safetensors")
            ema = [saved[str(i)].to(device) for i in range(len(ema))]
        start_step = json.loads((checkpoint / "state.json").read_text())["step"]
        accelerator.print(f"resuming from {checkpoint} (step {start_step})")
    elif accelerator.is_main_process:
        shutil.rmtree(paths.CHECKPOINTS, ignore_errors=True)
        shutil.rmtree(paths.TRAIN_METRICS, ignore_errors=True)
        paths.CHECKPOINTS.mkdir(parents=True)  # a DVC output even when the run is too short for one
    if start_step > 0 and accelerator.is_main_process:
        trim_train_log(start_step)
    live = (
        Live(str(paths.TRAIN_METRICS), dvcyaml=None, save_dvc_exp=False, resume=start_step > 0)
        if accelerator.is_main_process
        else None
    )
    if live is not None:
        live.step = start_step
    if cfg.report_to != "none":
        start_tracker(accelerator, params, fingerprint)

    def log(values: dict[str, float]) -> None:
        """DVCLive (at its current step) and the report_to tracker."""
        if live is not None:
            for name, value in values.items():
                live.log_metric(name, value)
            accelerator.log(values, step=live.step)

    # Eval loss during training: evaluate's timesteps, noise and held-out split, so the curve ends at
    # the number `evaluate` reports. It draws from its own generators; training's are untouched.
    timesteps_to_eval = eval_timesteps(noise_scheduler, params.evaluate.eval_timesteps)
    encoders = [unwrapped["text_encoder"], unwrapped["text_encoder_2"]] if tokenizers else []
    conditioning = conditioning_of(texts, tokenizers, encoders)

    def log_eval_loss(step: int) -> None:
        """The eval loss of the weights after `step` steps (the base model's at step 0)."""
        if live is None or not cfg.eval_steps or (step % cfg.eval_steps and step != max_steps):
            return
        base = without_adapters(unwrapped.values()) if step == 0 else nullcontext()
        with evaluating(models.values(), optimizer, lora_params), base, accelerator.autocast():
            by_timestep = eval_loss_by_timestep(
                unwrapped["unet"],
                noise_scheduler,
                eval_rows,
                latents,
                conditioning,
                scaling,
                timesteps_to_eval,
                params.evaluate.eval_seed,
                params.evaluate.eval_batch_size,
            )
        log({"eval_loss": by_timestep.mean().item()})

    # Validation images every validation_steps (base model at step 0) and at the end, main process only.
    validation = params.validation
    pipeline, previews = None, None
    final_images: list[tuple[str, Image.Image]] = []  # the last validation, for the model card
    if accelerator.is_main_process and (validation.validation_steps or cfg.validate_at_end):
        # The frozen text encoders and VAE stay on the device all run: in the weights' dtype (bf16)
        # full-size SDXL's take 1.7 GiB instead of fp32's 3.4 (BENCHMARKS.md, memory plan).
        pipeline = load_pipeline(lock, dtype, scheduler_overrides=cfg.scheduler_overrides, **unwrapped)
        pipeline.to(device)
        if validation.validation_preview:
            decoder = load_preview_decoder(validation.validation_preview_model).to(device)
            previews = Previews(
                decoder, validation.validation_preview_steps, Webhook(str(validation.webhook))
            )
        if validation.validation_steps and start_step == 0:
            with without_adapters(unwrapped.values()):
                save_validation_grid(pipeline, validation, 0, accelerator, previews)

    accumulation = cfg.gradient_accumulation_steps
    pin = device.type == "cuda"

    def micro_batch(position: int) -> dict[str, Any]:
        """Everything micro-batch `position` feeds the model: noisy input, timesteps, target, loss
        weights and conditioning. Every random draw comes from a generator of (seed, position,
        sample), never from RNG history, so resuming at any step is exact, N processes draw what one
        would, and batches can be made ahead on a thread; pinned, their copy to the GPU is async."""
        with record_function("data_prefetch"):
            global_batch, samples = order[position], range(rank, cfg.train_batch_size * world, world)
            generators = [torch.Generator().manual_seed(derived_seed(cfg.seed, position, j)) for j in samples]
            inputs = batch_inputs(
                [global_batch[j] for j in samples],
                generators,
                latents,
                texts,
                scaling,
                cfg.caption_dropout_probability,
            )
            clean = inputs.pop("model_input")
            noise = torch.stack(
                [
                    draw_noise(clean.shape[1:], g, cfg.noise_offset, cfg.noise_offset_probability)
                    for g in generators
                ]
            )
            timesteps = torch.cat([draw_timestep(g, probabilities) for g in generators])
            # input_perturbation noises the input more than the target says (drawn only when on)
            input_noise = (
                noise
                + cfg.input_perturbation
                * torch.stack([torch.randn(clean.shape[1:], generator=g) for g in generators])
                if cfg.input_perturbation
                else noise
            )
            inputs.update(
                noisy=noise_scheduler.add_noise(clean, input_noise, timesteps),
                timesteps=timesteps,
                target=training_target(noise_scheduler, clean, noise, timesteps),
                weights=(
                    snr_loss_weights(snr(noise_scheduler, timesteps), cfg.snr_gamma, prediction_type)
                    if cfg.snr_gamma
                    else torch.ones(len(timesteps))
                ),
            )
            return {k: v.pin_memory() if pin and torch.is_tensor(v) else v for k, v in inputs.items()}

    log_eval_loss(start_step)
    # Up to two micro-batches are made ahead on threads, so the model does not wait for data.
    micro_batches = prefetched(micro_batch, range(start_step * accumulation, max_steps * accumulation), 2)
    set_training(models.values(), optimizer, True)
    loss_value = float("nan")
    started = time.perf_counter()
    side_seconds = 0.0  # eval loss, validation and checkpoints: timed apart from the steps' rate
    interrupt = checkpoint_on_first_sigint()
    progress = tqdm(
        range(start_step, max_steps),
        desc="train",
        unit="step",
        initial=start_step,
        total=max_steps,
        disable=not accelerator.is_main_process,
    )
    for step in progress:
        step_loss = torch.zeros((), device=device)
        for micro in range(accumulation):
            with record_function("data"):  # labels for bench/train_step.py's profile
                inputs = {
                    k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                    for k, v in next(micro_batches).items()
                }
                torch.manual_seed(derived_seed(cfg.seed, "dropout", step * accumulation + micro, rank))

            with accelerator.accumulate(*models.values()), accelerator.autocast():
                with record_function("forward"):
                    if text_encoders:
                        prompt_embeds, pooled = encode_prompts(tokenizers, text_encoders, inputs["captions"])
                    else:
                        prompt_embeds, pooled = inputs["prompt_embeds"], inputs["pooled_prompt_embeds"]
                    prediction = unet_prediction(
                        models["unet"],
                        inputs["noisy"],
                        inputs["timesteps"],
                        prompt_embeds,
                        pooled,
                        inputs["time_ids"],
                        dtype,
                    )
                    per_sample = per_sample_loss(prediction, inputs["target"], cfg.loss_type, cfg.huber_c)
                    loss = (per_sample * inputs["weights"]).mean()
                with record_function("backward"):
                    accelerator.backward(loss)
                with record_function("optimizer"):
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(lora_params, cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            step_loss += loss.detach() / accumulation
        lr_scheduler.step()
        if ema is not None:
            torch._foreach_lerp_(ema, [p.detach() for p in lora_params], 1 - cfg.ema_decay)

        # One sync per step, for the log and for an interrupt seen by any process.
        stats = torch.stack([step_loss, torch.tensor(float(interrupt.is_set()), device=device)])
        loss_value, interrupted = accelerator.reduce(stats, reduction="mean").tolist()
        if not math.isfinite(loss_value):
            batch = [row["variant_id"] for m in range(accumulation) for row in order[step * accumulation + m]]
            raise UserError(
                f"loss became {loss_value} at step {step + 1} (samples {', '.join(batch)}); lower "
                "train.learning_rate, use mixed_precision bf16 or no, and if the latents came from an fp16 "
                "VAE use encode.vae_dtype fp32 or madebyollin/sdxl-vae-fp16-fix; no LoRA was exported and "
                "the last good checkpoint is kept"
            )
        progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")
        log({"train_loss": loss_value, "lr": lr_scheduler.get_last_lr()[0]})
        if live is not None:
            live.next_step()
        done = step + 1
        side_started = time.perf_counter()
        log_eval_loss(done)
        due = validation.validation_steps and done % validation.validation_steps == 0
        if pipeline is not None and (due or (done == max_steps and cfg.validate_at_end)):
            with evaluating(models.values(), optimizer, lora_params):
                images = save_validation_grid(pipeline, validation, done, accelerator, previews)
            if done == max_steps:  # the card shows what the exported weights make, nothing earlier
                final_images = images
        stopping = interrupted > 0 and done < max_steps
        if (done % cfg.checkpointing_steps == 0 or stopping) and done < max_steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_checkpoint(
                    unwrapped,
                    optimizer,
                    lr_scheduler,
                    ema,
                    done,
                    fingerprint,
                    cfg.checkpoints_total_limit,
                )
        side_seconds += time.perf_counter() - side_started
        if stopping:
            raise UserError(
                f"interrupted: checkpoint of step {done} saved in {paths.CHECKPOINTS}; "
                "run the stage (or dvc repro) again to resume"
            )

    signal.signal(signal.SIGINT, signal.default_int_handler)
    accelerator.wait_for_everyone()
    train_seconds = time.perf_counter() - started
    set_training(models.values(), optimizer, False)  # schedule-free: export the averaged weights
    if accelerator.is_main_process:
        epochs = math.ceil(max_steps / math.ceil(order.epoch_length(0) / accumulation))
        metadata = training_metadata(params, rows, max_steps, epochs)
        shutil.rmtree(paths.LORA, ignore_errors=True)
        save_lora(unwrapped, paths.LORA, initial, cfg.lora_format, metadata)
        if ema is not None:
            with swapped_in(lora_params, ema):
                save_lora(unwrapped, paths.LORA / "ema", initial, cfg.lora_format, metadata)
        widget = save_widget_images(final_images, paths.LORA)
        write_card(paths.LORA, widget, {"final_train_loss": loss_value}, validation.validation_guidance)
        paths.VALIDATION_IMAGES.mkdir(parents=True, exist_ok=True)  # a DVC output, even if left empty
        assert live is not None
        live.summary["final_train_loss"] = loss_value
        live.end()
    accelerator.end_training()
    if not accelerator.is_main_process:
        return None
    return {
        "final_train_loss": loss_value,
        "steps": max_steps - start_step,
        "train_seconds": train_seconds,
        "step_seconds": train_seconds - side_seconds,
        "processes": world,
    }


def start_tracker(accelerator: Accelerator, params: Params, fingerprint: str) -> None:
    """TensorBoard or W&B through accelerate, with the train params as the run's config (scalars
    only: TensorBoard's hparams need them). One run per fingerprint, so a resumed run continues it."""
    config = {
        name: value if isinstance(value, int | float | str | bool) else str(value)
        for name, value in params.train.model_dump().items()
    }
    run = {"dir": str(paths.TRACKER_LOGS), "id": fingerprint[:12], "resume": "allow"}
    login_errors: tuple[type[Exception], ...] = ()
    if params.train.report_to == "wandb":
        from wandb.errors import UsageError  # installed: train checked at start

        login_errors = (UsageError,)
    try:
        accelerator.init_trackers("sdxl-lora", config=config, init_kwargs={"wandb": run})
    except login_errors as err:
        raise UserError(
            f"train.report_to wandb: {err} Or set WANDB_MODE=offline (and `wandb sync` later), "
            "or report_to: none"
        ) from None


def trim_train_log(start_step: int) -> None:
    """Before resuming: drop the logged steps the checkpoint does not cover (and a line cut short by
    a kill), and the summary file, which a kill can leave half written; DVCLive rewrites it."""
    for table in (paths.TRAIN_METRICS / "plots" / "metrics").glob("*.tsv"):
        header, *lines = table.read_text().splitlines(keepends=True)
        kept = [line for line in lines if line.endswith("\n") and int(line.split("\t")[0]) < start_step]
        write_text(header + "".join(kept), table)
    (paths.TRAIN_METRICS / "metrics.json").unlink(missing_ok=True)


def checkpoint_on_first_sigint() -> threading.Event:
    """The first Ctrl-C asks the loop to finish its step, write a checkpoint and stop; a second one
    interrupts at once."""
    requested = threading.Event()

    def handler(signum: int, frame: object) -> None:
        requested.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("\ntrain: interrupted; writing a checkpoint after this step (Ctrl-C again to quit now)")

    signal.signal(signal.SIGINT, handler)
    return requested


def save_validation_grid(
    pipeline: StableDiffusionXLPipeline,
    validation: ValidationParams,
    step: int,
    accelerator: Accelerator,
    previews: Previews | None = None,
) -> list[tuple[str, Image.Image]]:
    """metrics/train/validation/step-NNNNNN.png: a row per prompt, a column per resolution; returns
    the (prompt, image) pairs. The pipeline draws from its own seeded generators, so training's
    random numbers are untouched."""
    with torch.no_grad(), accelerator.autocast():
        images = generate_validation_images(pipeline, validation, previews, step)
    paths.VALIDATION_IMAGES.mkdir(parents=True, exist_ok=True)
    grid = image_grid([image for _, image in images], len(validation.sizes))
    write_png(grid, paths.VALIDATION_IMAGES / f"step-{step:06d}.png")
    return images


def set_training(models: Iterable[torch.nn.Module], optimizer: torch.optim.Optimizer, training: bool) -> None:
    """Train or eval mode for the trained models and the optimizer (schedule-free has both)."""
    for model in models:
        model.train(training)
    set_optimizer_mode(optimizer, training)


@contextmanager
def evaluating(
    models: Iterable[torch.nn.Module], optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]
) -> Iterator[None]:
    """Eval mode for a look at the model (dropout off; schedule-free's averaged weights), after which
    training goes on from exactly the weights it left: schedule-free's switch back is not exact in
    floats, so looking would otherwise change the LoRA."""
    models = list(models)
    kept = [p.detach().clone() for p in params]
    set_training(models, optimizer, False)
    try:
        yield
    finally:
        set_training(models, optimizer, True)
        for p, value in zip(params, kept, strict=True):
            p.data.copy_(value)


@contextmanager
def without_adapters(models: Iterable[torch.nn.Module]) -> Iterator[None]:
    """The base model, for step-0 images (an adapter may not start as a no-op: gaussian, PiSSA)."""
    models = list(models)
    for model in models:
        model.disable_adapters()
    try:
        yield
    finally:
        for model in models:
            model.enable_adapters()


@contextmanager
def swapped_in(params: list[torch.nn.Parameter], values: list[torch.Tensor]) -> Iterator[None]:
    """Temporarily give `params` other values (the EMA weights, to save them)."""
    kept = [p.data for p in params]
    for p, value in zip(params, values, strict=True):
        p.data = value
    try:
        yield
    finally:
        for p, value in zip(params, kept, strict=True):
            p.data = value
