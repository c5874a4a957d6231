"""Validation previews: every N denoising steps the latents are decoded by a tiny autoencoder
(TAESD-XL) and posted to a webhook, so a person can watch a validation image form during training."""

from __future__ import annotations

import base64
import io
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

import torch
from diffusers import AutoencoderTiny
from PIL import Image
from tqdm import tqdm

ATTEMPTS = 3  # per post; then the webhook is reported once and left alone for the rest of the run
TIMEOUT_S = 5.0
BACKOFF_S = 0.5


def where(url: str) -> str:
    """scheme://host of a webhook URL: the path and query often carry its secret token."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


class Webhook:
    """POSTs JSON documents to one URL. A post that fails is retried ATTEMPTS times with a growing
    pause; after that the webhook is reported once (without its secret path) and skipped from then
    on, so a monitoring endpoint that is down never stops or stalls training."""

    def __init__(self, url: str, attempts: int = ATTEMPTS, backoff_s: float = BACKOFF_S) -> None:
        self.url, self.attempts, self.backoff_s = url, attempts, backoff_s
        self.down = False

    def post(self, document: dict[str, Any]) -> bool:
        if self.down:
            return False
        body = json.dumps(document).encode()
        problem = ""
        for attempt in range(self.attempts):
            request = urllib.request.Request(
                self.url, data=body, headers={"Content-Type": "application/json"}, method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=TIMEOUT_S):
                    return True  # urlopen raises for any status outside 2xx/3xx
            except urllib.error.HTTPError as err:
                problem = f"HTTP {err.code}"
            except (urllib.error.URLError, OSError) as err:
                problem = str(getattr(err, "reason", err))
            if attempt + 1 < self.attempts:
                time.sleep(self.backoff_s * 2**attempt)
        self.down = True
        tqdm.write(  # on its own line, above any progress bar
            f"warning: webhook {where(self.url)} failed {self.attempts} times ({problem}); "
            "no more previews are sent this run (training goes on)",
            file=sys.stderr,
        )
        return False


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def to_image(pixels: torch.Tensor) -> Image.Image:
    """One decoded image in [-1, 1], [3, H, W], as 8-bit RGB."""
    array = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy())


class Previews:
    """Makes the pipeline callback that decodes and posts every `every`-th denoising step."""

    def __init__(self, decoder: AutoencoderTiny, every: int, webhook: Webhook) -> None:
        self.decoder, self.every, self.webhook = decoder.eval(), every, webhook

    def callback(self, prompt: str, training_step: int) -> Callable[..., dict[str, Any]]:
        def on_step_end(pipeline: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            done = index + 1
            if done % self.every == 0 and not self.webhook.down:
                # the pipeline's latents are in the scaled space TAESD-XL decodes directly
                latents = tensors["latents"][-1:].to(self.decoder.device, self.decoder.dtype)
                with torch.no_grad():
                    image = to_image(self.decoder.decode(latents).sample[0])
                self.webhook.post(
                    {
                        "step": training_step,
                        "inference_step": done,
                        "prompt": prompt,
                        "width": image.width,
                        "height": image.height,
                        "image_png_base64": png_base64(image),
                    }
                )
            return tensors

        return on_step_end
