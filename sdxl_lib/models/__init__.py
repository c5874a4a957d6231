"""Model loading, the built-in tiny models and their names (here, so naming one loads no library)."""

TINY_SDXL = "builtin:tiny-sdxl"
TINY_CLIP = "builtin:tiny-clip"
TINY_TAESD = "builtin:tiny-taesd"
