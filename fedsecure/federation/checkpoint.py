"""Round checkpoints: the global adapter (safetensors) + JSON state; resume from the latest."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fedsecure.types import AdapterDelta


def save_checkpoint(
    directory: str | Path, *, round_index: int, global_state: Mapping[str, torch.Tensor], state: Mapping[str, Any]
) -> Path:
    """Write ``round_<r>/`` atomically: ``adapter.safetensors`` and ``state.json``."""
    from safetensors.torch import save_file

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round_{round_index:04d}"
    tmp = root / f".round_{round_index:04d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.contiguous() for k, v in global_state.items()}, str(tmp / "adapter.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"round": round_index, **state}, default=_json_default))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def latest_checkpoint(directory: str | Path) -> Path | None:
    root = Path(directory)
    if not root.is_dir():
        return None
    rounds = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("round_"))
    return rounds[-1] if rounds else None


def load_checkpoint(path: str | Path) -> tuple[int, AdapterDelta, dict[str, Any]]:
    from fedsecure.models.lora import load_adapter_file

    p = Path(path)
    state = json.loads((p / "state.json").read_text())
    adapter = load_adapter_file(p / "adapter.safetensors")
    return int(state["round"]), adapter, state


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")
