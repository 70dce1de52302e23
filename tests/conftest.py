"""Shared fixtures: tiny-model scenarios that run in seconds."""

from __future__ import annotations

import os
from typing import Any

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_tree(**overrides: Any) -> dict[str, Any]:
    """A small scenario tree on the tiny model (2 clients x 2 rounds x 3 steps)."""
    tree: dict[str, Any] = {
        "name": "tiny-test",
        "seed": 0,
        "model": {"name": "tiny"},
        "lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "data": {
            "dataset": "private-records",
            "num_clients": 2,
            "examples_per_client": 12,
            "num_eval": 8,
            "num_nonmembers": 8,
            "canary_repetitions": [1],
            "max_length": 64,
        },
        "federation": {"rounds": 2, "local_steps": 3, "batch_size": 4, "lr": 5e-3, "eval_batch_size": 8},
    }
    for key, value in overrides.items():
        node = tree
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return tree


@pytest.fixture
def tiny_config():
    from fedsecure.config import config_from_dict

    def make(**overrides: Any):
        return config_from_dict(tiny_tree(**overrides))

    return make
