"""Where the base model, VAE and datasets come from, and the lock that pins them.

A source is `builtin:...`, a local directory, or a Hugging Face Hub repo id. The `download` stage
resolves each to a revision (a Hub commit, or a content / file-list hash) and writes them to a
lock file that every later stage depends on, so a moved Hub branch is a visible change. Later
stages resolve the model through the lock, never through the (possibly moved) branch name.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError
from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

from sdxl_lib.config import DatasetSource, DownloadParams, Params
from sdxl_lib.data.demo import generate_demo_dataset
from sdxl_lib.data.files import copy_dataset
from sdxl_lib.errors import UserError
from sdxl_lib.models import BUILTIN_MODELS

BUILTIN_DEMO = "builtin:demo"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Only what a diffusers / transformers folder needs: no pickles, no fp16 or ONNX duplicates.
MODEL_FILES = ["*.json", "*.txt", "*.safetensors"]
SKIPPED_MODEL_FILES = ["*fp16*", "*.onnx*", "*openvino*", "*.bin", "*.ckpt", "*.msgpack"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")  # torch.load files: unpickling can run code


def home() -> Path:
    """Where built-in models are generated, like the Hub cache for downloaded ones."""
    return Path(os.environ.get("SDXL_LORA_HOME", Path.home() / ".cache" / "sdxl-lora"))


def tree_hash(directory: Path, content: bool = True) -> str:
    """Hash of a folder: every file's relative path and bytes (or size and mtime if not `content`)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(os.fsencode(path.relative_to(directory).as_posix()))
        if content:
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        else:
            stat = path.stat()
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


@contextlib.contextmanager
def download_progress() -> Iterator[None]:
    """The Hub's progress bars while a source is fetched (a full SDXL is some 7 GB), even where the
    stages keep them off; HF_HUB_DISABLE_PROGRESS_BARS, if the user set it, still wins."""
    switch = constants.HF_HUB_DISABLE_PROGRESS_BARS is None and are_progress_bars_disabled()
    if switch:
        enable_progress_bars()
    try:
        yield
    finally:
        if switch:
            disable_progress_bars()


def _hub_snapshot(
    repo_id: str, revision: str, repo_type: str, allow: list[str] | None, ignore: list[str] | None = None
) -> Path:
    try:
        with download_progress():
            path = snapshot_download(
                repo_id, repo_type=repo_type, revision=revision, allow_patterns=allow, ignore_patterns=ignore
            )
    except LocalEntryNotFoundError:
        raise UserError(
            f"{repo_id}@{revision}: no such local folder, and not in the local Hub cache while the "
            "Hub is unreachable (HF_HUB_OFFLINE set or no network); fix the path, or download it once online"
        ) from None
    except (HfHubHTTPError, HFValidationError) as err:
        first_line = str(err).splitlines()[0]
        raise UserError(
            f"{repo_id}@{revision}: Hub {repo_type} download failed ({first_line}); check the id, "
            "the revision, HF_ENDPOINT, and `hf auth login` for gated repos"
        ) from None
    return Path(path)


def _generator_fingerprint() -> str:
    """Changes whenever the generating code or the libraries that serialise the model change. Read
    without importing them: that takes seconds, and most runs find the model built."""
    digest = hashlib.sha256()
    models_folder = Path(__file__).parent / "models"
    for source in ("builtin.py", "tokenizer.py"):
        digest.update((models_folder / source).read_bytes())
    versions = [importlib.metadata.version(name) for name in ("torch", "diffusers", "transformers")]
    digest.update(" ".join(versions).encode())
    return digest.hexdigest()[:12]


def _build_builtin(name: str) -> Path:
    """Generate a built-in model once (atomically, so concurrent stages never see half a folder)."""
    target = home() / "builtin" / f"{name.removeprefix('builtin:')}-{_generator_fingerprint()}"
    if not target.is_dir():
        # imported only to build one: torch and diffusers take seconds, and most runs find it built
        from sdxl_lib.models import builtin

        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            builtin.build(name, Path(tmp) / "model")
            # If another process finished first, theirs is identical: keep it.
            with contextlib.suppress(OSError):
                os.rename(Path(tmp) / "model", target)
    return target


def weights_format(folder: Path, source: str, allow_pickle: bool) -> str:
    """`safetensors`, or `pickle` for a model with a part whose weights exist only as torch.load
    files, which is refused unless `allow_pickle` (they are then loaded with weights_only=True)."""
    # a component folder whose weights exist only as pickles (transformers writes safetensors always)
    pickles = [
        p
        for p in folder.rglob("*")
        if p.suffix in PICKLE_SUFFIXES and not any(p.parent.glob("*.safetensors"))
    ]
    if pickles and not allow_pickle:
        raise UserError(
            f"{source}: its weights are pickle files ({pickles[0].name}), which can run code when "
            "loaded; convert them to .safetensors, or set model.allow_pickle_weights: true to load "
            "them with torch.load(weights_only=True)"
        )
    return "pickle" if pickles else "safetensors"


