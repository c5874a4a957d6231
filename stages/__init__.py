"""Pipeline stages: one thin typer command each (read params, call sdxl_lib, write artifacts)."""

import os

# Our progress bars say what runs; the libraries' notices and loading bars would bury them. Set
# before the libraries are imported, as they read these once (diffusers' bars: stages.common).
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' bars follow the Hub's
