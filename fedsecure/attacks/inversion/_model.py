"""Access to the parts of a (peft-wrapped) Llama-family decoder, and an incremental first block.

:class:`FirstBlock` runs the first decoder block one position at a time for many
candidate prefixes at once (a KV cache per prefix), returning the inputs of every LoRA
site that the ordering search checks: the first block's o_proj input, MLP input and
down_proj input, and the second block's attention input. It calls the model's own
(LoRA-wrapped) projections, norms and rotary embedding, and :meth:`FirstBlock.self_check`
compares it with the model's real forward pass before any result is trusted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

ORDER_SITES: tuple[tuple[str, int], ...] = (("o", 0), ("mlp", 0), ("down", 0), ("attn", 1))


@dataclass
class DecoderParts:
    causal_lm: torch.nn.Module
    embed: torch.nn.Embedding
    layers: Sequence[torch.nn.Module]
    rotary: torch.nn.Module
    config: Any


def decoder_parts(model: torch.nn.Module) -> DecoderParts:
    """Unwrap a peft model to its Llama-style pieces, or raise a clear error."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", None)
    needed = ("embed_tokens", "layers", "rotary_emb")
    if inner is None or not all(hasattr(inner, n) for n in needed):
        raise ValueError(
            f"{type(base).__name__} is not a Llama-family causal LM (needs .model.embed_tokens, .layers, "
            ".rotary_emb); gradient inversion supports Llama/Mistral/Qwen2/SmolLM decoders"
        )
    layer0 = inner.layers[0]
    attn = getattr(layer0, "self_attn", None)
    if attn is None or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
        raise ValueError(f"{type(layer0).__name__} has no q/k/v/o projections; not a Llama-style block")
    if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
        raise ValueError(
            f"{type(attn).__name__} normalises q/k per head (Qwen3/OLMo2 style); the incremental first block "
            "supports Llama/Mistral/Qwen2 blocks only"
        )
    return DecoderParts(base, inner.embed_tokens, inner.layers, inner.rotary_emb, base.config)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class PrefixCache:
    """Keys/values of the first block for a batch of prefixes (all of the same length)."""

    keys: torch.Tensor
    """``P x Hkv x L x hd`` (rotary already applied)."""
    values: torch.Tensor
    """``P x Hkv x L x hd``."""


class _Stop(Exception):
    pass


