"""LoRA attach (peft), adapter <-> flat vector, and safetensors adapter I/O.

Adapters are saved in PEFT's own format (``adapter_config.json`` +
``adapter_model.safetensors``) so ``PeftModel.from_pretrained`` reads them. Loading only
ever goes through safetensors: a file that is not safetensors is refused, never unpickled.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedsecure.types import AdapterDelta

ALL_LINEAR = "all-linear"
LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters (Hu et al. 2022).

    Attributes
    ----------
    rank: the adapter rank r (> 0).
    alpha: scaling numerator (effective scale alpha / r).
    dropout: LoRA dropout probability in [0, 1).
    target_modules: Linear module names, or ``"all-linear"``. Embeddings are refused
        (Opacus cannot compute per-sample gradients for LoRA on embeddings).
    init: ``"default"`` (peft: A random, B = 0) or ``"gaussian"``.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str = ("q_proj", "v_proj")
    init: str = "default"
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"lora.rank must be a positive integer, got {self.rank!r}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in ("default", "gaussian"):
            raise ValueError(f"lora.init must be 'default' or 'gaussian', got {self.init!r}")
        tm = self.target_modules
        if isinstance(tm, str):
            if tm != ALL_LINEAR:
                object.__setattr__(self, "target_modules", (tm,))
        else:
            object.__setattr__(self, "target_modules", tuple(tm))
            if not self.target_modules:
                raise ValueError("lora.target_modules must name at least one module or be 'all-linear'")
        names = (self.target_modules,) if isinstance(self.target_modules, str) else self.target_modules
        bad = [n for n in names if "embed" in n or n == "lm_head"]
        if bad:
            raise ValueError(
                f"lora.target_modules {bad} are embeddings/output heads: LoRA there breaks per-sample "
                "gradients (DP-SGD); target Linear layers such as q_proj, v_proj or 'all-linear'"
            )

    def modules(self) -> list[str] | str:
        return ALL_LINEAR if self.target_modules == ALL_LINEAR else list(self.target_modules)


def attach_lora(model: torch.nn.Module, settings: LoraSettings, *, device: str | torch.device = "cpu") -> Any:
    """Wrap ``model`` with a fresh LoRA adapter named ``default``; base weights frozen.

    The model is moved to ``device`` *before* peft wraps it (Opacus#820: moving a peft
    model afterwards can silently detach the adapter from the optimizer).
    """
    from peft import LoraConfig, get_peft_model

    model = model.to(device)
    cfg = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.modules(),
        task_type="CAUSAL_LM",
        init_lora_weights=True if settings.init == "default" else "gaussian",
        bias="none",
    )
    peft_model = get_peft_model(model, cfg)
    return peft_model


def get_adapter_state(peft_model: Any) -> AdapterDelta:
    """Trainable adapter tensors with peft's adapter-name-free keys, in a fixed order (copies)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model)
    return {k: v.detach().clone().float().cpu() for k, v in sorted(state.items())}


def set_adapter_state(peft_model: Any, state: Mapping[str, torch.Tensor]) -> None:
    """Load ``state`` into the adapter in place; every key must match."""
    from peft import set_peft_model_state_dict

    current = get_adapter_state(peft_model)
    missing = sorted(set(current) - set(state))
    extra = sorted(set(state) - set(current))
    if missing or extra:
        raise ValueError(
            f"adapter state does not match the model's adapter: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(current[k].shape):
            raise ValueError(f"adapter tensor {k} has shape {tuple(v.shape)}, model expects {tuple(current[k].shape)}")
    result = set_peft_model_state_dict(peft_model, dict(state))
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"peft did not accept adapter keys {unexpected[:3]}")


@dataclass(frozen=True)
class FlatSpec:
    """Names, shapes and offsets of a flattened adapter (ordered)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        out = []
        for s in self.shapes:
            n = 1
            for d in s:
                n *= d
            out.append(n)
        return tuple(out)

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    @classmethod
    def of(cls, state: Mapping[str, torch.Tensor]) -> FlatSpec:
        return cls(tuple(state), tuple(tuple(t.shape) for t in state.values()))


def flatten_adapter(state: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, FlatSpec]:
    """Concatenate the tensors of ``state`` in order into one fp32 vector (exact)."""
    spec = FlatSpec.of(state)
    if not state:
        return torch.zeros(0), spec
    vec = torch.cat([t.detach().reshape(-1).float().cpu() for t in state.values()])
    return vec, spec


def unflatten_adapter(vec: torch.Tensor, spec: FlatSpec) -> AdapterDelta:
    """Inverse of :func:`flatten_adapter`."""
    if vec.ndim != 1 or vec.numel() != spec.numel:
        raise ValueError(f"flat adapter has {vec.numel()} values, spec expects {spec.numel}")
    out: AdapterDelta = {}
    offset = 0
    for name, shape, size in zip(spec.names, spec.shapes, spec.sizes, strict=True):
        out[name] = vec[offset : offset + size].reshape(shape).clone()
        offset += size
    return out


def save_adapter(peft_model: Any, directory: str | Path, *, state: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Save the adapter in PEFT's format (``adapter_model.safetensors``); optional ``state`` overrides."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if state is not None:
        set_adapter_state(peft_model, state)
    peft_model.save_pretrained(str(directory), safe_serialization=True)
    return directory


_SAFETENSORS_NAME = "adapter_model.safetensors"


def load_adapter_file(path: str | Path) -> AdapterDelta:
    """Read adapter tensors from a PEFT adapter directory or a ``.safetensors`` file.

    Anything that is not a safetensors file (e.g. a pickled ``adapter_model.bin``) is
    refused: unpickling untrusted files can execute code.
    """
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_dir():
        if not (p / _SAFETENSORS_NAME).exists():
            found = sorted(x.name for x in p.iterdir())
            raise ValueError(
                f"{p} has no {_SAFETENSORS_NAME} (found {found[:5]}); fedsecure loads adapters only from "
                "safetensors: re-save with save_pretrained(..., safe_serialization=True)"
            )
        p = p / _SAFETENSORS_NAME
    if not p.exists():
        raise FileNotFoundError(f"adapter file {p} does not exist")
    with open(p, "rb") as fh:
        head = fh.read(8)
    if len(head) < 8 or int.from_bytes(head, "little") > 100_000_000:
        raise ValueError(f"{p} is not a safetensors file; refusing to load it (never unpickled)")
    try:
        state = load_file(str(p))
    except Exception as err:
        raise ValueError(f"{p} is not a valid safetensors file: {err}") from err
    return {k: v.float() for k, v in sorted(state.items())}


def load_adapter_config(directory: str | Path) -> dict[str, Any]:
    cfg = Path(directory) / "adapter_config.json"
    if not cfg.exists():
        raise FileNotFoundError(f"{cfg} not found: is {directory} a PEFT adapter directory?")
    return json.loads(cfg.read_text())


def trainable_base_check(peft_model: Any) -> tuple[list[str], list[str]]:
    """(trainable adapter names, trainable non-adapter names); the second must be empty."""
    adapter, other = [], []
    for n, p in peft_model.named_parameters():
        if p.requires_grad:
            (adapter if "lora_" in n else other).append(n)
    return adapter, other


def state_names(state: Mapping[str, torch.Tensor]) -> Sequence[str]:
    return list(state)
