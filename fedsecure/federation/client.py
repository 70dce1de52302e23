"""The client step: a plain function of its inputs (the same code on every engine).

receive global adapter (+ hash) -> ``wrap_training`` (e.g. DP-SGD) -> local fit ->
``transform_update`` (clip, noise; a malicious client's poisoning) -> the transport
encodes it (done by the caller).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedsecure.config import FederationConfig
from fedsecure.defenses.base import Defense, TrainingSetup
from fedsecure.models.lora import get_adapter_state, set_adapter_state
from fedsecure.models.loss import per_sequence_loss
from fedsecure.types import AdapterDelta, ClientUpdate, ModelMismatchError, RoundContext, adapter_hash

__all__ = ["LocalResult", "ModelMismatchError", "derive_seed", "make_optimizer", "run_client"]


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed derived from ``parts`` (for data order / dropout masks, not for secrets)."""
    h = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def make_optimizer(params: Sequence[torch.nn.Parameter], fed: FederationConfig) -> torch.optim.Optimizer:
    if fed.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=fed.lr, weight_decay=fed.weight_decay)
    if fed.optimizer == "adam":
        return torch.optim.Adam(params, lr=fed.lr, weight_decay=fed.weight_decay)
    return torch.optim.SGD(params, lr=fed.lr, weight_decay=fed.weight_decay)


@dataclass
class LocalResult:
    update: ClientUpdate
    train_seconds: float
    steps: int


def _default_step(setup: TrainingSetup, batch: Mapping[str, torch.Tensor], prox: Any) -> float:
    rows = int(batch["input_ids"].shape[0])
    micro = setup.micro_batch_size or rows
    setup.optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for start in range(0, rows, micro):
        mb = {k: v[start : start + micro] for k, v in batch.items()}
        losses = setup.loss_fn(setup.model, mb)
        loss = losses.sum() / rows
        if prox is not None:
            loss = loss + prox() * (losses.shape[0] / rows)
        loss.backward()
        total += float(losses.detach().sum())
    setup.optimizer.step()
    return total / rows


def run_client(
    *,
    model: Any,
    global_state: Mapping[str, torch.Tensor],
    announced_hash: str,
    features: Sequence[Mapping[str, Sequence[int]]],
    num_examples: int,
    fed: FederationConfig,
    defenses: Sequence[Defense],
    ctx: RoundContext,
    client_id: int,
    pad_token_id: int,
    progress: bool = False,
) -> LocalResult:
    """Train one client locally from ``global_state`` and return its (transformed) update.

    Parameters
    ----------
    model:
        The peft model (shared base; this function loads ``global_state`` into its adapter).
    announced_hash:
        The server's hash of the global adapter; the client refuses a model that differs.
    features:
        The client's tokenised training examples (``input_ids``/``labels``/``attention_mask``).
    """
    from fedsecure.data.tokenize import make_loader

    received = adapter_hash(global_state)
    if announced_hash and received != announced_hash:
        raise ModelMismatchError(
            f"client {client_id}: the global adapter's hash {received[:12]} differs from the announced "
            f"{announced_hash[:12]} (the server sent this client a different model)"
        )
    set_adapter_state(model, global_state)
    seed = derive_seed(ctx.seed, ctx.round, client_id, "local")
    torch.manual_seed(seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, fed)
    loader = make_loader(
        list(features),
        batch_size=min(fed.batch_size, len(features)),
        seed=seed,
        num_steps=fed.local_steps,
        epochs=fed.local_epochs,
        pad_token_id=pad_token_id,
    )
    setup = TrainingSetup(
        model=model,
        optimizer=optimizer,
        data_loader=loader,
        loss_fn=per_sequence_loss,
        micro_batch_size=fed.micro_batch_size,
    )
    prox = None
    if fed.proximal_mu > 0:
        named = dict(model.named_parameters())
        anchors = {}
        for k, v in global_state.items():
            pname = k.replace(".weight", ".default.weight")
            if pname in named:
                anchors[pname] = v.to(named[pname].device)

        def prox() -> torch.Tensor:
            return 0.5 * fed.proximal_mu * sum(((named[n] - a) ** 2).sum() for n, a in anchors.items())

        if not anchors:
            raise RuntimeError("FedProx could not match adapter names to parameters")
    for d in defenses:
        setup = d.wrap_training(setup, client_id=client_id, ctx=ctx)
    t0 = time.perf_counter()
    losses: list[float] = []
    steps = 0
    batches: Any = setup.data_loader
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"client {client_id} local steps", unit="step", leave=False)
    try:
        for batch in batches:
            if setup.step_fn is not None:
                losses.append(setup.step_fn(batch))
            else:
                losses.append(_default_step(setup, batch, prox))
            for hook in setup.after_step:
                hook()
            steps += 1
    finally:
        for closer in setup.close:
            closer()
    train_s = time.perf_counter() - t0
    model.eval()
    trained = get_adapter_state(model)
    delta: AdapterDelta = {k: trained[k] - global_state[k].float() for k in trained}
    metrics = {
        "train_loss_first": losses[0] if losses else math.nan,
        "train_loss_last": losses[-1] if losses else math.nan,
        "train_loss_mean": sum(losses) / len(losses) if losses else math.nan,
        "steps": float(steps),
        "train_seconds": train_s,
        **{k: float(v) for k, v in setup.metrics.items()},
    }
    update = ClientUpdate(client_id=client_id, round=ctx.round, delta=delta, num_examples=num_examples, metrics=metrics)
    for d in sorted(defenses, key=lambda d: getattr(d, "transform_priority", 50)):
        update = d.transform_update(update, ctx=ctx)
    return LocalResult(update=update, train_seconds=train_s, steps=steps)
