"""Sources resolve to pinned revisions: built-in, local folders, and the Hub (offline cache)."""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
from conftest import HubStandIn, new_project, read_json, run

from sdxl_lib.config import DatasetSource, DownloadParams
from sdxl_lib.errors import UserError
from sdxl_lib.models import TINY_SDXL
from sdxl_lib.models.loading import load_unet
from sdxl_lib.sources import fetch_dataset, model_path, pin_model


def fake_hub_repo(cache: Path, kind: str, repo_id: str, commit: str, files: Path, ref: str = "main") -> None:
    """The Hub cache layout snapshot_download reads: refs/<branch> -> commit, snapshots/<commit>/."""
    repo = cache / f"{kind}s--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    shutil.copytree(files, repo / "snapshots" / commit)


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_model_is_pinned_to_the_commit_and_a_moved_branch_shows(hub_cache: Path) -> None:
    tiny = model_path(pin_model(TINY_SDXL))
    fake_hub_repo(hub_cache, "model", "org/tiny-sdxl", "a" * 40, tiny)
    entry = pin_model("org/tiny-sdxl", "main")
    assert entry == {"source": "org/tiny-sdxl", "kind": "hub", "revision": "a" * 40, "weights": "safetensors"}
    assert load_unet({"model": entry}).config.addition_embed_type == "text_time"
    fake_hub_repo(hub_cache, "model", "org/tiny-sdxl", "b" * 40, tiny)  # the branch moved
    assert pin_model("org/tiny-sdxl", "main")["revision"] == "b" * 40
    assert model_path(entry).name == "a" * 40  # later stages still use the pinned commit


def test_hub_model_missing_offline_is_one_clear_error(hub_cache: Path) -> None:
    with pytest.raises(
        UserError,
        match=r"org/absent@main: no such local folder, and not in the local Hub cache .*HF_HUB_OFFLINE",
    ):
        pin_model("org/absent", "main")


def test_hub_and_local_datasets(hub_cache: Path, tmp_path: Path) -> None:
    files = tmp_path / "files"
    files.mkdir()
    (files / "img.png").write_bytes(b"png")
    fake_hub_repo(hub_cache, "dataset", "org/photos", "c" * 40, files)
    # as huggingface_hub stores them: snapshot files are links to ../../blobs/<hash>
    repo = hub_cache / "datasets--org--photos"
    (repo / "blobs").mkdir()
    (repo / "snapshots" / ("c" * 40) / "img.png").rename(repo / "blobs" / "abc")
    (repo / "snapshots" / ("c" * 40) / "img.png").symlink_to(Path("../../blobs/abc"))
    settings = DownloadParams()

    def fetch(source: str, target: str) -> tuple[str, list[dict]]:
        return fetch_dataset(DatasetSource(id="d", source=source), settings, tmp_path / target)

    assert fetch("org/photos", "hub-out") == ("c" * 40, [])
    assert (tmp_path / "hub-out" / "img.png").read_bytes() == b"png"
    first, _ = fetch(str(files), "local-out")
    (files / "more.png").write_bytes(b"more")
    assert fetch(str(files), "local-out-2")[0] != first


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("builtin:huge-sdxl", "unknown built-in model 'builtin:huge-sdxl'"),
        ("not a repo", "neither a builtin, an existing folder, nor a Hub id"),
    ],
)
def test_bad_model_sources(source: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        pin_model(source)


def test_download_stage_with_a_local_dataset_and_model(tmp_path: Path) -> None:
    images = tmp_path / "my images"
    images.mkdir()
    (images / "cat.png").write_bytes(b"x")
    (images / "cat.txt").write_text("a cat")
    model = model_path(pin_model(TINY_SDXL))
    project = new_project(tmp_path / "project")
    params = (project / "params.yaml").read_text()
    params = params.replace("builtin:demo", str(images)).replace("builtin:tiny-sdxl", str(model))
    (project / "params.yaml").write_text(params)
    run(["sdxl-lora", "download"], project)
    lock = read_json(project / "data/lock.json")
    assert lock["model"]["kind"] == "local" and lock["datasets"][0]["source"] == str(images)
    assert (project / "data/raw/demo/cat.txt").read_text() == "a cat"
    (project / "params.yaml").write_text(params.replace(str(images), str(tmp_path / "missing")))
    result = run(["sdxl-lora", "download"], project, check=False)
    assert result.returncode == 2 and "is neither builtin:demo, an existing folder" in result.stderr


def test_download_stage_fetches_a_hub_model_over_http_and_shows_it(tmp_path: Path) -> None:
    """The download stage against a Hub stand-in on localhost (HF_ENDPOINT, online): the real
    snapshot_download path, pinned to the commit the Hub names, with the Hub's progress bar shown
    (the stages keep it off otherwise)."""
    tiny = model_path(pin_model(TINY_SDXL))
    served = {str(p.relative_to(tiny)): p.read_bytes() for p in tiny.rglob("*") if p.is_file()}
    hub = HubStandIn()
    hub.repos["org/tiny-sdxl"] = ("e" * 40, served)
    project = new_project(tmp_path / "project", {"model.pretrained_model_name_or_path": "org/tiny-sdxl"})
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf-home")}
    result = run(["sdxl-lora", "download"], project, **env)
    lock = read_json(project / "data/lock.json")
    assert lock["model"] == {
        "source": "org/tiny-sdxl",
        "kind": "hub",
        "revision": "e" * 40,
        "weights": "safetensors",
    }
    snapshot = tmp_path / "hf-home/hub/models--org--tiny-sdxl/snapshots" / ("e" * 40)
    fetched = {str(p.relative_to(snapshot)): p.read_bytes() for p in snapshot.rglob("*") if p.is_file()}
    assert fetched == served
    assert f"Fetching {len(served)} files" in result.stderr
