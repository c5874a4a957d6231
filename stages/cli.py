"""`sdxl-lora`: every pipeline stage as a subcommand (what dvc.yaml runs)."""

import typer

from stages import (
    bucket,
    configure,
    download,
    encode_latents,
    encode_text,
    evaluate,
    evaluate_lora,
    export,
    import_simpletuner,
    train,
)
from stages.common import guarded

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="SDXL LoRA training as a DVC pipeline of stages.",
)
for name, module in [
    ("download", download),
    ("bucket", bucket),
    ("encode_latents", encode_latents),
    ("encode_text", encode_text),
    ("train", train),
    ("evaluate", evaluate),
    ("evaluate-lora", evaluate_lora),
    ("export", export),
    ("import-simpletuner", import_simpletuner),
    ("configure", configure),
]:
    app.command(name, help=module.main.__doc__)(guarded(module.main))

if __name__ == "__main__":
    app()
