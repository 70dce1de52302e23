"""Shared helpers for the DP tests: tiny model, synthetic token datasets (no data package needed)."""

from __future__ import annotations

import torch

from fedsecure.models import LoraSettings, attach_lora, load_model

PATTERN = (101, 202, 303, 404, 505, 606)


class PatternDataset(torch.utils.data.Dataset):
    """Rows of a periodic token pattern (learnable fast) or random tokens, variable length."""

    def __init__(self, n: int, *, seed: int = 0, random_tokens: bool = False, min_len: int = 10, max_len: int = 24):
        g = torch.Generator().manual_seed(seed)
        self.rows = []
        for _ in range(n):
            length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
            if random_tokens:
                row = torch.randint(0, 2000, (length,), generator=g)
            else:
                start = int(torch.randint(0, len(PATTERN), (1,), generator=g))
                row = torch.tensor([PATTERN[(start + i) % len(PATTERN)] for i in range(length)])
            self.rows.append(row)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i]}


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right padding; the first 3 tokens of each row are prompt (label -100)."""
    rows = [it["input_ids"] for it in items]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    att = torch.zeros(len(rows), width, dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        att[i, : len(r)] = 1
        lab[i, 3 : len(r)] = r[3:]
    return {"input_ids": ids, "attention_mask": att, "labels": lab}


def tiny_lora(*, targets=("q_proj", "v_proj"), seed: int = 0, init: str = "default"):
    model, _ = load_model("tiny", seed=seed)
    return attach_lora(model, LoraSettings(target_modules=targets, init=init))


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def frozen_copy(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
