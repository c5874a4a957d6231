"""Pipeline stages: one thin typer command each (read params, call sdxl_lib, write artifacts)."""

import os

from huggingface_hub import constants
from huggingface_hub.utils import disable_progress_bars

# Our progress bars say what runs; the libraries' notices and loading bars would bury them. Set
# before the libraries are imported, as they read these once (diffusers' bars: stages.common).
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# The Hub's bars, and transformers' loading bars, which start as the Hub's are. Switched off in
# code, not by HF_HUB_DISABLE_PROGRESS_BARS, so that fetching from the Hub can show its progress.
if constants.HF_HUB_DISABLE_PROGRESS_BARS is None:  # the user's own setting wins
    disable_progress_bars()
