"""Training through the DP machinery: a plain loop and a Hugging Face Trainer both train
(loss goes down, the adapter moves, base weights do not), full fine-tuning picks a
verified mode, and the per-step integrity checks fail loudly (Opacus#820)."""

from __future__ import annotations

import tempfile

import pytest
import torch

from fedsecure.defenses.dp import DPConfigError, DPIntegrityError, DPSettings, make_private
from fedsecure.models import get_adapter_state, load_model
from fedsecure.models.loss import per_sequence_loss
from tests._dp_fixtures import PatternDataset, collate, frozen_copy, tiny_lora, trainable


def _loader(n: int = 16, batch: int = 4) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(PatternDataset(n, max_len=12), batch_size=batch, collate_fn=collate)


def _held_out() -> dict[str, torch.Tensor]:
    ds = PatternDataset(16, seed=9, max_len=12)
    return collate([ds[i] for i in range(len(ds))])


def _eval_loss(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        return float(per_sequence_loss(model, batch).mean())


def _assert_adapter_moved_base_fixed(model, adapter0, base0) -> None:
    adapter1 = get_adapter_state(model)
    assert all(not torch.equal(adapter0[k], adapter1[k]) for k in adapter0)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base0[n]), n


@pytest.mark.slow
def test_plain_loop_trains_adapter_only() -> None:
    torch.manual_seed(0)
    model = tiny_lora()
    loader = torch.utils.data.DataLoader(PatternDataset(64, max_len=12), batch_size=16, collate_fn=collate)
    held_out = _held_out()
    start, adapter0, base0 = _eval_loss(model, held_out), get_adapter_state(model), frozen_copy(model)
    opt = torch.optim.Adam(trainable(model), lr=5e-2)
    priv = make_private(
        model=model,
        optimizer=opt,
        data_loader=loader,
        target_epsilon=8.0,
        target_delta=1e-3,
        max_grad_norm=1.0,
        epochs=2,
        accountant="rdp",
        seed=1,
    )
    assert priv.mode in ("ew", "hooks") and "fastest" in priv.mode_reason
    assert set(priv.mode_timings) == {"ew", "hooks"}
    for _ in range(2):  # the user's own loop
        for batch in priv.data_loader:
            priv.step(batch)
    priv.close()
    assert priv.steps_taken == 8
    assert _eval_loss(model, held_out) < start - 0.1
    _assert_adapter_moved_base_fixed(model, adapter0, base0)
    eps, delta = priv.privacy_spent()
    assert 7.5 < eps <= 8.0 and delta == 1e-3


@pytest.mark.slow
def test_hf_trainer_script_becomes_dp() -> None:
    from transformers import TrainingArguments

    from fedsecure.defenses.dp import DPTrainer

    torch.manual_seed(0)
    model = tiny_lora()
    held_out = _held_out()
    start, adapter0, base0 = _eval_loss(model, held_out), get_adapter_state(model), frozen_copy(model)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=8,
            gradient_accumulation_steps=2,  # logical batch 16, physical 8
            num_train_epochs=2,
            learning_rate=5e-2,
            lr_scheduler_type="constant",
            logging_steps=3,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            remove_unused_columns=False,
            seed=3,
        )
        trainer = DPTrainer(  # the only change to a Trainer script: the class and dp=
            model=model,
            args=args,
            train_dataset=PatternDataset(48, max_len=12),
            data_collator=collate,
            dp=DPSettings(target_epsilon=8.0, target_delta=1e-3, max_grad_norm=1.0, accountant="rdp"),
        )
        trainer.train()
    priv = trainer.private
    assert priv is not None and priv.expected_batch_size == 16 and priv.max_physical_batch_size == 8
    assert priv.sample_rate == 16 / 48 and priv.steps_taken == 6 == trainer.state.global_step
    eps, _ = trainer.privacy_spent()
    assert 7.5 < eps <= 8.0
    assert [h["epsilon"] for h in trainer.state.log_history if "epsilon" in h][-1] == pytest.approx(eps)
    trainer.close_dp()
    assert _eval_loss(model, held_out) < start - 0.1
    _assert_adapter_moved_base_fixed(model, adapter0, base0)
    assert args.gradient_accumulation_steps == 2  # the user's arguments are not modified


