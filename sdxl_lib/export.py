"""Writing the trained LoRA: in diffusers' layout (what `StableDiffusionXLPipeline.load_lora_weights`
reads) and in kohya's (what A1111, Forge and ComfyUI load), each with ModelSpec / `ss_*` metadata."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from diffusers import StableDiffusionXLPipeline
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdxl_lib.errors import UserError
from sdxl_lib.interop.kohya import KOHYA_PREFIXES, to_kohya
from sdxl_lib.interop.metadata import IMPLEMENTATIONS, file_hashes, network_metadata
from sdxl_lib.interop.model_card import model_card
from sdxl_lib.io import replace_atomically, write_png, write_text

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHTS = "lora_kohya.safetensors"
# diffusers' key for the LoraConfigs, flattened as `<component>.<field>`.
ADAPTER_METADATA = "lora_adapter_metadata"
CARD = "README.md"
MAGNITUDE = "lora_magnitude_vector"  # peft's name of a DoRA magnitude
LoraFormat = Literal["both", "diffusers", "kohya"]


def lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors (peft names). Embeddings are never trained; saying so spares peft's
    check of the base model's vocabulary, which looks the model id up on the hub."""
    return get_peft_model_state_dict(model, save_embedding_layers=False)


def save_lora(
    models: dict[str, torch.nn.Module],
    directory: Path,
    initial: dict[str, dict[str, torch.Tensor]] | None = None,
    lora_format: LoraFormat = "both",
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Save the LoRA of each model in `models` (keyed by component name: unet, text_encoder,
    text_encoder_2) in `directory`, as LORA_WEIGHTS (diffusers) and/or KOHYA_WEIGHTS.

    `initial`: each adapter's starting weights when it was initialised from the base weights (PiSSA,
    OLoRA); the saved LoRA is then converted to apply to the original base model."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    configs: dict[str, dict] = {}
    for name, model in models.items():
        state = lora_state(model)
        if any(not torch.isfinite(t).all() for t in state.values()):
            raise UserError(f"refusing to export a LoRA whose {name} weights contain NaN or inf")
        config = model.peft_config["default"].to_dict()
        if initial is not None:
            state = as_standard_lora(state, initial[name])
            config.update(r=2 * config["r"], lora_alpha=2 * config["lora_alpha"], init_lora_weights=True)
        layers[name], configs[name] = state, config
    return write_lora(layers, configs, models["unet"].config, directory, lora_format, metadata or {})


def write_lora(
    layers: dict[str, dict[str, torch.Tensor]],
    configs: dict[str, dict[str, Any]],
    unet_config: Any,
    directory: Path,
    lora_format: LoraFormat,
    metadata: dict[str, str],
) -> list[Path]:
    """Write peft state dicts per component with their LoraConfigs (dicts) in the chosen formats;
    every file carries `metadata`, the network's shape, and its own implementation and hashes (which
    replace any carried over)."""
    shared = metadata | network_metadata(configs["unet"])
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    if lora_format in ("diffusers", "both"):
        # Text encoders load through transformers' `load_adapter`, which matches DoRA magnitudes by
        # parameter name (with `.weight`); under peft's bare name they would be silently left at init.
        diffusers_layers = {
            name: {
                f"{key}.weight" if name != "unet" and key.endswith(MAGNITUDE) else key: tensor
                for key, tensor in state.items()
            }
            for name, state in layers.items()
        }
        with tempfile.TemporaryDirectory(dir=directory) as staging:
            StableDiffusionXLPipeline.save_lora_weights(
                staging,
                # peft's key names throughout: diffusers' converter renames only attention modules, and
                # a file mixing both styles loads only part of its modules back.
                **{f"{name}_lora_layers": state for name, state in diffusers_layers.items()},
                **{f"{name}_lora_adapter_metadata": config for name, config in configs.items()},
                safe_serialization=True,
            )
            # save_lora_weights takes no metadata of ours: add it to the header it wrote.
            staged = Path(staging) / LORA_WEIGHTS
            tensors, own = load_file(staged), read_metadata(staged)
        path = directory / LORA_WEIGHTS
        replace_atomically(
            path, lambda tmp: save_file(tensors, tmp, metadata=stamped(tensors, own | shared, "diffusers"))
        )
        written.append(path)
    if lora_format in ("kohya", "both"):
        kohya = to_kohya(layers, configs, unet_config)
        path = directory / KOHYA_WEIGHTS
        replace_atomically(path, lambda tmp: save_file(kohya, tmp, metadata=stamped(kohya, shared, "kohya")))
        written.append(path)
    return written


def stamped(tensors: dict[str, torch.Tensor], metadata: dict[str, str], layout: str) -> dict[str, str]:
    metadata = metadata | {"modelspec.implementation": IMPLEMENTATIONS[layout]}
    return metadata | file_hashes(tensors, metadata)


