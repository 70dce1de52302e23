"""Where the LoRA matrices of a Llama-style model sit, and what their inputs are.

The attack needs, for every LoRA'd Linear, its layer, its module name, the keys of its
``lora_A``/``lora_B`` tensors in an :data:`~fedsecure.types.AdapterDelta`, and its *input
site*: modules that read the same tensor (q/k/v read the attention input norm; gate/up
read the MLP input norm) share a site, and the rows of their ``lora_A`` gradients lie in
the span of that site's inputs, so their rows can be stacked.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")

# module name -> input site kind (Llama / Mistral / Qwen2 naming)
SITE_OF_MODULE: dict[str, str] = {
    "q_proj": "attn",
    "k_proj": "attn",
    "v_proj": "attn",
    "o_proj": "o",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "down",
}


@dataclass(frozen=True)
class LoraModule:
    """One LoRA'd Linear: its layer, module name, adapter keys and input site."""

    layer: int
    module: str
    key_a: str
    key_b: str

    @property
    def site(self) -> tuple[str, int]:
        return (SITE_OF_MODULE[self.module], self.layer)


@dataclass(frozen=True)
class LoraLayout:
    """All LoRA'd modules of an adapter, grouped by input site."""

    modules: tuple[LoraModule, ...]
    rank: int

    @classmethod
    def of(cls, state: Mapping[str, torch.Tensor]) -> LoraLayout:
        """Parse adapter keys (peft's adapter-name-free names).

        Raises
        ------
        ValueError
            When a key is not a Llama-style ``layers.N.(self_attn|mlp).M.lora_(A|B).weight``
            (the attack supports Llama-family decoders: Llama, Mistral, Qwen2, SmolLM).
        """
        found: dict[tuple[int, str], dict[str, str]] = {}
        for key in state:
            m = _KEY.search(key)
            if m is None or m.group(3) not in SITE_OF_MODULE:
                raise ValueError(
                    f"adapter key {key!r} is not a LoRA weight of a Llama-style decoder layer "
                    "(layers.N.self_attn.q_proj.lora_A.weight ...); gradient inversion supports "
                    "Llama-family models with LoRA on Linear layers"
                )
            found.setdefault((int(m.group(1)), m.group(3)), {})[m.group(4)] = key
        mods = []
        ranks = set()
        for (layer, name), ab in sorted(found.items()):
            if set(ab) != {"A", "B"}:
                raise ValueError(f"layer {layer} {name}: adapter has lora_{next(iter(ab))} but not its pair")
            ranks.add(int(state[ab["A"]].shape[0]))
            mods.append(LoraModule(layer, name, ab["A"], ab["B"]))
        if not mods:
            raise ValueError("the adapter has no LoRA tensors")
        if len(ranks) != 1:
            raise ValueError(f"LoRA modules have different ranks {sorted(ranks)}; one rank is expected")
        return cls(tuple(mods), ranks.pop())

    def at_site(self, kind: str, layer: int) -> list[LoraModule]:
        return [m for m in self.modules if m.site == (kind, layer)]

    @property
    def num_layers_with_lora(self) -> int:
        return len({m.layer for m in self.modules})


def quantisation_noise(
    delta: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor]
) -> dict[str, float]:
    """Per-element standard deviation of the rounding noise in each tensor of a float32 update.

    A client trains in float32: every optimizer step rounds the weights to the float32 grid,
    so ``delta = trained - global`` carries rounding errors of about half an ulp of the
    trained weights (uniform, std ``ulp / sqrt(12)``) -- noise the server can compute
    exactly from the weights it sees. Small steps on large weights (SGD with a small lr)
    lose relative precision this way; it sets the numerical floor of every span check.
    """
    out = {}
    eps = torch.finfo(torch.float32).eps
    for k, d in delta.items():
        w = (global_state[k].detach().float() + d.detach().float()).abs().clamp_min(1e-38)
        ulp = eps * torch.exp2(torch.floor(torch.log2(w)))
        q = float(ulp.double().pow(2).mean().sqrt()) / math.sqrt(12.0)
        rel = 1e-7 * float(d.detach().double().norm()) / math.sqrt(max(1, d.numel()))
        out[k] = math.sqrt(q * q + rel * rel)
    return out


def stacked_rows(
    delta: Mapping[str, torch.Tensor],
    modules: list[LoraModule],
    *,
    noise: Mapping[str, float] | None = None,
    which: str = "A",
) -> torch.Tensor:
    """Stack the ``lora_A`` rows of ``modules`` (float64), each block whitened.

    With ``noise`` (per-element noise std per key, :func:`quantisation_noise`) every block
    is divided by its noise level, so the stacked noise is white with unit variance and the
    blocks with precise rows dominate; without it each block is scaled to unit Frobenius
    norm. Spans are invariant to per-block scaling. Blocks that are exactly zero are left out.
    """
    blocks = []
    for m in modules:
        key = m.key_a if which == "A" else m.key_b
        t = delta[key].detach().double()
        n = float(t.norm())
        if n == 0.0:
            continue
        scale = noise[key] if noise is not None and noise.get(key, 0.0) > 0 else n
        blocks.append(t / scale)
    if not blocks:
        width = int(delta[modules[0].key_a].shape[1]) if modules else 0
        return torch.zeros(0, width, dtype=torch.float64)
    return torch.cat(blocks, dim=0)


def noise_floor(rows: torch.Tensor, *, whitened: bool) -> float:
    """Spectral norm of unit-variance white noise of the shape of ``rows`` (0 when not whitened)."""
    if not whitened or rows.numel() == 0:
        return 0.0
    m, d = rows.shape
    return math.sqrt(m) + math.sqrt(d)