def test_dp_trainer_refuses_mixed_precision() -> None:
    from transformers import TrainingArguments

    from fedsecure.defenses.dp import DPTrainer

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, use_cpu=True, bf16=True, report_to=[])
        with pytest.raises(DPConfigError, match="fp32"):
            DPTrainer(
                model=tiny_lora(),
                args=args,
                train_dataset=PatternDataset(8),
                dp=DPSettings(noise_multiplier=1.0, target_delta=1e-3, max_grad_norm=1.0),
            )


def test_full_fine_tuning_with_frozen_embeddings_uses_a_verified_mode() -> None:
    model, _ = load_model("tiny")
    for n, p in model.named_parameters():
        p.requires_grad_("embed" not in n)
    base = frozen_copy(model)
    priv = make_private(
        model=model,
        optimizer=torch.optim.SGD(trainable(model), lr=0.01),
        data_loader=_loader(),
        noise_multiplier=1.0,
        target_delta=1e-3,
        max_grad_norm=1.0,
        accountant="rdp",
    )
    # ExpandedWeights cannot handle Llama's RMSNorm weight product; Opacus hooks can
    assert priv.mode == "hooks" and "rejected ew" in priv.mode_reason
    before = [p.detach().clone() for p in trainable(model)]
    priv.step(collate([priv.data_loader.dataset[i] for i in range(4)]))
    priv.close()
    assert all(not torch.equal(b, p) for b, p in zip(before, trainable(model), strict=True))
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_optimizer_over_stale_parameters_is_refused() -> None:
    model = tiny_lora()
    stale = [torch.nn.Parameter(p.detach().clone()) for p in trainable(model)]  # the Opacus#820 pattern
    with pytest.raises(DPIntegrityError, match="not parameters of the model"):
        make_private(
            model=model,
            optimizer=torch.optim.SGD(stale, lr=0.1),
            data_loader=_loader(),
            noise_multiplier=1.0,
            target_delta=1e-3,
            max_grad_norm=1.0,
        )


class _SilentOptimizer(torch.optim.SGD):
    """Reports success but never writes the parameters (a silent failure to detect)."""

    def step(self, closure=None):  # type: ignore[override]
        return None


def test_adapter_that_does_not_move_fails_loudly() -> None:
    model = tiny_lora()
    priv = make_private(
        model=model,
        optimizer=_SilentOptimizer(trainable(model), lr=0.1),
        data_loader=_loader(),
        noise_multiplier=1.0,
        target_delta=1e-3,
        max_grad_norm=1.0,
        accountant="rdp",
        grad_sample_mode="hooks",
    )
    with pytest.raises(DPIntegrityError, match="did not move"):
        priv.step(collate([priv.data_loader.dataset[i] for i in range(4)]))


def test_frozen_weight_change_fails_loudly() -> None:
    model = tiny_lora()
    victim = next(p for n, p in model.named_parameters() if not p.requires_grad and "layers.0" in n)
    armed = []

    def tampering_loss(m, batch):
        if armed:
            with torch.no_grad():
                victim.add_(1e-3)  # a frozen base weight modified during the step
        return per_sequence_loss(m, batch)

    priv = make_private(
        model=model,
        optimizer=torch.optim.SGD(trainable(model), lr=0.1),
        data_loader=_loader(),
        noise_multiplier=1.0,
        target_delta=1e-3,
        max_grad_norm=1.0,
        accountant="rdp",
        grad_sample_mode="hooks",
        loss_fn=tampering_loss,
    )
    armed.append(True)
    with pytest.raises(DPIntegrityError, match=r"frozen parameter .* changed"):
        priv.step(collate([priv.data_loader.dataset[i] for i in range(4)]))
