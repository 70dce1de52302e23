"""Hugging Face ``Trainer`` integration of :func:`fedsecure.defenses.dp.make_private`.

Turning an existing Trainer script into DP-SGD takes two changes::

    from fedsecure.defenses.dp import DPSettings, DPTrainer

    trainer = DPTrainer(model=model, args=args, train_dataset=ds, data_collator=collator,
                        dp=DPSettings(target_epsilon=8.0, target_delta=1e-5, max_grad_norm=1.0))
    trainer.train()
    eps, delta = trainer.privacy_spent()

What the subclass changes (threat model and guarantee as in :mod:`.engine`):

- the logical batch is ``per_device_train_batch_size * gradient_accumulation_steps``; it
  is drawn by Poisson sampling (q = logical / N) and split into physical micro-batches of
  ``per_device_train_batch_size`` rows (or ``DPSettings.max_physical_batch_size``);
  the Trainer itself sees one "batch" per logical step (its accumulation is set to 1);
- the loss is the per-sequence loss (mean over each sequence's supervised tokens), not
  the model's token mean over the batch; a custom ``compute_loss`` is not used;
- HF's gradient clipping (``max_grad_norm``) is turned off: the DP step clips per example;
- the optimizer step, the noise, the accounting and the weight checks all happen inside
  ``training_step``; the Trainer's own ``optimizer.step()`` is a no-op on a facade that
  shares the real optimizer's parameter groups (so LR schedulers work) and state dict;
- ε is calibrated for the Trainer's planned ``max_steps`` and logged as ``epsilon``.

Single process only (no DDP/FSDP/DeepSpeed) and fp32 (no fp16/bf16 autocast).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from fedsecure.defenses.dp.accounting import DPConfigError
from fedsecure.defenses.dp.engine import DPSettings, PrivateTraining, poisson_loader, private_training

try:
    from transformers import Trainer, TrainingArguments
except ImportError as err:  # pragma: no cover - transformers is a core dependency
    raise ImportError("DPTrainer needs transformers: pip install 'transformers>=5'") from err


class _StepTakenOptimizer(torch.optim.Optimizer):
    """What the Trainer holds as its optimizer: the DP step already ran in ``training_step``.

    Shares the real optimizer's ``param_groups`` (LR schedulers act on it) and state dict
    (checkpoints save it); ``step`` and ``zero_grad`` do nothing.
    """

    def __init__(self, private: PrivateTraining) -> None:  # no super().__init__: a pure facade
        self._private = private
        self._inner = private.optimizer.original_optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self._inner.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self._inner.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self._inner.state

    @state.setter
    def state(self, value: Any) -> None:
        self._inner.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self._inner.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self._inner.defaults = value

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return self._inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        self._inner.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"DP({self._inner!r})"


class DPTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with DP-SGD (see the module docstring).

    Parameters
    ----------
    dp:
        The DP parameters.
    **kwargs:
        Everything ``Trainer`` takes, by keyword; ``args`` is required.
    """

    def __init__(self, *, dp: DPSettings, **kwargs: Any) -> None:
        if not isinstance(dp, DPSettings):
            raise DPConfigError("dp must be a fedsecure.defenses.dp.DPSettings")
        args = kwargs.get("args")
        if not isinstance(args, TrainingArguments):
            raise DPConfigError("DPTrainer needs args=TrainingArguments(...) (passed by keyword)")
        if getattr(args, "fp16", False) or getattr(args, "bf16", False):
            raise DPConfigError("DPTrainer supports fp32 training only: set fp16=False and bf16=False")
        if args.world_size > 1 or getattr(args, "n_gpu", 1) > 1:
            raise DPConfigError("DPTrainer runs on a single device: launch one process on one device")
        physical = dp.max_physical_batch_size or args.per_device_train_batch_size
        logical = args.per_device_train_batch_size * args.gradient_accumulation_steps
        new_args = copy.deepcopy(args)
        new_args.per_device_train_batch_size = logical
        new_args.gradient_accumulation_steps = 1
        new_args.max_grad_norm = 0.0
        kwargs["args"] = new_args
        super().__init__(**kwargs)
        self.dp = dp
        self.dp_logical_batch_size = logical
        self.dp_physical_batch_size = physical
        self.private: PrivateTraining | None = None
        self._dp_data: tuple[Any, Any, Any] | None = None

    # ---- data ------------------------------------------------------------------------
    def get_train_dataloader(self) -> Any:
        if self._dp_data is not None:
            return self._dp_data[2]
        if self.train_dataset is None:
            raise ValueError("DPTrainer: training requires a train_dataset")
        dataset, collator = self.train_dataset, self.data_collator
        try:
            import datasets

            is_hf = isinstance(dataset, datasets.Dataset)
        except ImportError:  # pragma: no cover
            is_hf = False
        if is_hf:
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="training")
        n = len(dataset)
        if self.dp_logical_batch_size > n:
            raise DPConfigError(
                f"the logical batch (per_device_train_batch_size x gradient_accumulation_steps = "
                f"{self.dp_logical_batch_size}) exceeds the dataset size {n}"
            )
        generator = None if self.dp.secure_mode else torch.Generator().manual_seed(int(self.args.seed))
        loader = poisson_loader(
            dataset=dataset,
            collate_fn=collator,
            sample_rate=self.dp_logical_batch_size / n,
            steps=max(1, n // self.dp_logical_batch_size),
            secure=self.dp.secure_mode,
            generator=generator,
        )
        self._dp_data = (dataset, collator, loader)
        return loader

    # ---- optimizer ---------------------------------------------------------------------
    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        if isinstance(self.optimizer, _StepTakenOptimizer):
            return self.optimizer
        super().create_optimizer(model)
        if self._dp_data is None:
            self.get_train_dataloader()
        assert self._dp_data is not None
        dataset, collator, loader = self._dp_data
        planned = int(self.state.max_steps) if self.state.max_steps and self.state.max_steps > 0 else None
        if planned is None and self.dp.target_epsilon is not None:
            raise DPConfigError("DPTrainer could not determine max_steps to calibrate the noise")
        self.private = private_training(
            model=self.model,
            optimizer=self.optimizer,
            dataset=dataset,
            collate_fn=collator,
            batch_size=self.dp_logical_batch_size,
            target_epsilon=self.dp.target_epsilon,
            noise_multiplier=self.dp.noise_multiplier,
            target_delta=self.dp.target_delta,
            max_grad_norm=self.dp.max_grad_norm,
            steps=planned,
            accountant=self.dp.accountant,
            secure_mode=self.dp.secure_mode,
            grad_sample_mode=self.dp.grad_sample_mode,
            max_physical_batch_size=self.dp_physical_batch_size,
            seed=None if self.dp.secure_mode else int(self.args.seed),
            enforce_budget=self.dp.enforce_budget,
            loader=loader,
        )
        self.optimizer = _StepTakenOptimizer(self.private)
        return self.optimizer

    # ---- the step ----------------------------------------------------------------------
    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        if self.private is None:
            raise DPConfigError("DPTrainer.training_step called before the DP optimizer was created")
        inputs = self._prepare_inputs(inputs)
        loss = self.private.step(inputs)
        return torch.tensor(loss, device=self.args.device)

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        # gradients are consumed inside the DP step; the Trainer's norm of p.grad would be a misleading 0
        return None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.private is not None and self.private.steps_taken > 0 and "loss" in logs:
            eps, _ = self.private_spent_safe()
            logs["epsilon"] = eps
        super().log(logs, start_time)

    def private_spent_safe(self) -> tuple[float, float]:
        try:
            return self.privacy_spent()
        except Exception:  # noqa: BLE001 - logging must not break training
            return (math.nan, self.dp.target_delta)

    def privacy_spent(self) -> tuple[float, float]:
        """(ε, δ) spent so far."""
        if self.private is None:
            return (0.0, self.dp.target_delta)
        return self.private.privacy_spent()

    def close_dp(self) -> None:
        """Remove the per-sample-gradient hooks (after the last ``train()``)."""
        if self.private is not None:
            self.private.close()
