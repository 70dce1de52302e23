"""Access to the parts of a (peft-wrapped) Llama-family decoder, and an incremental decoder stack.

:class:`PrefixStack` runs the first ``depth`` decoder blocks one position at a time for
many candidate (prefix, token) pairs at once, with a KV cache per prefix, and returns the
inputs of every LoRA site the ordering search checks: in each block ``l < depth`` the
o_proj, MLP and down_proj inputs, and block ``l + 1``'s attention input. It calls the
model's own (LoRA-wrapped) projections, norms and rotary embedding, so the adapter in the
model is the one evaluated, and :meth:`PrefixStack.self_check` compares it with the
model's real forward pass before any result is trusted.

Candidates can be *pruned between blocks* (``keep`` callback): only the pairs still
plausible after block ``l`` are carried into block ``l + 1``, which keeps deep checks cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

Site = tuple[str, int]


def stack_sites(depth: int, num_layers: int) -> list[Site]:
    """The sites whose inputs a stack of ``depth`` blocks computes, in evaluation order."""
    out: list[Site] = []
    for layer in range(min(depth, num_layers)):
        out += [("o", layer), ("mlp", layer), ("down", layer)]
        if layer + 1 < num_layers:
            out.append(("attn", layer + 1))
    return out


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
            f"{type(attn).__name__} normalises q/k per head (Qwen3/OLMo2 style); the incremental decoder "
            "supports Llama/Mistral/Qwen2 blocks only"
        )
    return DecoderParts(base, inner.embed_tokens, inner.layers, inner.rotary_emb, base.config)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class PrefixCache:
    """Keys/values of every block of the stack for a batch of prefixes (all of one length)."""

    keys: list[torch.Tensor]
    """Per block ``P x Hkv x L x hd`` (rotary already applied)."""
    values: list[torch.Tensor]


@dataclass
class Extension:
    """The evaluated (prefix, token) pairs of one position (after pruning)."""

    parent: torch.Tensor
    """Prefix index of each surviving pair (N)."""
    token: torch.Tensor
    """Token *index* (into the candidate tokens) of each surviving pair (N)."""
    sites: dict[Site, torch.Tensor]
    """Site inputs of the surviving pairs, ``N x width`` (only sites reached by all of them)."""
    keys: list[torch.Tensor]
    """Per block the new position's key of each surviving pair, ``N x Hkv x hd``."""
    values: list[torch.Tensor]


class _Stop(Exception):
    pass


