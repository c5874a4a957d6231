"""sdxl-lora: the library behind the pipeline stages.

Organised by concern: config, data, models, cache, train, evaluate, export.
"""
