"""configure: a few questions, answered into a params.yaml for your own model and images."""

from pathlib import Path

import torch
import typer

from sdxl_lib.config import Params, dump_params, parse_params, sanity_warnings
from sdxl_lib.data.images import count_images
from stages.common import run


def ask_folder(question: str) -> Path:
    while True:
        folder = Path(typer.prompt(question)).expanduser()
        if folder.is_dir() and count_images(folder):
            return folder
        typer.echo(f"{folder}: not a folder with images (png, jpg, webp ...); try again")


def main(
    output: Path = typer.Option(Path("params.yaml"), "-o", "--output", help="The params file to write."),
) -> None:
    """Ask for base model, images, resolution, rank and steps; check them; write params.yaml."""
    defaults = Params()
    model = typer.prompt(
        "Base model (Hub id, a local folder, or builtin:tiny-sdxl)",
        defaults.model.pretrained_model_name_or_path,
    )
    folder = ask_folder("Folder of training images")
    captions = typer.prompt("Captions from (textfile: a .txt beside each image | filename)", "textfile")
    resolution = typer.prompt("Training resolution (edge in pixels)", 1024, type=int)
    rank = typer.prompt("LoRA rank", defaults.train.lora_rank, type=int)
    steps = typer.prompt("Training steps", 1000, type=int)
    batch_size = typer.prompt("Batch size", 1, type=int)
    learning_rate = typer.prompt("Learning rate", 1e-4, type=float)
    precision = typer.prompt(
        "Mixed precision (bf16 | fp16 | no)", "bf16" if torch.cuda.is_available() else "no"
    )
    prompt = typer.prompt("A validation prompt", "a photo")
    params = parse_params(
        {
            "model": {"pretrained_model_name_or_path": model},
            "validation": {"validation_prompt": prompt},
            "download": {"datasets": [{"id": folder.name or "images", "source": str(folder.resolve())}]},
            "bucket": {"resolution": resolution, "caption_strategy": captions},
            "train": {
                "lora_rank": rank,
                "max_train_steps": steps,
                "train_batch_size": batch_size,
                "learning_rate": learning_rate,
                "mixed_precision": precision,
            },
        },
        "your answers",
    )
    warnings = sanity_warnings(params, count_images(folder), torch.cuda.is_available())
    for warning in warnings:
        typer.echo(f"warning: {warning}")
    if warnings and not typer.confirm("Write params.yaml anyway?", default=False):
        raise typer.Exit(1)
    if output.exists() and not typer.confirm(f"{output} exists. Replace it?", default=True):
        raise typer.Exit(1)
    output.write_text(
        dump_params(params, "Written by `sdxl-lora configure`; every key is documented in README.md.")
    )
    typer.echo(f"configure: wrote {output}; run `dvc repro` to train")


if __name__ == "__main__":
    run(main)
