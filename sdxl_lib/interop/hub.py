"""Publishing an exported LoRA folder to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

from sdxl_lib.errors import UserError


def push_to_hub(folder: Path, repo_id: str) -> str:
    """Upload `folder` (LoRA files, README.md model card, images) to the model repo `repo_id`,
    creating it private if it does not exist; returns the commit's URL. The token is whatever
    huggingface_hub finds (HF_TOKEN, or `hf auth login`), passed in a header and never printed."""
    api = HfApi()
    try:
        api.create_repo(repo_id, private=True, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message="Upload an SDXL LoRA trained with sdxl-lora"
        )
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else "no response"
        raise UserError(
            f"push to {repo_id} failed (HTTP {status}): log in with `hf auth login` or set HF_TOKEN, "
            "and check the repo id"
        ) from None
    return commit.commit_url
