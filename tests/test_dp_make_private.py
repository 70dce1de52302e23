"""make_private on the tiny model: clipping before noise against independently computed
per-example gradients, noise std = σC, ε = Opacus' accountant with gradient accumulation,
hooks are removed, bad input fails with a clear error."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from opacus.accountants import RDPAccountant

from fedsecure.defenses.dp import (
    DPConfigError,
    PrivacyBudgetExceededError,
    make_private,
)
from fedsecure.models.loss import per_sequence_loss
from tests._dp_fixtures import PatternDataset, collate, tiny_lora, trainable


@pytest.fixture(scope="module")
def base_gaussian():
    model = tiny_lora()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # B != 0 (peft starts at B = 0): every adapter tensor gets a non-zero gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture
def model(base_gaussian):
    return copy.deepcopy(base_gaussian)


def _loader(n: int = 24, batch: int = 8, **kw) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(PatternDataset(n, max_len=14, **kw), batch_size=batch, collate_fn=collate)


def _independent_per_example_grads(model, batch) -> list[list[torch.Tensor]]:
    """One forward+backward per example, each example alone (batch of one, no padding)."""
    params = trainable(model)
    model.eval()  # no dropout in LoRA here; eval only to be explicit
    out = []
    for i in range(batch["input_ids"].shape[0]):
        length = int(batch["attention_mask"][i].sum())
        row = {k: v[i : i + 1, :length] for k, v in batch.items()}
        loss = per_sequence_loss(model, row)[0]
        out.append([g.detach() for g in torch.autograd.grad(loss, params)])
    model.train()
    return out


@pytest.mark.parametrize("mode", ["ew", "hooks"])
def test_every_per_sample_gradient_is_clipped_before_noise(model, mode: str) -> None:
    loader = _loader()
    batch = collate([loader.dataset[i] for i in range(7)])
    ref = _independent_per_example_grads(model, batch)
    norms = torch.tensor([math.sqrt(sum(float(g.pow(2).sum()) for g in gs)) for gs in ref])
    clip = float(norms.median())  # about half the examples are clipped
    assert (norms > clip * 1.01).any() and (norms < clip * 0.99).any()
    expected = [torch.zeros_like(p) for p in trainable(model)]
    for gs, nrm in zip(ref, norms, strict=True):
        f = min(1.0, clip / float(nrm))
        for e, g in zip(expected, gs, strict=True):
            e.add_(g * f)
    before = [p.detach().clone() for p in trainable(model)]
    opt = torch.optim.SGD(trainable(model), lr=1.0)
    priv = make_private(
        model=model,
        optimizer=opt,
        data_loader=loader,
        noise_multiplier=0.0,
        target_delta=1e-3,
        max_grad_norm=clip,
        grad_sample_mode=mode,
        max_physical_batch_size=3,  # 7 rows -> micro-batches 3 + 3 + 1, one logical step
        accountant="rdp",
    )
    assert priv.mode == mode
    priv.step(batch)
    unclipped = [sum(gs[j] for gs in ref) for j in range(len(expected))]
    for p, b, e, u in zip(trainable(model), before, expected, unclipped, strict=True):
        applied = (b - p.detach()) * loader.batch_size  # = lr * sum of clipped grads (σ = 0)
        err = float((applied - e).norm() / e.norm())
        assert err < 1e-4, err  # float32 parameter arithmetic
        assert float((u - e).norm() / e.norm()) > 100 * err  # without clipping the test would fail
    priv.close()


@pytest.mark.parametrize("secure_mode", [False, True])
def test_noise_std_matches_sigma_times_c(model, secure_mode: bool) -> None:
    sigma, clip = 2.0, 0.3
    loader = _loader(batch=8)
    opt = torch.optim.SGD(trainable(model), lr=1.0)
    priv = make_private(
        model=model,
        optimizer=opt,
        data_loader=loader,
        noise_multiplier=sigma,
        target_delta=1e-3,
        max_grad_norm=clip,
        accountant="rdp",
        secure_mode=secure_mode,
        grad_sample_mode="ew",
    )
    empty = {k: v[:0] for k, v in collate([loader.dataset[0]]).items()}
    draws = []
    for _ in range(3):  # empty Poisson batches: the update is the noise alone (and still costs privacy)
        before = torch.cat([p.detach().reshape(-1).clone() for p in trainable(model)])
        assert math.isnan(priv.step(empty))
        after = torch.cat([p.detach().reshape(-1) for p in trainable(model)])
        draws.append((before - after) * loader.batch_size)
    noise = torch.cat(draws).double()
    n = noise.numel()
    assert abs(float(noise.mean())) < 6 * sigma * clip / math.sqrt(n)
    assert float(noise.std()) == pytest.approx(sigma * clip, rel=6 * math.sqrt(1 / (2 * n)))
    assert priv.accountant_state.history == [(sigma, loader.batch_size / len(loader.dataset), 3)]
    priv.close()


def test_epsilon_equals_opacus_with_gradient_accumulation(model) -> None:
    loader = _loader(n=40, batch=8)
    opt = torch.optim.SGD(trainable(model), lr=0.01)
    priv = make_private(
        model=model,
        optimizer=opt,
        data_loader=loader,
        target_epsilon=6.0,
        target_delta=1e-3,
        max_grad_norm=1.0,
        steps=3,
        accountant="rdp",
        max_physical_batch_size=3,  # physical 3, logical 8: the sample rate is 8/40, not 3/40
        seed=0,
    )
    for batch in priv.data_loader:
        if priv.steps_taken == 3:
            break
        priv.step(batch)
    eps, delta = priv.privacy_spent()
    acc = RDPAccountant()
    for _ in range(3):
        acc.step(noise_multiplier=priv.noise_multiplier, sample_rate=8 / 40)
    assert delta == 1e-3
    assert eps == pytest.approx(acc.get_epsilon(delta=1e-3), rel=1e-9)
    assert eps <= 6.0
    with pytest.raises(PrivacyBudgetExceededError, match="calibrated for 3 steps"):
        priv.step(next(iter(priv.data_loader)))
    assert priv.steps_taken == 3
    priv.close()


def test_close_removes_every_hook_and_attribute(model) -> None:
    priv = make_private(
        model=model,
        optimizer=torch.optim.SGD(trainable(model), lr=0.1),
        data_loader=_loader(),
        noise_multiplier=1.0,
        target_delta=1e-3,
        max_grad_norm=1.0,
        grad_sample_mode="hooks",
    )
    priv.step(next(iter(priv.data_loader)))
    priv.close()
    batch = collate([PatternDataset(4)[i] for i in range(4)])
    per_sequence_loss(model, batch).mean().backward()
    for p in model.parameters():
        assert not hasattr(p, "grad_sample") and not hasattr(p, "summed_grad")
    assert not any(hasattr(m, "activations") for m in model.modules())
    with pytest.raises(DPConfigError, match="closed"):
        priv.step(batch)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_epsilon": 8.0, "epochs": 1}, "target_delta is required"),
        ({"target_epsilon": 8.0, "epochs": 1, "target_delta": 0.05}, "1/N"),
        ({"target_epsilon": 0.0, "epochs": 1, "target_delta": 1e-3}, "target_epsilon must be > 0"),
        ({"target_epsilon": -2.0, "epochs": 1, "target_delta": 1e-3}, "target_epsilon must be > 0"),
        ({"target_epsilon": 8.0, "noise_multiplier": 1.0, "target_delta": 1e-3}, "exactly one"),
        ({"target_epsilon": 8.0, "target_delta": 1e-3}, "epochs or steps"),
        ({"noise_multiplier": 1.0, "target_delta": 1e-3, "seed": 1, "secure_mode": True}, "cannot be seeded"),
        ({"noise_multiplier": -1.0, "target_delta": 1e-3}, "noise_multiplier"),
        ({"noise_multiplier": 1.0, "target_delta": 1e-3, "grad_sample_mode": "ghost"}, "grad_sample_mode"),
    ],
)
def test_invalid_parameters_give_clear_errors(model, kwargs: dict, match: str) -> None:
    kwargs = {"max_grad_norm": 1.0, **kwargs}
    with pytest.raises(DPConfigError, match=match):
        make_private(model=model, optimizer=torch.optim.SGD(trainable(model), lr=0.1), data_loader=_loader(), **kwargs)


def test_batch_larger_than_dataset_is_refused(model) -> None:
    with pytest.raises(DPConfigError, match="batch_size"):
        make_private(
            model=model,
            optimizer=torch.optim.SGD(trainable(model), lr=0.1),
            data_loader=_loader(n=4, batch=8),
            noise_multiplier=1.0,
            target_delta=1e-3,
            max_grad_norm=1.0,
        )
