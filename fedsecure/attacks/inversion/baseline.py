"""Optimisation baseline (TAG / LAMP style), kept only to compare with the span attack.

TAG (Deng et al., Findings of EMNLP 2021) and LAMP (Balunovic et al., NeurIPS 2022)
optimise dummy inputs until their gradient matches the observed one. Here the dummy
sequence is a matrix of token logits ``Z`` (batch x length x vocab): inputs are the
softmax-weighted embeddings, targets the same soft distributions shifted by one, and Adam
minimises ``1 - cos(grad(Z), -delta)`` over the LoRA parameters (LAMP's cosine loss).
The reconstruction is ``argmax Z``. On LoRA updates it recovers almost nothing; it is here
so the benchmark can show that side by side. Gradient matching differentiates through the
gradient (double backward), which PyTorch's fused CPU attention kernels do not implement:
attention runs on the math SDPA kernel here.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from fedsecure.attacks.inversion._model import decoder_parts
from fedsecure.models.lora import get_adapter_state, set_adapter_state


def optimisation_baseline(
    model: torch.nn.Module,
    *,
    delta: Mapping[str, torch.Tensor],
    global_state: Mapping[str, torch.Tensor],
    length: int,
    batch: int = 1,
    steps: int = 100,
    lr: float = 0.1,
    seed: int = 0,
) -> list[tuple[int, ...]]:
    """Gradient matching by continuous optimisation; returns ``batch`` token sequences.

    Parameters
    ----------
    model:
        The peft model; its adapter is set to ``global_state`` and restored afterwards.
    delta:
        The observed update (its negative is matched, as for SGD).
    global_state:
        The adapter the client started from.
    length, batch:
        Shape of the dummy data (the server's guess of sequence length and batch size).
    steps, lr:
        Adam steps and learning rate on the logits.
    seed:
        Seed of the dummy initialisation.
    """
    if length < 2 or batch < 1 or steps < 1 or not lr > 0:
        raise ValueError("optimisation_baseline needs length >= 2, batch >= 1, steps >= 1 and lr > 0")
    parts = decoder_parts(model)
    emb = parts.embed.weight.detach()
    named = {n.replace(".default", ""): p for n, p in model.named_parameters() if p.requires_grad}
    keys = [k for k in delta if k in named]
    if not keys:
        raise ValueError("no trainable LoRA parameter of the model matches the update's keys")
    params = [named[k] for k in keys]
    target = -torch.cat([delta[k].detach().float().reshape(-1) for k in keys])
    saved = get_adapter_state(model)
    was_training = model.training
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(batch, length, emb.shape[0], generator=gen) * 0.01).requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    try:
        set_adapter_state(model, global_state)
        model.eval()
        with sdpa_kernel(SDPBackend.MATH):
            for _ in range(steps):
                opt.zero_grad()
                probs = torch.softmax(z, dim=-1)
                inputs = probs @ emb
                out = model(inputs_embeds=inputs)
                logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
                loss = -(probs[:, 1:] * logp).sum(-1).mean()
                grads = torch.autograd.grad(loss, params, create_graph=True)
                g = torch.cat([x.reshape(-1) for x in grads])
                match = 1.0 - torch.nn.functional.cosine_similarity(g, target, dim=0)
                match.backward()
                opt.step()
        return [tuple(int(t) for t in row) for row in z.detach().argmax(-1)]
    finally:
        set_adapter_state(model, saved)
        model.train(was_training)
        model.zero_grad(set_to_none=True)