def pin_model(source: str, revision: str = "main", allow_pickle: bool = False) -> dict[str, str]:
    """Resolve a model source to a lock entry {source, kind, revision, weights}."""
    if source in BUILTIN_MODELS:
        path = _build_builtin(source)
        return {"source": source, "kind": "builtin", "revision": tree_hash(path), "weights": "safetensors"}
    if source.startswith("builtin:"):
        known = ", ".join(BUILTIN_MODELS)
        raise UserError(f"unknown built-in model '{source}': use one of {known}")
    if Path(source).is_dir():
        path = Path(source).resolve()
        weights = weights_format(path, source, allow_pickle)
        return {
            "source": str(path),
            "kind": "local",
            "revision": tree_hash(path, content=False),
            "weights": weights,
        }
    if REPO_ID.match(source):
        path = _hub_snapshot(source, revision, "model", *hub_patterns(allow_pickle))
        weights = weights_format(path, source, allow_pickle)
        return {"source": source, "kind": "hub", "revision": path.name, "weights": weights}
    raise UserError(
        f"model source '{source}' is neither a builtin, an existing folder, nor a Hub id (owner/name)"
    )


def hub_patterns(allow_pickle: bool) -> tuple[list[str], list[str]]:
    """(allow, ignore) patterns of a model download: what a diffusers / transformers folder needs,
    with .bin weights only for `allow_pickle`."""
    if allow_pickle:
        return [*MODEL_FILES, "*.bin"], [p for p in SKIPPED_MODEL_FILES if p != "*.bin"]
    return MODEL_FILES, SKIPPED_MODEL_FILES


def model_path(entry: dict[str, str]) -> Path:
    """The local folder of a pinned model; fetches or regenerates it if this machine lacks it."""
    kind, source, revision = entry["kind"], entry["source"], entry["revision"]
    if kind == "builtin":
        path = _build_builtin(source)
        if tree_hash(path) != revision:
            raise UserError(
                f"the built-in model {source} this installation generates differs from the one pinned "
                "in the lock (made by another sdxl-lora/torch/diffusers version): run `dvc repro -f download`"
            )
        return path
    if kind == "local":
        if not Path(source).is_dir():
            raise UserError(f"model folder {source} (pinned in the lock) no longer exists")
        return Path(source)
    return _hub_snapshot(source, revision, "model", *hub_patterns(entry.get("weights") == "pickle"))


def fetch_dataset(dataset: DatasetSource, params: DownloadParams, target: Path) -> tuple[str, list[dict]]:
    """Materialise a dataset in `target`; returns the revision to pin and the files not copied."""
    source, max_gb = dataset.source, params.max_extracted_gb
    if source == BUILTIN_DEMO:
        generate_demo_dataset(target)
        return tree_hash(target), []
    if Path(source).is_dir():
        allowed = None if params.allow_symlinks else Path(source)
        skipped = copy_dataset(Path(source), target, allowed, max_gb)
        return tree_hash(target), skipped
    if REPO_ID.match(source):
        snapshot = _hub_snapshot(source, dataset.revision, "dataset", None)
        # a snapshot's files are links into the repo's blob store, two levels up
        allowed = None if params.allow_symlinks else snapshot.parent.parent
        return snapshot.name, copy_dataset(snapshot, target, allowed, max_gb)
    raise UserError(
        f"dataset source '{source}' is neither {BUILTIN_DEMO}, an existing folder, "
        "nor a Hub dataset id (owner/name)"
    )


def download(params: Params, raw_dir: Path) -> dict[str, Any]:
    """Fetch every dataset into `raw_dir/<id>` and pin model, VAE and datasets; returns the lock."""
    shutil.rmtree(raw_dir, ignore_errors=True)
    datasets = []
    for dataset in params.download.datasets:
        revision, skipped = fetch_dataset(dataset, params.download, raw_dir / dataset.id)
        datasets.append(
            {"id": dataset.id, "source": dataset.source, "revision": revision, "skipped": skipped}
        )
    model = params.model
    vae = model.pretrained_vae_model_name_or_path
    return {
        "model": pin_model(model.pretrained_model_name_or_path, model.revision, model.allow_pickle_weights),
        "vae": pin_model(vae, model.vae_revision, model.allow_pickle_weights) if vae else None,
        "datasets": datasets,
    }


def read_lock(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path}: missing; run the download stage first (dvc repro download)")
    return json.loads(path.read_text())
