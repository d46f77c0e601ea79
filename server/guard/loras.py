"""The server's LoRA folder (BEYOND_LORA_DIR), checked against the model it serves (BEYOND_MODEL)."""

from __future__ import annotations

from typing import Any

from models.errors import ModelSpecError
from models.lora_files import LoraLibrary
from models.lora_layout import layout


def lora_library(settings: Any) -> LoraLibrary:
    """The LoRAs a request may name. Files are checked against the served model's layers, which the
    model's configs give without torch; for a model spec that cannot be read here (the worker reports
    that itself), against SDXL's."""
    if settings.lora_dir is None:
        return LoraLibrary(None, None)
    from models.loading import model_configs
    from models.loading.source import sdxl_configs

    try:
        configs = model_configs(settings.model, settings.tokenizer_dir)
    except ModelSpecError:
        configs = sdxl_configs()
    return LoraLibrary(settings.lora_dir, layout(configs["unet"], configs["text_encoder"], configs["text_encoder_2"]))