class FirstBlock:
    """Incremental evaluation of the first decoder block for candidate prefixes."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.parts = decoder_parts(model)
        cfg = self.parts.config
        self.layer0 = self.parts.layers[0]
        self.layer1 = self.parts.layers[1] if len(self.parts.layers) > 1 else None
        attn = self.layer0.self_attn
        self.head_dim = int(getattr(attn, "head_dim", cfg.hidden_size // cfg.num_attention_heads))
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        self.scaling = float(getattr(attn, "scaling", self.head_dim**-0.5))
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
            self.window = int(cfg.sliding_window)
        else:
            self.window = 0

    def empty(self) -> PrefixCache:
        z = torch.zeros(1, self.n_kv, 0, self.head_dim)
        return PrefixCache(z, z.clone())

    def _rope(self, x: torch.Tensor, position: int) -> torch.Tensor:
        pos = torch.tensor([[position]])
        cos, sin = self.parts.rotary(x.reshape(1, 1, -1)[..., : self.head_dim], pos)
        cos = cos.reshape(1, 1, self.head_dim).to(x.dtype)
        sin = sin.reshape(1, 1, self.head_dim).to(x.dtype)
        return x * cos + _rotate_half(x) * sin

    @torch.no_grad()
    def extend(
        self, cache: PrefixCache, tokens: torch.Tensor, position: int
    ) -> tuple[dict[tuple[str, int], torch.Tensor], torch.Tensor, torch.Tensor]:
        """Append each token of ``tokens`` (n) to each prefix of ``cache`` (P) at ``position``.

        Returns ``(sites, new_keys, new_values)``: ``sites[site]`` is ``P x n x width`` (the
        inputs of that LoRA site at the new position), ``new_keys``/``new_values`` are
        ``n x Hkv x hd`` (the new position's entries, identical for every prefix).
        """
        attn = self.layer0.self_attn
        x0 = self.layer0.input_layernorm(self.parts.embed(tokens).float())  # n x d
        n = tokens.shape[0]
        q = attn.q_proj(x0).view(n, self.n_heads, self.head_dim)
        k = attn.k_proj(x0).view(n, self.n_kv, self.head_dim)
        v = attn.v_proj(x0).view(n, self.n_kv, self.head_dim)
        q = self._rope(q, position)
        k = self._rope(k, position)
        groups = self.n_heads // self.n_kv
        qg = q.view(n, self.n_kv, groups, self.head_dim)
        keys, values = cache.keys, cache.values  # P x Hkv x L x hd
        p_count, length = keys.shape[0], keys.shape[2]
        if self.window and length + 1 > self.window:
            start = length + 1 - self.window
            keys, values = keys[:, :, start:], values[:, :, start:]
        prev = torch.einsum("nkgd,pkld->pnkgl", qg, keys) * self.scaling  # P x n x Hkv x g x L
        own = (qg * k.unsqueeze(2)).sum(-1) * self.scaling  # n x Hkv x g
        scores = torch.cat([prev, own.unsqueeze(0).unsqueeze(-1).expand(p_count, -1, -1, -1, 1)], dim=-1)
        w = torch.softmax(scores.float(), dim=-1)
        out = torch.einsum("pnkgl,pkld->pnkgd", w[..., :-1], values) + w[..., -1:] * v.view(
            1, n, self.n_kv, 1, self.head_dim
        )
        o_in = out.reshape(p_count, n, self.n_heads * self.head_dim)
        h = self.parts.embed(tokens).float().unsqueeze(0) + attn.o_proj(o_in)
        mlp = self.layer0.mlp
        m_in = self.layer0.post_attention_layernorm(h)
        d_in = mlp.act_fn(mlp.gate_proj(m_in)) * mlp.up_proj(m_in)
        h1 = h + mlp.down_proj(d_in)
        sites: dict[tuple[str, int], torch.Tensor] = {("o", 0): o_in, ("mlp", 0): m_in, ("down", 0): d_in}
        if self.layer1 is not None:
            sites[("attn", 1)] = self.layer1.input_layernorm(h1)
        return sites, k, v

    @staticmethod
    def append(cache: PrefixCache, parents: torch.Tensor, token_index: torch.Tensor, k, v) -> PrefixCache:
        """The caches of the chosen extensions: prefix ``parents[j]`` + token ``token_index[j]``."""
        keys = torch.cat([cache.keys[parents], k[token_index].unsqueeze(2)], dim=2)
        values = torch.cat([cache.values[parents], v[token_index].unsqueeze(2)], dim=2)
        return PrefixCache(keys, values)

    @torch.no_grad()
    def reference_sites(self, ids: torch.Tensor) -> dict[tuple[str, int], torch.Tensor]:
        """The same site inputs from the model's own forward pass (hooks), for ``ids`` (1 x L)."""
        captured: dict[tuple[str, int], torch.Tensor] = {}
        attn0 = self.layer0.self_attn
        mlp0 = self.layer0.mlp
        targets: list[tuple[tuple[str, int], torch.nn.Module]] = [
            (("o", 0), attn0.o_proj),
            (("mlp", 0), mlp0.gate_proj),
            (("down", 0), mlp0.down_proj),
        ]
        if self.layer1 is not None:
            targets.append((("attn", 1), self.layer1.self_attn.q_proj))
        handles = []

        def make(site: tuple[str, int], last: bool):
            def hook(_mod, args):
                captured[site] = args[0].detach().float()[0]
                if last:
                    raise _Stop

            return hook

        for i, (site, mod) in enumerate(targets):
            handles.append(mod.register_forward_pre_hook(make(site, i == len(targets) - 1)))
        try:
            self.model(input_ids=ids, attention_mask=torch.ones_like(ids))
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        return captured

    def sites_for_sequence(self, ids: Sequence[int]) -> dict[tuple[str, int], torch.Tensor]:
        """Site inputs at every position of one sequence, computed incrementally (L x width)."""
        cache = self.empty()
        out: dict[tuple[str, int], list[torch.Tensor]] = {}
        for pos, tok in enumerate(ids):
            sites, k, v = self.extend(cache, torch.tensor([tok]), pos)
            for s, t in sites.items():
                out.setdefault(s, []).append(t[0, 0])
            cache = self.append(cache, torch.tensor([0]), torch.tensor([0]), k, v)
        return {s: torch.stack(v) for s, v in out.items()}

    def self_check(self, ids: Sequence[int], *, tol: float = 1e-3) -> float:
        """Compare the incremental block with the model's forward pass; raise if they differ.

        Returns the largest relative difference over sites and positions.
        """
        inc = self.sites_for_sequence(ids)
        ref = self.reference_sites(torch.tensor([list(ids)]))
        worst = 0.0
        for site, r in ref.items():
            a = inc[site]
            diff = float(((a - r).norm(dim=-1) / r.norm(dim=-1).clamp_min(1e-12)).max())
            worst = max(worst, diff)
        if worst > tol:
            raise RuntimeError(
                f"incremental first block disagrees with the model's forward pass (relative difference "
                f"{worst:.2e} > {tol:g}); this architecture is not supported by the ordering search"
            )
        return worst