def read_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as handle:
        return handle.metadata() or {}


def read_lora(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict[str, Any]]]:
    """A diffusers-layout LoRA file of ours back to peft state dicts and LoraConfigs per component."""
    metadata = read_metadata(path)
    if ADAPTER_METADATA not in metadata:
        raise ValueError(f"{path}: no {ADAPTER_METADATA} in its header (not a LoRA written by diffusers)")
    configs: dict[str, dict[str, Any]] = {}
    for key, value in json.loads(metadata[ADAPTER_METADATA]).items():
        component, field = key.split(".", 1)
        configs.setdefault(component, {})[field] = value
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(path).items():
        component, name = key.split(".", 1)
        if name.endswith(f"{MAGNITUDE}.weight"):  # the text encoders' spelling, see write_lora
            name = name.removesuffix(".weight")
        layers.setdefault(component, {})[name] = tensor
    return layers, configs


def lora_file(directory: Path) -> Path:
    """The LoRA file in `directory` to load with diffusers: ours in its layout, else the kohya one."""
    for name in (LORA_WEIGHTS, KOHYA_WEIGHTS):
        if (directory / name).is_file():
            return directory / name
    raise UserError(f"{directory}: no {LORA_WEIGHTS} or {KOHYA_WEIGHTS}; run the train stage first")


def save_widget_images(images: list[tuple[str, Image.Image]], directory: Path) -> list[tuple[str, str]]:
    """The final validation images beside the LoRA, for the model card's widget: (prompt, path)."""
    widget = []
    for index, (prompt, image) in enumerate(images):
        relative = f"images/validation_{index:02d}.png"
        write_png(image, directory / relative)
        widget.append((prompt, relative))
    return widget


def write_card(
    directory: Path, widget: list[tuple[str, str]], metrics: dict[str, Any], guidance: float
) -> None:
    """README.md: the Hugging Face model card of the LoRA in `directory`."""
    file = lora_file(directory)
    write_text(model_card(read_metadata(file), widget, metrics, guidance, file.name), directory / CARD)


def card_widget(directory: Path) -> list[tuple[str, str]]:
    """The (prompt, image path) pairs of the model card in `directory`, if it has one."""
    card = directory / CARD
    if not card.is_file():
        return []
    front = yaml.safe_load(card.read_text().split("---\n", 2)[1]) or {}
    return [(entry["text"], entry["output"]["url"]) for entry in front.get("widget", [])]


def export_lora(
    source: Path,
    target: Path,
    lora_format: LoraFormat,
    unet_config: Any,
    metrics: dict[str, Any],
    guidance: float,
) -> list[Path]:
    """Write the LoRA in `source` (a folder the train stage wrote) to `target` in `lora_format`, with
    its metadata carried over (hashes recomputed), its validation images and a model card."""
    file = source / LORA_WEIGHTS
    if not file.is_file():
        raise UserError(
            f"{file}: missing; export reads the diffusers-layout file (lora_format both or diffusers)"
        )
    layers, configs = read_lora(file)
    carried = {k: v for k, v in read_metadata(file).items() if k.startswith(("modelspec.", "ss_"))}
    written = write_lora(layers, configs, unet_config, target, lora_format, carried)
    widget = card_widget(source)
    for _, relative in widget:
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / relative, target / relative)
    write_card(target, widget, metrics, guidance)
    return written


def lora_components(file: Path) -> set[str]:
    """Which pipeline components (unet, text_encoder, text_encoder_2) a LoRA file of ours adapts, in
    either layout."""
    kohya_prefixes = {prefix: name for name, prefix in KOHYA_PREFIXES.items()}
    with safe_open(str(file), "pt") as handle:
        return {
            next((name for p, name in kohya_prefixes.items() if key.startswith(p)), key.split(".", 1)[0])
            for key in handle.keys()  # noqa: SIM118 (not a dict)
        }


def as_standard_lora(
    final: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """PiSSA and OLoRA move the adapter's starting point out of the base weights, so their adapter
    only works on that modified base. B1·A1 - B0·A0 is the change to the original base; as a LoRA of
    rank 2r it is B = [B1, -B0], A = [A1; A0] (peft's conversion), loadable on the original model.
    The caller doubles alpha with the rank so the scale alpha / r is unchanged."""
    converted = {}
    for name, tensor in final.items():
        if "lora_A" in name:
            converted[name] = torch.cat([tensor, initial[name]], dim=0)
        elif "lora_B" in name:
            converted[name] = torch.cat([tensor, -initial[name]], dim=1)
        else:
            converted[name] = tensor
    return converted
