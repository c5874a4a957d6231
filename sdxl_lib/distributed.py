"""Processes started by `accelerate launch` / `torchrun`, seen through accelerate."""

from __future__ import annotations

import os

import torch
from accelerate import PartialState


def cpu_launch() -> bool:
    """accelerate treats a multi-process launch without CUDA as distributed (gloo) only when told CPU."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def process_state() -> PartialState:
    return PartialState(cpu=cpu_launch())
