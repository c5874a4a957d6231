"""Validation previews reach a webhook as the images form; a webhook that is down never stops a run."""

from __future__ import annotations

import base64
import io
import socket

import pytest
from conftest import RecordingServer, tiny_pipeline
from PIL import Image

from sdxl_lib.config import WEBHOOK_URL_ENV, ValidationParams
from sdxl_lib.evaluate.images import generate_validation_images
from sdxl_lib.evaluate.previews import Previews, Webhook
from sdxl_lib.models import TINY_TAESD
from sdxl_lib.models.loading import load_preview_decoder


def preview_settings(url: str, steps: int = 6, every: int = 2) -> ValidationParams:
    return ValidationParams(
        validation_prompt=["a red circle", "a blue square"],
        validation_resolution="64x64,128x64",
        validation_num_inference_steps=steps,
        validation_preview=True,
        validation_preview_steps=every,
        validation_preview_model=TINY_TAESD,
        webhook_url=url,
    )


@pytest.mark.parametrize(("steps", "every"), [(6, 2), (5, 5), (4, 1)])
def test_webhook_receives_steps_over_preview_steps_previews_per_prompt(steps: int, every: int) -> None:
    with RecordingServer() as server:
        settings = preview_settings(server.url, steps, every)
        previews = Previews(load_preview_decoder(TINY_TAESD), every, Webhook(server.url))
        images = generate_validation_images(tiny_pipeline(), settings, previews, training_step=40)
    assert len(images) == 4  # previews change nothing about the validation images themselves
    per_image = steps // every
    assert len(server.documents) == 4 * per_image
    jobs = [(prompt, size) for prompt in settings.prompts for size in settings.sizes]
    for index, (prompt, (width, height)) in enumerate(jobs):
        sent = server.documents[index * per_image : (index + 1) * per_image]
        assert [d["inference_step"] for d in sent] == [every * (i + 1) for i in range(per_image)]
        for document in sent:
            assert (document["prompt"], document["step"]) == (prompt, 40)
            assert (document["width"], document["height"]) == (width, height)
            image = Image.open(io.BytesIO(base64.b64decode(document["image_png_base64"])))
            assert image.format == "PNG" and image.size == (width, height)


def test_a_failing_webhook_is_retried_then_reported_once_and_left_alone(
    capsys: pytest.CaptureFixture,
) -> None:
    with RecordingServer(status=500) as server:
        previews = Previews(load_preview_decoder(TINY_TAESD), 1, Webhook(server.url, backoff_s=0.01))
        images = generate_validation_images(tiny_pipeline(), preview_settings(server.url, 4, 1), previews)
    assert len(images) == 4  # validation (and so training) went on
    assert server.requests == 3  # one preview's bounded retries, then nothing more
    err = capsys.readouterr().err
    warnings = [line[line.index("warning:") :] for line in err.splitlines() if "warning: webhook" in line]
    assert warnings == [
        f"warning: webhook http://127.0.0.1:{server.httpd.server_address[1]} failed 3 times (HTTP 500); "
        "no more previews are sent this run (training goes on)"
    ]
    assert "secret-token" not in warnings[0]  # the path of a webhook URL is its secret


def test_an_unreachable_webhook_does_not_stop_validation() -> None:
    with socket.socket() as free:  # a port nothing listens on
        free.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{free.getsockname()[1]}/hook"
    webhook = Webhook(url, backoff_s=0.01)
    previews = Previews(load_preview_decoder(TINY_TAESD), 2, webhook)
    images = generate_validation_images(tiny_pipeline(), preview_settings(url), previews)
    assert len(images) == 4 and webhook.down


def test_previews_need_a_webhook(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(WEBHOOK_URL_ENV, raising=False)
    with pytest.raises(ValueError, match=f"validation_preview needs a webhook: set .*{WEBHOOK_URL_ENV}"):
        ValidationParams(validation_preview=True)
    monkeypatch.setenv(WEBHOOK_URL_ENV, "ftp://example.org/hook")
    with pytest.raises(ValueError, match=f"{WEBHOOK_URL_ENV} must be an http:// or https:// URL"):
        ValidationParams(validation_preview=True)


def test_the_webhook_url_comes_from_params_before_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(WEBHOOK_URL_ENV, "https://hooks.example.org/from-env")
    assert ValidationParams(validation_preview=True).webhook == "https://hooks.example.org/from-env"
    in_params = ValidationParams(validation_preview=True, webhook_url="http://127.0.0.1:9/hook")
    assert in_params.webhook == "http://127.0.0.1:9/hook"
    assert ValidationParams().webhook_url is None  # the environment's URL never becomes a param
