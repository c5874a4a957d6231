"""The training loop, in one place, top to bottom (nanoGPT style: options change values only)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from dvclive import Live
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from sdxl_lib import paths
from sdxl_lib.cache.latents import LatentCache, OnlineLatents, open_latents
from sdxl_lib.cache.shards import INDEX
from sdxl_lib.cache.text import TextCache
from sdxl_lib.config import Params
from sdxl_lib.distributed import cpu_launch
from sdxl_lib.errors import UserError
from sdxl_lib.evaluate.images import generate_validation_images, save_images
from sdxl_lib.export import save_unet_lora
from sdxl_lib.models.loading import latent_scaling, load_noise_scheduler, load_pipeline, load_unet
from sdxl_lib.train.utils import BatchOrder, derived_seed, sample_posterior, time_ids, training_target

WEIGHT_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def run_fingerprint(params: Params, lock: dict[str, Any]) -> str:
    """What a checkpoint must match to be resumed: train params, base model and cached inputs."""
    digest = hashlib.sha256(params.train.model_dump_json().encode())
    digest.update(params.encode.model_dump_json().encode())
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
    unet: torch.nn.Module, optimizer: Any, lr_scheduler: Any, step: int, fingerprint: str, keep: int
) -> None:
    """Write into a temporary folder and rename, so a checkpoint on disk is never half written."""
    paths.CHECKPOINTS.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=paths.CHECKPOINTS, prefix=".tmp-"))
    save_file(get_peft_model_state_dict(unet), str(tmp / "lora.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "fingerprint": fingerprint}))
    os.replace(tmp, paths.CHECKPOINTS / f"checkpoint-{step:06d}")
    for old in sorted(paths.CHECKPOINTS.glob("checkpoint-*"))[:-keep]:
        shutil.rmtree(old)


def batch_inputs(
    batch: list[dict],
    latents: LatentCache | OnlineLatents,
    texts: TextCache,
    generator: torch.Generator,
    scaling: tuple[float, float],
) -> dict[str, torch.Tensor]:
    """A batch's UNet inputs on the CPU: a fresh draw from each cached posterior, scaled as the VAE
    says, with its text conditioning and SDXL time ids."""
    scale, shift = scaling
    posteriors = [latents.posterior(row["variant_id"]) for row in batch]
    model_input = torch.stack([sample_posterior(mean, std, generator) for mean, std in posteriors])
    embeds = [texts.embeds(row["caption"]) for row in batch]
    return {
        "model_input": (model_input - shift) * scale,
        "prompt_embeds": torch.stack([e[0] for e in embeds]),
        "pooled_prompt_embeds": torch.stack([e[1] for e in embeds]),
        "time_ids": torch.stack([time_ids(row) for row in batch]),
    }


def train(params: Params, lock: dict[str, Any]) -> dict[str, float] | None:
    """Train the LoRA; returns a summary on the main process and None on the others."""
    cfg = params.train
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        cpu=cpu_launch(),
    )
    rank, world = accelerator.process_index, accelerator.num_processes

    # Data: the cached latents (or the VAE, with vae_cache_disable) and text embeds of the train
    # split, read lazily from shards.
    rows = [r for r in pq.read_table(paths.PLAN).to_pylist() if r["split"] == "train"]
    if not any(r["probability"] > 0 for r in rows):
        raise UserError("every dataset has probability 0: raise bucket probability for at least one")
    if len(rows) < cfg.train_batch_size:
        raise UserError(
            f"train.train_batch_size is {cfg.train_batch_size} but the train split has only "
            f"{len(rows)} images; lower the batch size or add images"
        )
    latents = open_latents(params.encode, lock, rows, accelerator.device)
    texts = TextCache.open(paths.TEXT)
    order = BatchOrder(rows, cfg.train_batch_size, cfg.seed)
    scaling = latent_scaling(lock)

    # Model: frozen UNet in the compute dtype, LoRA weights in fp32.
    noise_scheduler = load_noise_scheduler(lock)
    unet = load_unet(lock, WEIGHT_DTYPES[cfg.mixed_precision]).requires_grad_(False)
    torch.manual_seed(cfg.seed)  # LoRA init
    unet.add_adapter(
        LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha or cfg.lora_rank,
            lora_dropout=cfg.lora_dropout,
            init_lora_weights="gaussian",
            target_modules=cfg.lora_target_modules,
        )
    )
    lora_params = [p for p in unet.parameters() if p.requires_grad]
    for p in lora_params:
        p.data = p.data.float()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(
        lora_params,
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay,
        eps=cfg.adam_epsilon,
    )
    # Stepped once per optimizer step by hand (not prepared), so its count is the step count.
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler,
        optimizer,
        num_warmup_steps=cfg.lr_warmup_steps,
        num_training_steps=cfg.max_train_steps,
    )
    unet, optimizer = accelerator.prepare(unet, optimizer)

    # Resume automatically from a checkpoint of this same run (e.g. `dvc repro` after a crash).
    fingerprint = run_fingerprint(params, lock)
    start_step = 0
    checkpoint = latest_checkpoint(fingerprint)
    if checkpoint is not None:
        set_peft_model_state_dict(accelerator.unwrap_model(unet), load_file(checkpoint / "lora.safetensors"))
        optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
        lr_scheduler.load_state_dict(torch.load(checkpoint / "lr_scheduler.pt", weights_only=True))
        start_step = json.loads((checkpoint / "state.json").read_text())["step"]
        accelerator.print(f"resuming from {checkpoint} (step {start_step})")
    elif accelerator.is_main_process:
        shutil.rmtree(paths.CHECKPOINTS, ignore_errors=True)
        shutil.rmtree(paths.TRAIN_METRICS, ignore_errors=True)
        paths.CHECKPOINTS.mkdir(parents=True)  # a DVC output even when the run is too short for one
    live = (
        Live(str(paths.TRAIN_METRICS), dvcyaml=None, save_dvc_exp=False, resume=start_step > 0)
        if accelerator.is_main_process
        else None
    )
    if live is not None:
        live.step = start_step

    unet.train()
    loss_value = float("nan")
    progress = tqdm(
        range(start_step, cfg.max_train_steps),
        desc="train",
        unit="step",
        initial=start_step,
        total=cfg.max_train_steps,
        disable=not accelerator.is_main_process,
    )
    for step in progress:
        step_loss = torch.zeros((), device=accelerator.device)
        for micro in range(cfg.gradient_accumulation_steps):
            # Every random draw is derived from (seed, position, process), never from RNG history.
            position = step * cfg.gradient_accumulation_steps + micro
            generator = torch.Generator().manual_seed(derived_seed(cfg.seed, position, rank))
            torch.manual_seed(derived_seed(cfg.seed, "dropout", position, rank))
            batch = order[position * world + rank]
            inputs = batch_inputs(batch, latents, texts, generator, scaling)
            model_input, prompt_embeds, pooled, add_time_ids = (
                inputs[name].to(accelerator.device)
                for name in ("model_input", "prompt_embeds", "pooled_prompt_embeds", "time_ids")
            )
            noise = torch.randn(model_input.shape, generator=generator).to(accelerator.device)
            timesteps = torch.randint(
                0, noise_scheduler.config.num_train_timesteps, (len(batch),), generator=generator
            ).to(accelerator.device)
            noisy = noise_scheduler.add_noise(model_input, noise, timesteps)
            target = training_target(noise_scheduler, model_input, noise, timesteps)

            with accelerator.accumulate(unet), accelerator.autocast():
                dtype = WEIGHT_DTYPES[cfg.mixed_precision]
                prediction = unet(
                    noisy.to(dtype),
                    timesteps,
                    prompt_embeds.to(dtype),
                    added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": add_time_ids.to(dtype)},
                ).sample
                loss = F.mse_loss(prediction.float(), target.float())
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(lora_params, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += loss.detach() / cfg.gradient_accumulation_steps
        lr_scheduler.step()

        loss_value = accelerator.reduce(step_loss, reduction="mean").item()
        if not torch.isfinite(torch.tensor(loss_value)):
            raise UserError(
                f"loss became {loss_value} at step {step + 1}; lower train.learning_rate or use "
                "mixed_precision: bf16/no (the last good checkpoint is kept)"
            )
        progress.set_postfix(loss=f"{loss_value:.4f}")
        if live is not None:
            live.log_metric("train_loss", loss_value)
            live.log_metric("lr", lr_scheduler.get_last_lr()[0])
            live.next_step()
        done = step + 1
        if done % cfg.checkpointing_steps == 0 and done < cfg.max_train_steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_checkpoint(
                    accelerator.unwrap_model(unet),
                    optimizer,
                    lr_scheduler,
                    done,
                    fingerprint,
                    cfg.checkpoints_total_limit,
                )

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final_unet = accelerator.unwrap_model(unet)
        shutil.rmtree(paths.LORA, ignore_errors=True)
        save_unet_lora(final_unet, paths.LORA)
        paths.VALIDATION_IMAGES.mkdir(parents=True, exist_ok=True)  # a DVC output, even if left empty
        if cfg.validate_at_end:
            pipeline = load_pipeline(lock, unet=final_unet.to(torch.float32).eval())
            images = generate_validation_images(pipeline, params.validation)
            save_images(images, paths.VALIDATION_IMAGES, "validation")
        assert live is not None
        live.summary["final_train_loss"] = loss_value
        live.end()
    accelerator.end_training()
    if not accelerator.is_main_process:
        return None
    return {"final_train_loss": loss_value, "steps": cfg.max_train_steps, "processes": world}
