"""Sharded safetensors storage: bounded shard size for writing, lazy memory-mapped reads."""

from __future__ import annotations

import json
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from accelerate import PartialState
from safetensors.torch import save_file
from tqdm import tqdm

INDEX = "index.parquet"  # beside the shards: key, shard, and each cache's own columns
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
Layout = tuple[torch.dtype, tuple[int, ...], int, int]  # a stored tensor: dtype, shape, file offset, bytes


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
    """Reads `{key}.{name}` from the shard the index names, parsing each shard's header once.

    Tensors are read with plain positioned reads into fresh buffers, not memory-mapped: a mapped
    shard's touched pages count towards the process's resident memory until it is closed, which
    made the train stage's RSS grow with every sample read (BENCHMARKS.md). The OS page cache
    still serves repeated reads.
    """

    def __init__(self, directory: Path, shard_of: dict[str, str]) -> None:
        self.directory = directory
        self.shard_of = shard_of
        # shard -> stored name -> layout, plus each shard's tensor names. Kept flat, with shared
        # shape tuples, as this is the only per-sample memory a reader holds.
        self._layouts: dict[str, dict[str, Layout]] = {}
        self._names: dict[str, list[str]] = {}
        self._shapes: dict[tuple[int, ...], tuple[int, ...]] = {}

    def _shard(self, key: str) -> tuple[Path, dict[str, Layout]]:
        shard = self.shard_of[key]
        if shard not in self._layouts:
            with (self.directory / shard).open("rb") as file:
                header_size = int.from_bytes(file.read(8), "little")
                header = json.loads(file.read(header_size))
            header.pop("__metadata__", None)
            layouts = {}
            for stored, info in header.items():
                begin, end = info["data_offsets"]
                shape = self._shapes.setdefault(tuple(info["shape"]), tuple(info["shape"]))
                layouts[stored] = (
                    SAFETENSORS_DTYPES[info["dtype"]],
                    shape,
                    8 + header_size + begin,
                    end - begin,
                )
            self._layouts[shard] = layouts
            self._names[shard] = sorted({stored.split(".", 1)[1] for stored in header})
        return self.directory / shard, self._layouts[shard]

    @staticmethod
    def _read(path: Path, layout: Layout) -> torch.Tensor:
        dtype, shape, offset, length = layout
        tensor = torch.empty(shape, dtype=dtype)
        with path.open("rb", buffering=0) as file:
            file.seek(offset)
            if file.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy())) != length:
                raise OSError(f"{path}: truncated shard; delete the cache folder and rerun the stage")
        return tensor

    def get(self, key: str, name: str) -> torch.Tensor:
        path, layouts = self._shard(key)
        return self._read(path, layouts[f"{key}.{name}"])

    def entry(self, key: str) -> dict[str, torch.Tensor]:
        """All tensors stored for `key`, by name."""
        path, layouts = self._shard(key)
        names = self._names[self.shard_of[key]]
        return {
            name: self._read(path, layouts[f"{key}.{name}"]) for name in names if f"{key}.{name}" in layouts
        }


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
T = TypeVar("T")
R = TypeVar("R")


def cached_shards(directory: Path) -> dict[str, str]:
    """key -> shard of an existing cache (empty when there is none yet)."""
    index = directory / INDEX
    if not index.is_file():
        return {}
    table = pq.read_table(index, columns=["key", "shard"])
    return dict(zip(table.column("key").to_pylist(), table.column("shard").to_pylist(), strict=True))


def prefetched(function: Callable[[T], R], items: Iterable[T], depth: int = 0) -> Iterator[R]:
    """`function(item)` for each item, in order, computed up to `depth` items ahead on threads
    (default: one per core). Image decoding and resizing release the GIL, so they overlap the
    model's work; the bounded lookahead keeps memory flat however many items there are."""
    depth = depth or os.cpu_count() or 1
    with ThreadPoolExecutor(depth) as pool:
        pending: deque[Future[R]] = deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) > depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def build_incremental_cache(
    directory: Path,
    prefix: str,
    needed: list[str],
    batches: list[list[tuple[str, Any]]],
    prepare: Callable[[list[Any]], Any],
    encode: Callable[[Any], list[dict[str, torch.Tensor]]],
    make_index: Callable[[dict[str, str]], pa.Table],
    dtype: torch.dtype,
    max_bytes: int,
    state: PartialState,
    desc: str,
) -> tuple[pa.Table, dict[str, int]] | None:
    """Bring the cache in `directory` to exactly the `needed` keys, encoding only `batches`.

    `batches` holds the (key, item) pairs missing from the existing cache, already batched.
    `prepare` (reading images, say) runs on worker threads a few batches ahead of `encode`.
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
        prepared = prefetched(lambda i: prepare([item for _, item in batches[i]]), mine)
        for i, inputs in zip(mine, prepared, strict=True):
            for (key, _), tensors in zip(batches[i], encode(inputs), strict=True):
                part_shard[key] = writer.add(key, tensors)
            progress.update(len(batches[i]))
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
