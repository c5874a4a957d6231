"""CLIP score of generated images against their prompts, on torchmetrics' scale:
100 x cosine similarity of the CLIP image and text embeddings, clipped at 0."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPModel, CLIPProcessor


class ClipScorer:
    def __init__(self, model_dir: Path) -> None:
        self.model = CLIPModel.from_pretrained(model_dir, use_safetensors=True).eval()
        self.processor = CLIPProcessor.from_pretrained(model_dir)

    @torch.no_grad()
    def scores(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        inputs = self.processor(
            text=prompts, images=images, return_tensors="pt", padding=True, truncation=True
        )
        output = self.model(**inputs)
        image = F.normalize(output.image_embeds, dim=-1)
        text = F.normalize(output.text_embeds, dim=-1)
        return (100 * (image * text).sum(dim=-1)).clamp(min=0)
