"""Sharded safetensors storage: bounded shard size for writing, lazy memory-mapped reads."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from accelerate import PartialState
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

INDEX = "index.parquet"  # beside the shards: key, shard, and each cache's own columns
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
        self._handles: dict[str, Any] = {}
        self._names: dict[str, dict[str, list[str]]] = {}  # shard -> key -> tensor names

    def _handle(self, key: str) -> Any:
        shard = self.shard_of[key]
        if shard not in self._handles:
            handle = safe_open(str(self.directory / shard), framework="pt")
            self._handles[shard] = handle
            names: dict[str, list[str]] = {}
            for stored in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                entry_key, name = stored.rsplit(".", 1)
                names.setdefault(entry_key, []).append(name)
            self._names[shard] = names
        return self._handles[shard]

    def get(self, key: str, name: str) -> torch.Tensor:
        return self._handle(key).get_tensor(f"{key}.{name}")

    def entry(self, key: str) -> dict[str, torch.Tensor]:
        """All tensors stored for `key`, by name."""
        handle = self._handle(key)
        return {name: handle.get_tensor(f"{key}.{name}") for name in self._names[self.shard_of[key]][key]}


class KeyedCache:
    """A cache read through its index: `ID_COLUMN` value (variant id, caption) -> key -> shard."""

    ID_COLUMN = ""

    def __init__(self, directory: Path, index: pa.Table) -> None:
        ids, keys, shards = (index.column(c).to_pylist() for c in (self.ID_COLUMN, "key", "shard"))
        self.key_of = dict(zip(ids, keys, strict=True))
        self.reader = ShardReader(directory, dict(zip(keys, shards, strict=True)))

    @classmethod
    def open(cls: type[CacheT], directory: Path) -> CacheT:
        """The cache in `directory`, read through the index written with its shards."""
        return cls(directory, pq.read_table(directory / INDEX))

    def tensors(self, entry_id: str, *names: str) -> tuple[torch.Tensor, ...]:
        key = self.key_of[entry_id]
        return tuple(self.reader.get(key, name) for name in names)


CacheT = TypeVar("CacheT", bound=KeyedCache)


def cached_shards(directory: Path) -> dict[str, str]:
    """key -> shard of an existing cache (empty when there is none yet)."""
    index = directory / INDEX
    if not index.is_file():
        return {}
    table = pq.read_table(index, columns=["key", "shard"])
    return dict(zip(table.column("key").to_pylist(), table.column("shard").to_pylist(), strict=True))


def build_incremental_cache(
    directory: Path,
    prefix: str,
    needed: list[str],
    batches: list[list[tuple[str, Any]]],
    encode: Callable[[list[Any]], list[dict[str, torch.Tensor]]],
    make_index: Callable[[dict[str, str]], pa.Table],
    dtype: torch.dtype,
    max_bytes: int,
    state: PartialState,
    desc: str,
) -> tuple[pa.Table, dict[str, int]] | None:
    """Bring the cache in `directory` to exactly the `needed` keys, encoding only `batches`.

    `batches` holds the (key, item) pairs missing from the existing cache, already batched.
    Batch i is encoded by process i mod N, so each tensor is computed in the same batch whatever
    the number of processes; each process writes a part, and the main process merges the parts
    and the reused entries in one canonical order: the output is byte-identical for any N.
    `make_index` turns key -> shard into the cache's index table, written with the shards so a
    cache folder is complete or absent. Returns (index, report) on the main process, else None.
    """
    previous = cached_shards(directory)
    parts = directory.with_name(f".{directory.name}-parts")
    if state.is_main_process:
        shutil.rmtree(parts, ignore_errors=True)
    state.wait_for_everyone()
    mine = list(range(state.process_index, len(batches), state.num_processes))
    writer = ShardWriter(parts / f"rank{state.process_index}", "part", max_bytes, dtype)
    part_shard: dict[str, str] = {}
    with tqdm(
        total=sum(len(batches[i]) for i in mine), desc=desc, unit="item", disable=not state.is_main_process
    ) as progress:
        for i in mine:
            keys, items = zip(*batches[i], strict=True)
            for key, tensors in zip(keys, encode(list(items)), strict=True):
                part_shard[key] = writer.add(key, tensors)
            progress.update(len(items))
    writer.flush()
    (parts / f"rank{state.process_index}" / "done.json").write_text(json.dumps(part_shard))
    state.wait_for_everyone()
    if not state.is_main_process:
        return None

    readers = {}
    for rank in range(state.num_processes):
        owned = json.loads((parts / f"rank{rank}" / "done.json").read_text())
        readers.update(dict.fromkeys(owned, ShardReader(parts / f"rank{rank}", owned)))
    old = ShardReader(directory, previous)
    reused = sorted(k for k in set(needed) if k in previous)
    encoded = [key for batch in batches for key, _ in batch]
    staging = directory.with_name(f".{directory.name}-new")
    shutil.rmtree(staging, ignore_errors=True)
    out = ShardWriter(staging, prefix, max_bytes, dtype)
    shard_of = {}
    for key in reused + encoded:
        source = old if key in previous else readers[key]
        shard_of[key] = out.add(key, source.entry(key))
    out.flush()
    index = make_index(shard_of)
    pq.write_table(index, staging / INDEX)
    # Swap the new cache in; the old one (and the parts) go only once the new one is complete.
    retired = directory.with_name(f".{directory.name}-old")
    shutil.rmtree(retired, ignore_errors=True)
    if directory.exists():
        os.replace(directory, retired)
    os.replace(staging, directory)
    shutil.rmtree(retired, ignore_errors=True)
    shutil.rmtree(parts, ignore_errors=True)
    report = {"encoded": len(encoded), "reused": len(reused), "removed": len(set(previous) - set(needed))}
    return index, report


def describe(report: dict[str, int]) -> str:
    return f"{report['encoded']} encoded, {report['reused']} reused, {report['removed']} removed"
