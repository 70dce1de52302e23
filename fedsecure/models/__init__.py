"""Base models (catalog), LoRA attach, adapter <-> flat vector, safetensors adapter I/O."""

from fedsecure.models.catalog import cache_dir, load_model, load_tokenizer
from fedsecure.models.lora import (
    FlatSpec,
    LoraSettings,
    attach_lora,
    flatten_adapter,
    get_adapter_state,
    load_adapter_config,
    load_adapter_file,
    save_adapter,
    set_adapter_state,
    unflatten_adapter,
)

__all__ = [
    "FlatSpec",
    "LoraSettings",
    "attach_lora",
    "cache_dir",
    "flatten_adapter",
    "get_adapter_state",
    "load_adapter_config",
    "load_adapter_file",
    "load_model",
    "load_tokenizer",
    "save_adapter",
    "set_adapter_state",
    "unflatten_adapter",
]
