"""The optimizers users pick by name, built with the same hyperparameter keys."""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from sdxl_lib.config import TrainParams
from sdxl_lib.errors import UserError


def make_optimizer(
    cfg: TrainParams, params: list[torch.nn.Parameter] | list[dict[str, Any]], device: torch.device
) -> torch.optim.Optimizer:
    """`params`: the parameters, or param groups (a group's own "lr" wins over learning_rate)."""
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    adam = {
        "lr": cfg.learning_rate,
        "betas": betas,
        "weight_decay": cfg.adam_weight_decay,
        "eps": cfg.adam_epsilon,
    }
    if cfg.optimizer == "adamw":
        # The fused kernel is one launch per step instead of one per tensor, where the device has it.
        return torch.optim.AdamW(params, **adam, fused=device.type == "cuda")
    if cfg.optimizer == "adamw8bit":
        if device.type != "cuda" or importlib.util.find_spec("bitsandbytes") is None:
            raise UserError(
                "train.optimizer adamw8bit needs a CUDA GPU and `pip install bitsandbytes`; "
                "use optimizer: adamw on this machine"
            )
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, **adam)
    if cfg.optimizer == "lion":
        from lion_pytorch import Lion

        return Lion(params, lr=cfg.learning_rate, betas=betas, weight_decay=cfg.adam_weight_decay)
    if cfg.optimizer == "prodigy":
        from prodigyopt import Prodigy

        # Prodigy estimates the step size itself; learning_rate scales it (1.0 is the usual value).
        return Prodigy(params, lr=cfg.learning_rate, betas=betas, weight_decay=cfg.adam_weight_decay)
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            params,
            lr=cfg.learning_rate,
            weight_decay=cfg.adam_weight_decay,
            relative_step=False,
            scale_parameter=False,
            warmup_init=False,
        )
    from schedulefree import AdamWScheduleFree

    return AdamWScheduleFree(params, **adam, warmup_steps=cfg.lr_warmup_steps)


def set_optimizer_mode(optimizer: torch.optim.Optimizer, training: bool) -> None:
    """Schedule-free optimizers keep two sets of weights: the training point while stepping and the
    averaged point for validation and export. Other optimizers have no mode."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    switch = getattr(inner, "train" if training else "eval", None)
    if callable(switch):
        switch()
