"""A minimal TOML writer for resolved scenario trees (tables, arrays of tables, scalars, lists)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)


def _is_table_array(v: Any) -> bool:
    return isinstance(v, list | tuple) and bool(v) and all(isinstance(x, Mapping) for x in v)


def dumps(tree: Mapping[str, Any], _prefix: str = "") -> str:
    lines: list[str] = []
    scalars = {k: v for k, v in tree.items() if not isinstance(v, Mapping) and not _is_table_array(v)}
    for k, v in scalars.items():
        lines.append(f"{_key(k)} = {_value(v)}")
    for k, v in tree.items():
        name = f"{_prefix}{_key(k)}"
        if isinstance(v, Mapping):
            lines.append("")
            lines.append(f"[{name}]")
            body = dumps(v, _prefix=name + ".")
            if body:
                lines.append(body)
        elif _is_table_array(v):
            for item in v:
                lines.append("")
                lines.append(f"[[{name}]]")
                body = dumps(item, _prefix=name + ".")
                if body:
                    lines.append(body)
    return "\n".join(lines).strip("\n") + ("\n" if not _prefix else "")