class PrefixStack:
    """Incremental evaluation of the first ``depth`` decoder blocks for candidate prefixes."""

    def __init__(self, model: torch.nn.Module, *, depth: int = 1) -> None:
        self.model = model
        self.parts = decoder_parts(model)
        cfg = self.parts.config
        self.num_layers = len(self.parts.layers)
        self.depth = max(1, min(int(depth), self.num_layers))
        attn = self.parts.layers[0].self_attn
        self.head_dim = int(getattr(attn, "head_dim", cfg.hidden_size // cfg.num_attention_heads))
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        self.scaling = float(getattr(attn, "scaling", self.head_dim**-0.5))
        window = getattr(cfg, "sliding_window", None)
        self.window = int(window) if window and getattr(cfg, "use_sliding_window", True) else 0
        self.sites = stack_sites(self.depth, self.num_layers)

    def empty(self) -> PrefixCache:
        z = torch.zeros(1, self.n_kv, 0, self.head_dim)
        return PrefixCache([z.clone() for _ in range(self.depth)], [z.clone() for _ in range(self.depth)])

    def _rope(self, x: torch.Tensor, position: int) -> torch.Tensor:
        pos = torch.tensor([[position]])
        cos, sin = self.parts.rotary(x.reshape(1, 1, -1)[..., : self.head_dim], pos)
        cos = cos.reshape(1, 1, self.head_dim).to(x.dtype)
        sin = sin.reshape(1, 1, self.head_dim).to(x.dtype)
        return x * cos + _rotate_half(x) * sin

    @torch.no_grad()
    def extend(
        self,
        cache: PrefixCache,
        tokens: torch.Tensor,
        position: int,
        *,
        keep: Callable[[Site, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        parents: torch.Tensor | None = None,
        token_index: torch.Tensor | None = None,
    ) -> Extension:
        """Evaluate appending candidate tokens to prefixes at ``position``.

        Parameters
        ----------
        cache:
            The prefixes' caches (P prefixes).
        tokens:
            Candidate token ids (n).
        position:
            The new position (= prefix length).
        keep:
            Optional pruning callback ``keep(site, inputs, parent, token_index) -> bool mask``,
            called after each *attention-input* site; pairs it rejects are not carried deeper.
        parents, token_index:
            Evaluate only these pairs (default: every prefix x every token).
        """
        p_count = cache.keys[0].shape[0]
        n = tokens.shape[0]
        if parents is None or token_index is None:
            parents = torch.arange(p_count).repeat_interleave(n)
            token_index = torch.arange(n).repeat(p_count)
        h = self.parts.embed(tokens[token_index]).float()
        sites: dict[Site, torch.Tensor] = {}
        new_k: list[torch.Tensor] = []
        new_v: list[torch.Tensor] = []
        groups = self.n_heads // self.n_kv
        for layer_idx in range(self.depth):
            layer = self.parts.layers[layer_idx]
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            count = x.shape[0]
            q = self._rope(attn.q_proj(x).view(count, self.n_heads, self.head_dim), position)
            k = self._rope(attn.k_proj(x).view(count, self.n_kv, self.head_dim), position)
            v = attn.v_proj(x).view(count, self.n_kv, self.head_dim)
            keys = cache.keys[layer_idx][parents]  # N x Hkv x L x hd
            values = cache.values[layer_idx][parents]
            if self.window and keys.shape[2] + 1 > self.window:
                start = keys.shape[2] + 1 - self.window
                keys, values = keys[:, :, start:], values[:, :, start:]
            qg = q.view(count, self.n_kv, groups, self.head_dim)
            prev = torch.einsum("nkgd,nkld->nkgl", qg, keys) * self.scaling
            own = (qg * k.unsqueeze(2)).sum(-1, keepdim=True) * self.scaling
            w = torch.softmax(torch.cat([prev, own], dim=-1).float(), dim=-1)
            out = torch.einsum("nkgl,nkld->nkgd", w[..., :-1], values) + w[..., -1:] * v.unsqueeze(2)
            o_in = out.reshape(count, self.n_heads * self.head_dim)
            h = h + attn.o_proj(o_in)
            m_in = layer.post_attention_layernorm(h)
            mlp = layer.mlp
            d_in = mlp.act_fn(mlp.gate_proj(m_in)) * mlp.up_proj(m_in)
            h = h + mlp.down_proj(d_in)
            sites[("o", layer_idx)] = o_in
            sites[("mlp", layer_idx)] = m_in
            sites[("down", layer_idx)] = d_in
            new_k.append(k)
            new_v.append(v)
            if layer_idx + 1 < self.num_layers:
                nxt = ("attn", layer_idx + 1)
                sites[nxt] = self.parts.layers[layer_idx + 1].input_layernorm(h)
                if keep is not None and layer_idx + 1 < self.depth:
                    mask = keep(nxt, sites[nxt], parents, token_index)
                    if not bool(mask.all()):
                        parents, token_index, h = parents[mask], token_index[mask], h[mask]
                        sites = {s: t[mask] for s, t in sites.items()}
                        new_k = [t[mask] for t in new_k]
                        new_v = [t[mask] for t in new_v]
        return Extension(parents, token_index, sites, new_k, new_v)

    def append(self, cache: PrefixCache, ext: Extension, chosen: torch.Tensor) -> PrefixCache:
        """The caches of the chosen extensions (indices into ``ext``'s pairs)."""
        keys = [
            torch.cat([cache.keys[i][ext.parent[chosen]], ext.keys[i][chosen].unsqueeze(2)], dim=2)
            for i in range(self.depth)
        ]
        values = [
            torch.cat([cache.values[i][ext.parent[chosen]], ext.values[i][chosen].unsqueeze(2)], dim=2)
            for i in range(self.depth)
        ]
        return PrefixCache(keys, values)

    @torch.no_grad()
    def reference_sites(self, ids: torch.Tensor) -> dict[Site, torch.Tensor]:
        """The same site inputs from the model's own forward pass (hooks), for ``ids`` (1 x L)."""
        captured: dict[Site, torch.Tensor] = {}
        targets: list[tuple[Site, torch.nn.Module]] = []
        for layer_idx in range(self.depth):
            layer = self.parts.layers[layer_idx]
            targets += [
                (("o", layer_idx), layer.self_attn.o_proj),
                (("mlp", layer_idx), layer.mlp.gate_proj),
                (("down", layer_idx), layer.mlp.down_proj),
            ]
            if layer_idx + 1 < self.num_layers:
                targets.append((("attn", layer_idx + 1), self.parts.layers[layer_idx + 1].self_attn.q_proj))
        handles = []

        def make(site: Site, last: bool):
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

    def sites_for_sequence(self, ids: Sequence[int]) -> dict[Site, torch.Tensor]:
        """Site inputs at every position of one sequence, computed incrementally (L x width)."""
        cache = self.empty()
        out: dict[Site, list[torch.Tensor]] = {}
        for pos, tok in enumerate(ids):
            ext = self.extend(cache, torch.tensor([tok]), pos)
            for s, t in ext.sites.items():
                out.setdefault(s, []).append(t[0])
            cache = self.append(cache, ext, torch.tensor([0]))
        return {s: torch.stack(v) for s, v in out.items()}

    def self_check(self, ids: Sequence[int], *, tol: float = 1e-3) -> float:
        """Compare the incremental stack with the model's forward pass; raise if they differ.

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
                f"incremental decoder disagrees with the model's forward pass (relative difference "
                f"{worst:.2e} > {tol:g}); this architecture is not supported by the ordering search"
            )
        return worst
