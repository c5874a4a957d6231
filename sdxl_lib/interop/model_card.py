"""`README.md` beside the LoRA in the Hugging Face model card format: YAML front matter the Hub reads
(base model, tags, widget images), how to load it, and how it was trained."""

from __future__ import annotations

import json
from typing import Any

import yaml

from sdxl_lib.sources import REPO_ID

TAGS = ["lora", "text-to-image", "diffusers", "stable-diffusion-xl", "sdxl-lora"]
# ss_* keys shown in the card's training table, with their labels.
TRAINING_ROWS = {
    "ss_network_dim": "LoRA rank",
    "ss_network_alpha": "LoRA alpha",
    "ss_resolution": "Resolution",
    "ss_num_train_images": "Training images",
    "ss_steps": "Steps",
    "ss_epoch": "Epochs",
    "ss_batch_size_per_device": "Batch size (per device)",
    "ss_gradient_accumulation_steps": "Gradient accumulation steps",
    "ss_optimizer": "Optimizer",
    "ss_learning_rate": "Learning rate",
    "ss_lr_scheduler": "LR scheduler",
    "ss_mixed_precision": "Mixed precision",
    "ss_noise_offset": "Noise offset",
    "ss_min_snr_gamma": "Min-SNR gamma",
    "ss_seed": "Seed",
}


def model_card(
    metadata: dict[str, str],
    widget: list[tuple[str, str]],
    metrics: dict[str, Any],
    guidance: float,
    weight_name: str,
) -> str:
    """The card for a LoRA file with `metadata` (ours: modelspec / ss_* keys); `widget` pairs a prompt
    with an image path relative to the card; `metrics` are the run's numbers (train loss, eval loss,
    CLIP score)."""
    base = metadata.get("ss_sd_model_name", "")
    front: dict[str, Any] = {"tags": TAGS, "library_name": "diffusers", "license": "openrail++"}
    if REPO_ID.match(base):  # the Hub links a card to its base model by repo id only
        front["base_model"] = base
    if widget:
        front["widget"] = [{"text": prompt, "output": {"url": url}} for prompt, url in widget]
    title = metadata.get("modelspec.title", "SDXL LoRA")
    prompt = widget[0][0] if widget else "a photo"
    rows = [f"| {label} | {metadata[key]} |" for key, label in TRAINING_ROWS.items() if key in metadata]
    metric_rows = [f"| {name} | {value:.4g} |" for name, value in metrics.items() if isinstance(value, float)]
    tags = json.loads(metadata.get("ss_tag_frequency", "{}"))
    top_tags = sorted(
        ((count, tag) for counts in tags.values() for tag, count in counts.items()), reverse=True
    )[:10]
    sections = [
        f"---\n{yaml.safe_dump(front, sort_keys=False, allow_unicode=True)}---\n",
        f"# {title}\n",
        f"A LoRA for Stable Diffusion XL (`{base}`), trained with sdxl-lora. "
        f"`{weight_name}` is in diffusers' layout; `lora_kohya.safetensors`, where present, is the same "
        "LoRA for A1111, Forge and ComfyUI.\n",
        "## Use it with diffusers\n",
        "```python\nimport torch\nfrom diffusers import StableDiffusionXLPipeline\n\n"
        f'pipeline = StableDiffusionXLPipeline.from_pretrained("{base}", torch_dtype=torch.float16)\n'
        'pipeline.to("cuda")\n'
        f'pipeline.load_lora_weights("path/or/repo-of-this-lora", weight_name="{weight_name}")\n'
        f"image = pipeline({prompt!r}, guidance_scale={guidance}).images[0]\n```\n",
        "## Training\n",
        "| setting | value |\n| --- | --- |\n" + "\n".join(rows) + "\n",
    ]
    if metric_rows:
        sections += ["## Metrics\n", "| metric | value |\n| --- | --- |\n" + "\n".join(metric_rows) + "\n"]
    if top_tags:
        sections += [
            "## Most frequent caption tags\n",
            ", ".join(f"{tag} ({n})" for n, tag in top_tags) + "\n",
        ]
    return "\n".join(sections)
