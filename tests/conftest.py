"""Shared fixtures: an isolated model home, offline Hub, and one real DVC run of the demo."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# The environment running the tests also provides `dvc`, `sdxl-lora` and `python` to subprocesses.
BIN = Path(sys.executable).parent
DEMO_STEPS = 50  # demo_project's training run

# Set before the libraries are imported (huggingface_hub reads them once): built-in models go to
# a temp home, and the Hub is offline so no test can reach the network.
_TEST_HOME = Path(tempfile.mkdtemp(prefix="sdxl-lora-tests-"))
os.environ["SDXL_LORA_HOME"] = str(_TEST_HOME / "sdxl-home")
os.environ["HF_HOME"] = str(_TEST_HOME / "hf-home")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"


def run(
    cmd: list[str], cwd: Path, check: bool = True, timeout: float | None = None, **env_vars: str
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **env_vars, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def set_params(project: Path, overrides: dict) -> None:
    """Override `section.key` values in a project's params.yaml."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    for key, value in overrides.items():
        section, name = key.split(".")
        params[section][name] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def new_project(directory: Path, overrides: dict | None = None) -> Path:
    """A fresh git + DVC repo holding this project's pipeline and params (with overrides)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, directory / name)
    # dvc.yaml lists library code as stage dependencies (the stages themselves run the installed package)
    shutil.copytree(ROOT / "sdxl_lib", directory / "sdxl_lib", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / ".dvc", directory / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    shutil.copy(ROOT / "params.yaml", directory / "params.yaml")
    set_params(directory, overrides or {})
    run(["git", "init", "-q"], directory)
    run(["git", "add", "."], directory)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], directory)
    return directory


# For tests that change the demo's copy and train again: no validation grids nor eval loss along
# the way (the demo run itself and their own tests cover those), as they cost seconds per run.
QUIET_TRAIN = {"validation.validation_steps": None, "train.validate_at_end": False, "train.eval_steps": None}


def copy_demo(demo_project: Path, project: Path, overrides: dict | None = None) -> Path:
    """A copy of the demo run (DVC cache links kept as links), with params overrides."""
    shutil.copytree(demo_project, project, symlinks=True)
    set_params(project, overrides or {})
    return project


def train_here(project: Path) -> dict[str, Any]:
    """The train stage's work on `project`, in this process (a stage's process spends ~10 s importing
    its libraries); returns the LoRA. The stage's command and DVC are exercised where they matter.
    Only with train.mixed_precision "no": accelerate fixes the precision once per process."""
    from safetensors.torch import load_file

    from sdxl_lib import paths
    from sdxl_lib.config import load_params
    from sdxl_lib.export import LORA_WEIGHTS
    from sdxl_lib.sources import read_lock
    from sdxl_lib.train.loop import train

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.chdir(project)
        train(load_params(Path("params.yaml")), read_lock(paths.LOCK))
    return load_file(project / paths.LORA / LORA_WEIGHTS)


@pytest.fixture(scope="session")
def demo_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole pipeline run once with `dvc repro` on the demo, trained for a quarter of the demo's
    steps (checkpoints, validation grids and eval loss every 25) to keep the suite's time in bounds.

    Encoders run one input at a time so the caches can be compared bit for bit with the models
    (CPU kernels differ in the last bits between batch sizes; a separate test bounds that)."""
    overrides = {
        "encode.vae_batch_size": 1,
        "encode.text_batch_size": 1,
        **{"train.max_train_steps": DEMO_STEPS, "train.checkpointing_steps": DEMO_STEPS // 2},
        **{"train.eval_steps": DEMO_STEPS // 2, "validation.validation_steps": DEMO_STEPS // 2},
    }
    project = new_project(tmp_path_factory.mktemp("demo"), overrides)
    result = run(["dvc", "repro"], project)
    (project / "repro.log").write_text(result.stdout + result.stderr)
    return project


def tiny_pipeline() -> Any:
    """The built-in tiny SDXL pipeline, loaded as users load any SDXL folder (imported here, after
    the environment above is set)."""
    from diffusers import StableDiffusionXLPipeline

    from sdxl_lib.models import TINY_SDXL
    from sdxl_lib.sources import model_path, pin_model

    return StableDiffusionXLPipeline.from_pretrained(model_path(pin_model(TINY_SDXL)), use_safetensors=True)


def trained_pipeline(cfg: Any, text_encoders: bool) -> tuple[Any, dict[str, Any]]:
    """The tiny pipeline with LoRAs (per TrainParams `cfg`) whose weights are all non-zero, as after
    training; also the adapted models by component name."""
    import torch

    from sdxl_lib.train.lora import lora_config

    pipeline = tiny_pipeline()
    models = {"unet": pipeline.unet}
    if text_encoders:
        models.update(text_encoder=pipeline.text_encoder, text_encoder_2=pipeline.text_encoder_2)
    torch.manual_seed(0)
    for name, model in models.items():
        model.add_adapter(lora_config(cfg, text_encoder=name != "unet"))
        with torch.no_grad():
            for parameter_name, parameter in model.named_parameters():
                if "lora_" in parameter_name:
                    parameter.add_(0.05 * torch.randn_like(parameter))
    return pipeline, models


class RecordingServer:
    """A real HTTP server on localhost that records each POSTed JSON document and answers `status`."""

    def __init__(self, status: int = 200) -> None:
        self.documents: list[dict] = []
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                server.requests += 1
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if status == 200:
                    server.documents.append(json.loads(body))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hooks/secret-token"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> RecordingServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class HubStandIn:
    """The Hub on localhost, for HF_ENDPOINT. It serves `repos` (model id -> (commit, {path: bytes}))
    to snapshot_download (revision, file tree, HEAD and GET of each file), and takes uploads: repo
    create, YAML check, preupload and commit, enough for `create_repo` + `upload_folder` (every file
    sent inline) by the holder of `token`."""

    def __init__(self, token: str = "") -> None:
        self.repos: dict[str, tuple[str, dict[str, bytes]]] = {}
        self.files: dict[str, bytes] = {}  # uploaded
        self.authorizations: set[str | None] = set()
        self.unknown_posts: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def reply(self, code: int, body: object) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def send_file(self, head: bool) -> None:
                """/{repo}/resolve/{revision}/{path}: the file, with the headers the Hub sends."""
                path = unquote(urlparse(self.path).path)
                for repo, (commit, files) in hub.repos.items():
                    name = path.removeprefix(f"/{repo}/resolve/").partition("/")[2]
                    if path.startswith(f"/{repo}/resolve/") and name in files:
                        self.send_response(200)
                        self.send_header("X-Repo-Commit", commit)
                        self.send_header("ETag", f'"{hashlib.sha256(files[name]).hexdigest()}"')
                        self.send_header("Content-Length", str(len(files[name])))
                        self.end_headers()
                        if not head:
                            self.wfile.write(files[name])
                        return
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_HEAD(self) -> None:
                self.send_file(head=True)

            def do_GET(self) -> None:
                path = unquote(urlparse(self.path).path)
                for repo, (commit, files) in hub.repos.items():
                    if path.startswith(f"/api/models/{repo}/revision/"):
                        siblings = [{"rfilename": name} for name in files]
                        return self.reply(200, {"id": repo, "sha": commit, "siblings": siblings})
                    if path.startswith(f"/api/models/{repo}/tree/"):
                        tree = [
                            {
                                "type": "file",
                                "path": name,
                                "size": len(data),
                                "oid": hashlib.sha1(data).hexdigest(),
                            }
                            for name, data in files.items()
                        ]
                        return self.reply(200, tree)
                return self.send_file(head=False)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hub.authorizations.add(self.headers.get("Authorization"))
                if self.headers.get("Authorization") != f"Bearer {token}":
                    return self.reply(401, {"error": "Invalid credentials"})
                base = f"http://127.0.0.1:{self.server.server_port}"
                if self.path == "/api/repos/create":
                    request = json.loads(body)
                    return self.reply(200, {"url": f"{base}/{request['organization']}/{request['name']}"})
                if self.path == "/api/validate-yaml":
                    return self.reply(200, {"errors": [], "warnings": []})
                if "/preupload/" in self.path:
                    files = json.loads(body)["files"]
                    modes = [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                    ]
                    return self.reply(200, {"files": modes})
                if "/commit/" in self.path:
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            hub.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    repo = self.path.split("/api/models/")[1].split("/commit/")[0]
                    return self.reply(200, {"commitUrl": f"{base}/{repo}/commit/0abc", "commitOid": "0abc"})
                hub.unknown_posts.append(self.path)
                return self.reply(404, {"error": "not here"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def read_tsv(path: Path) -> dict[int, float]:
    """A DVCLive metric log: {step: value}."""
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:]]
    return {int(step): float(value) for step, value in rows}
