"""Pipeline stages: one thin typer command each (read params, call sdxl_lib, write artifacts)."""

import os

# Our progress bars say what runs; the libraries' import-time notices would bury them.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
