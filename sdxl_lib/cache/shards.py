"""Sharded safetensors storage: bounded shard size for writing, lazy memory-mapped reads."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ShardWriter:
    """Collects `{key}.{name}` tensors and writes a shard whenever `max_bytes` is reached."""

    def __init__(self, directory: Path, prefix: str, max_bytes: int, dtype: torch.dtype) -> None:
        self.directory, self.prefix, self.max_bytes, self.dtype = directory, prefix, max_bytes, dtype
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.count = 0
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def current_shard(self) -> str:
        return f"{self.prefix}-{self.count:05d}.safetensors"

    def add(self, key: str, tensors: dict[str, torch.Tensor]) -> str:
        """Queue one entry's tensors; returns the shard file name they will be in."""
        if self.pending_bytes >= self.max_bytes:
            self.flush()
        for name, tensor in tensors.items():
            stored = tensor.detach().to("cpu", self.dtype).contiguous()
            self.pending[f"{key}.{name}"] = stored
            self.pending_bytes += stored.numel() * stored.element_size()
        return self.current_shard

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.directory / self.current_shard
        tmp = path.with_suffix(".tmp")
        save_file(self.pending, str(tmp))
        os.replace(tmp, path)  # a shard is either complete or absent
        self.pending, self.pending_bytes = {}, 0
        self.count += 1


class ShardReader:
    """Reads `{key}.{name}` from the shard the index names, opening each shard once, lazily."""

    def __init__(self, directory: Path, shard_of: dict[str, str]) -> None:
        self.directory = directory
        self.shard_of = shard_of
        self._handles: dict[str, object] = {}

    def get(self, key: str, name: str) -> torch.Tensor:
        shard = self.shard_of[key]
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.directory / shard), framework="pt")
        return self._handles[shard].get_tensor(f"{key}.{name}")  # type: ignore[attr-defined]
