"""A malicious server's choice of the adapter it broadcasts, to make round 1 invertible.

With peft's default initialisation (``B = 0``) the first round's A-gradient is exactly
zero and the B-gradient only identifies fewer than ``r`` tokens. A server that is
allowed to pick the adapter it sends (nothing in FedAvg authenticates it against a
training history) chooses one that makes the update exactly invertible:

- ``"quiet"`` (default): ``A = 0`` and ``B`` Gaussian of tiny scale (``1e-12``). The
  adapter contributes nothing to the forward pass, the A-gradient ``s B^T G X^T`` is
  non-zero with rows in the input span, the B-gradient is zero, and the update of ``A``
  starts from exactly 0 so no float32 rounding of large weights blurs it. For SGD it
  stays exact over any number of local steps (the model does not move); for Adam the
  gradients are far below Adam's ``eps`` so the first step is ``-lr g / eps``, linear
  in ``g`` -- one local step is exactly invertible (with more steps the parameters grow
  by ``lr / eps`` per step and Adam's normalisation takes over).
- ``"nonzero-b"``: keep ``A``, draw ``B`` with std ``scale`` (default 0.02). Less
  conspicuous, exact for single-step SGD (within float32 rounding).

Randomness here is not a secret (the server's own choice); a seeded generator keeps runs
reproducible.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedsecure.attacks.inversion._layout import LoraLayout
from fedsecure.types import AdapterDelta

CRAFTS = ("quiet", "nonzero-b")
DEFAULT_SCALE = {"quiet": 1e-12, "nonzero-b": 0.02}


def craft_adapter(
    global_state: Mapping[str, torch.Tensor], *, craft: str = "quiet", scale: float | None = None, seed: int = 0
) -> AdapterDelta:
    """The adapter a malicious server sends instead of ``global_state``.

    Parameters
    ----------
    global_state:
        The honest global adapter (its keys and shapes are kept).
    craft:
        ``"quiet"`` or ``"nonzero-b"`` (module docstring).
    scale:
        Standard deviation of the crafted ``B`` (default: 1e-12 quiet, 0.02 nonzero-b).
    seed:
        Seed of the crafted values.
    """
    if craft not in CRAFTS:
        raise ValueError(f"craft must be one of {', '.join(CRAFTS)}, got {craft!r}")
    std = DEFAULT_SCALE[craft] if scale is None else float(scale)
    if not std > 0:
        raise ValueError(f"craft scale must be > 0, got {scale!r}")
    layout = LoraLayout.of(global_state)
    gen = torch.Generator().manual_seed(int(seed))
    out: AdapterDelta = {k: v.detach().float().clone() for k, v in global_state.items()}
    for m in layout.modules:
        b = out[m.key_b]
        out[m.key_b] = torch.randn(b.shape, generator=gen, dtype=torch.float32) * std
        if craft == "quiet":
            out[m.key_a] = torch.zeros_like(out[m.key_a])
    return out


def b_is_zero(global_state: Mapping[str, torch.Tensor]) -> bool:
    """True when every ``lora_B`` of the adapter is exactly zero (peft's fresh init)."""
    layout = LoraLayout.of(global_state)
    return all(float(global_state[m.key_b].abs().max()) == 0.0 for m in layout.modules)
