"""DP-SGD for an existing PyTorch loop over a (peft/transformers) causal LM: :func:`make_private`.

DP-SGD (Abadi et al., CCS 2016) with Poisson sampling: each logical step samples every
example independently with probability q = batch_size / N, computes one gradient *per
example* (per sequence: the mean loss over that sequence's supervised tokens), clips each
to L2 norm C (``max_grad_norm``), sums, adds N(0, σ²C²) noise and divides by the expected
batch size qN. ε is accounted per logical step by Opacus' PRV or RDP accountant.

Threat model: the adversary sees every intermediate model (hence any released model) and
may know all training examples but one; the guarantee is example-level (ε, δ)-DP for the
data behind this loop. It does not cover hyper-parameter search on the same data.

What breaks Opacus on Hugging Face models, and what is done here:

- broadcast ``position_ids`` (Opacus#841): the per-sequence loss passes explicit per-row
  position ids (:func:`fedsecure.models.loss.per_sequence_loss`);
- label masking with -100 and length weighting: the per-example loss is the mean over the
  sequence's own supervised tokens, not HF's token mean over the batch;
- gradient accumulation: a logical (Poisson) batch is split into physical micro-batches
  with Opacus' skip-step protocol (the one ``BatchMemoryManager`` uses): clipping per
  micro-batch, noise and accounting once per logical step, with the logical q;
- frozen base weights and Opacus#820 (silently broken LoRA updates): after every
  optimizer step the adapter must have moved and every frozen tensor must be untouched,
  else :class:`DPIntegrityError`; the optimizer must own exactly the trainable parameters;
- per-sample-gradient mode: ``"auto"`` checks ExpandedWeights (``ew``) and Opacus ``hooks``
  against per-example backward passes on a 3-row probe (relative error < 1e-3), times the
  correct ones on a batch of the training shape (single-threaded CPU time, so other
  processes on the machine do not bias it) and keeps the fastest; ``functorch`` is the fallback when
  neither is correct. ``ghost`` clipping is not offered: measured 1.5-2x slower on LoRA
  here, and its double-backward criterion does not fit a per-sequence loss;
- ``secure_mode``: Opacus needs torchcsprng (not installable here); we draw the noise and
  the Poisson masks from ``os.urandom`` ourselves (:mod:`fedsecure._hazmat.noise`).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedsecure.defenses.dp.accounting import (
    DPConfigError,
    PrivacyBudgetExceededError,
    calibrate_noise_multiplier,
    check_accountant,
    check_delta,
    check_epsilon,
    check_noise_multiplier,
    check_positive,
    epsilon_of,
    make_accountant,
)
from fedsecure.models.loss import per_sequence_loss

GRAD_SAMPLE_MODES: tuple[str, ...] = ("auto", "ew", "hooks", "functorch")
AUTO_ORDER: tuple[str, ...] = ("ew", "hooks", "functorch")
"""Candidates of ``"auto"``: ew and hooks are verified and timed; functorch is the fallback."""

_OPACUS_ATTRS = ("grad_sample", "_forward_counter", "_current_grad_sample", "_norm_sample", "summed_grad")
_PROBE_ROWS = 3
_PROBE_TOLERANCE = 1e-3
_FULL_SNAPSHOT_LIMIT = 50_000_000
_SAMPLED_ELEMENTS = 64

LossFn = Callable[[Any, Mapping[str, torch.Tensor]], torch.Tensor]


class DPIntegrityError(RuntimeError):
    """The model/optimizer pair is not doing what DP-SGD requires (e.g. Opacus#820)."""


# --------------------------------------------------------------------------------------
# Poisson sampling
# --------------------------------------------------------------------------------------
def _opacus_uniform_sampler() -> type:
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    return UniformWithReplacementSampler


class PoissonBatchSampler(_opacus_uniform_sampler()):  # type: ignore[misc]
    """Each step selects every index independently with probability ``sample_rate``.

    A subclass of Opacus' ``UniformWithReplacementSampler`` (so ``BatchMemoryManager``
    accepts it); in ``secure`` mode the masks come from ``os.urandom``.
    """

    def __init__(
        self,
        *,
        num_samples: int,
        sample_rate: float,
        steps: int,
        generator: torch.Generator | None = None,
        secure: bool = False,
    ) -> None:
        super().__init__(num_samples=num_samples, sample_rate=sample_rate, generator=generator, steps=steps)
        self.secure = secure
        if secure:
            from fedsecure._hazmat.noise import SecureRandom

            self._rng = SecureRandom()

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            if self.secure:
                from fedsecure._hazmat.noise import secure_bernoulli_mask

                mask = torch.from_numpy(secure_bernoulli_mask(self.num_samples, self.sample_rate, rng=self._rng))
            else:
                mask = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
            yield mask.nonzero(as_tuple=False).reshape(-1).tolist()


def take_rows(batch: Any, index: slice | torch.Tensor) -> Any:
    """Rows ``index`` of every tensor in a (nested) batch; other values are kept."""
    if isinstance(batch, torch.Tensor):
        return batch[index]
    if isinstance(batch, Mapping):
        return {k: take_rows(v, index) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(take_rows(v, index) for v in batch)
    return batch


def batch_rows(batch: Mapping[str, Any]) -> int:
    ids = batch.get("input_ids")
    if not isinstance(ids, torch.Tensor):
        raise DPConfigError("a batch must be a dict with an 'input_ids' tensor of shape [batch, seq]")
    return int(ids.shape[0])


class EmptySafeCollate:
    """Wraps a collate function so that an empty Poisson batch becomes a 0-row batch.

    The structure comes from collating ``dataset[0]`` and keeping zero rows of it: no
    example's values leave this function for an empty batch.
    """

    def __init__(self, collate_fn: Callable[[list[Any]], Any], dataset: Any) -> None:
        self.collate_fn = collate_fn
        self.dataset = dataset

    def __call__(self, items: list[Any]) -> Any:
        if items:
            return self.collate_fn(items)
        return take_rows(self.collate_fn([self.dataset[0]]), slice(0, 0))


def _default_collate() -> Callable[[list[Any]], Any]:
    from torch.utils.data import default_collate

    return default_collate


def poisson_loader(
    *,
    dataset: Any,
    collate_fn: Callable[[list[Any]], Any] | None,
    sample_rate: float,
    steps: int,
    secure: bool = False,
    generator: torch.Generator | None = None,
) -> torch.utils.data.DataLoader:
    """A DataLoader yielding ``steps`` Poisson-sampled logical batches per iteration."""
    from torch.utils.data import DataLoader

    sampler = PoissonBatchSampler(
        num_samples=len(dataset), sample_rate=sample_rate, steps=steps, generator=generator, secure=secure
    )
    return DataLoader(
        dataset, batch_sampler=sampler, collate_fn=EmptySafeCollate(collate_fn or _default_collate(), dataset)
    )


# --------------------------------------------------------------------------------------
# Weight integrity (Opacus#820)
# --------------------------------------------------------------------------------------
def _sample_index(numel: int) -> torch.Tensor:
    if numel <= _SAMPLED_ELEMENTS:
        return torch.arange(numel)
    return torch.arange(_SAMPLED_ELEMENTS, dtype=torch.long) * (numel - 1) // (_SAMPLED_ELEMENTS - 1)


def _sampled(p: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return p.detach().reshape(-1)[idx.to(p.device)].clone()


class WeightGuard:
    """Checks that the optimizer owns the trainable parameters, that an optimizer step moved
    the adapter and left every frozen tensor untouched.

    Per step: trainable tensors are compared value by value (a sample of 64 values each
    beyond 50M trainable values); frozen tensors by identity, storage pointer, autograd
    version counter and 64 sampled values. :meth:`verify_frozen_full` compares an exact
    float64 checksum of every frozen tensor (at :meth:`PrivateTraining.close`).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer
        named = list(model.named_parameters())
        model_ids = {id(p) for _, p in named}
        opt_params = [p for g in optimizer.param_groups for p in g["params"]]
        foreign = [i for i, p in enumerate(opt_params) if id(p) not in model_ids]
        if foreign:
            raise DPIntegrityError(
                f"the optimizer holds {len(foreign)} tensors that are not parameters of the model "
                "(the model was moved or re-wrapped after the optimizer was built; Opacus#820): "
                "call model.to(device) before get_peft_model/attach_lora, then build the optimizer"
            )
        opt_ids = {id(p) for p in opt_params}
        self.trainable = [(n, p) for n, p in named if p.requires_grad]
        if not self.trainable:
            raise DPConfigError("the model has no trainable parameters: attach a LoRA adapter or unfreeze weights")
        missing = [n for n, p in self.trainable if id(p) not in opt_ids]
        if missing:
            raise DPIntegrityError(
                f"trainable parameters {missing[:3]} (of {len(missing)}) are not in the optimizer: build the "
                "optimizer over [p for p in model.parameters() if p.requires_grad] after attaching the adapter"
            )
        frozen_in_opt = [n for n, p in named if not p.requires_grad and id(p) in opt_ids]
        if frozen_in_opt:
            raise DPIntegrityError(f"frozen parameters {frozen_in_opt[:3]} are in the optimizer; remove them")
        self.frozen = [(n, p) for n, p in named if not p.requires_grad]
        self._trainable_numel = sum(p.numel() for _, p in self.trainable)
        self._frozen_ref = [(n, p, p.data_ptr(), p._version, _sample_index(p.numel())) for n, p in self.frozen]
        self._frozen_values = [_sampled(p, idx) for _, p, _, _, idx in self._frozen_ref]
        self._frozen_checksum = self._checksum()
        self._before: list[torch.Tensor] | None = None
        self.steps_checked = 0

    def _checksum(self) -> list[tuple[float, float]]:
        with torch.no_grad():
            return [(float(p.double().sum()), float(p.double().abs().sum())) for _, p in self.frozen]

    def _lr_of(self) -> dict[int, float]:
        out = {}
        for g in self.optimizer.param_groups:
            for p in g["params"]:
                out[id(p)] = float(g.get("lr", 1.0))
        return out

    def _snapshot(self) -> list[torch.Tensor]:
        if self._trainable_numel <= _FULL_SNAPSHOT_LIMIT:
            return [p.detach().clone() for _, p in self.trainable]
        return [_sampled(p, _sample_index(p.numel())) for _, p in self.trainable]

    def before_step(self) -> None:
        self._before = self._snapshot()

    def after_step(self, *, noise_std: float) -> None:
        if self._before is None:
            raise DPIntegrityError("after_step called without before_step")
        after = self._snapshot()
        lrs = self._lr_of()
        moved, still, bad = [], [], []
        for (name, p), b, a in zip(self.trainable, self._before, after, strict=True):
            if not torch.isfinite(a).all():
                bad.append(name)
            if lrs.get(id(p), 1.0) == 0.0:
                continue
            (moved if not torch.equal(a, b) else still).append(name)
        self._before = None
        if bad:
            raise DPIntegrityError(f"adapter tensors {bad[:3]} contain NaN/Inf after the optimizer step")
        if noise_std > 0 and still:
            raise DPIntegrityError(
                f"after a noisy DP step the adapter tensors {still[:3]} (of {len(still)}) did not move: the "
                "optimizer is not updating the model's parameters (Opacus#820); build the optimizer after "
                "moving the model and attaching the adapter"
            )
        if not moved and (still or not lrs):
            raise DPIntegrityError(
                "no adapter tensor moved in this optimizer step (Opacus#820); check that the optimizer was "
                "built over the model's trainable parameters after model.to(device) and attach_lora"
            )
        self._check_frozen_cheap()
        self.steps_checked += 1

    def _check_frozen_cheap(self) -> None:
        current = dict(self.model.named_parameters())
        for (name, p, ptr, version, idx), ref in zip(self._frozen_ref, self._frozen_values, strict=True):
            q = current.get(name)
            if q is not p:
                raise DPIntegrityError(f"frozen parameter {name} was replaced during training")
            if p.requires_grad:
                raise DPIntegrityError(f"frozen parameter {name} became trainable during DP training")
            if p.data_ptr() != ptr or p._version != version or not torch.equal(_sampled(p, idx), ref):
                raise DPIntegrityError(
                    f"frozen parameter {name} changed during a DP step; base weights must stay fixed "
                    "(remove them from the optimizer and set requires_grad=False)"
                )

    def verify_frozen_full(self) -> None:
        self._check_frozen_cheap()
        if self._checksum() != self._frozen_checksum:
            raise DPIntegrityError("a frozen base weight changed during DP training (full checksum differs)")


# --------------------------------------------------------------------------------------
# The DP optimizer
# --------------------------------------------------------------------------------------
def _dp_optimizer_class() -> type:
    from opacus.optimizers import DPOptimizer

    return DPOptimizer


class FedsecureDPOptimizer(_dp_optimizer_class()):  # type: ignore[misc]
    """Opacus' ``DPOptimizer`` plus: secure noise, a per-step integrity check, a budget check,
    and a refusal to take a step in which a parameter got no per-sample gradient (Opacus
    would then silently take a non-private step)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int,
        secure_mode: bool,
        generator: torch.Generator | None,
        guard: WeightGuard | None,
    ) -> None:
        super().__init__(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction="mean",
            generator=generator,
            secure_mode=False,  # Opacus' secure mode needs torchcsprng; ours is in add_noise
        )
        self.fedsecure_secure_mode = secure_mode
        self.guard = guard
        self.budget_check: Callable[[], None] | None = None
        self._secure_rng: Any = None
        if secure_mode:
            from fedsecure._hazmat.noise import SecureRandom

            self._secure_rng = SecureRandom()

    def add_noise(self) -> None:
        if not self.fedsecure_secure_mode:
            super().add_noise()
            return
        from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

        from fedsecure._hazmat.noise import secure_gaussian

        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            noise = secure_gaussian(tuple(p.summed_grad.shape), std=std, rng=self._secure_rng)
            noise_t = torch.from_numpy(noise).to(device=p.summed_grad.device, dtype=p.summed_grad.dtype)
            p.grad = (p.summed_grad + noise_t).view_as(p)
            _mark_as_processed(p.summed_grad)

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        if closure is not None:
            with torch.enable_grad():
                closure()
        missing = [i for i, p in enumerate(self.params) if getattr(p, "grad_sample", None) is None]
        if missing:
            raise DPIntegrityError(
                f"{len(missing)} trainable tensors got no per-sample gradient in this step; a DP step is "
                "impossible (every trainable parameter must be used in the forward pass through the DP model)"
            )
        final = not self._check_skip_next_step(pop_next=False)
        if final and self.budget_check is not None:
            self.budget_check()
        if not self.pre_step():
            return None
        if self.guard is not None:
            self.guard.before_step()
        result = self.original_optimizer.step()
        if self.guard is not None:
            self.guard.after_step(noise_std=self.noise_multiplier * self.max_grad_norm)
        return result


# --------------------------------------------------------------------------------------
# Per-sample gradient modes
# --------------------------------------------------------------------------------------
class _EWCaller:
    """Calls an ExpandedWeights module with ``input_ids`` positional (it needs the batch
    tensor first), so loss functions written as ``model(input_ids=..., ...)`` work."""

    def __init__(self, ew: torch.nn.Module) -> None:
        self.ew = ew

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not args:
            args = (kwargs.pop("input_ids"),)
        return self.ew(*args, **kwargs)


@dataclass
class _Attached:
    mode: str
    caller: Any
    hooks: Any

    def detach(self, model: torch.nn.Module) -> None:
        if self.hooks is not None and hasattr(self.hooks, "remove_hooks"):
            with contextlib.suppress(Exception):
                self.hooks.remove_hooks()
        if self.mode == "ew" and self.caller is not None:
            # the ExpandedWeights wrapper registered the model as its child; drop it
            self.caller.ew._modules.pop("_module", None)
        strip_opacus_attributes(model)


def strip_opacus_attributes(model: torch.nn.Module) -> None:
    """Remove every attribute Opacus adds to parameters and modules."""
    for p in model.parameters():
        for attr in _OPACUS_ATTRS:
            if attr in p.__dict__:
                delattr(p, attr)
    for m in model.modules():
        for attr in ("activations", "ft_compute_sample_grad", "max_batch_len", "autograd_grad_sample_hooks"):
            if attr in m.__dict__:
                delattr(m, attr)


def _attach(model: torch.nn.Module, mode: str) -> _Attached:
    if mode == "ew":
        from opacus.grad_sample import GradSampleModuleExpandedWeights

        ew = GradSampleModuleExpandedWeights(model, batch_first=True, loss_reduction="mean")
        return _Attached("ew", _EWCaller(ew), None)
    if mode in ("hooks", "functorch"):
        from opacus.grad_sample import GradSampleHooks

        hooks = GradSampleHooks(
            model, batch_first=True, loss_reduction="mean", strict=True, force_functorch=mode == "functorch"
        )
        return _Attached(mode, model, hooks)
    raise DPConfigError(f"grad_sample_mode must be one of {', '.join(GRAD_SAMPLE_MODES)}, got {mode!r}")


@contextlib.contextmanager
def _deterministic_forward(model: torch.nn.Module, seed: int) -> Iterator[None]:
    """Train mode (hooks only fire in training) with dropout layers off and a fixed RNG."""
    was = {m: m.training for m in model.modules()}
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        for m, t in was.items():
            m.training = t


def reference_per_sample_grads(
    model: torch.nn.Module, batch: Mapping[str, torch.Tensor], loss_fn: LossFn
) -> list[list[torch.Tensor]]:
    """Per-example gradients by one backward pass per example (the oracle)."""
    params = [p for p in model.parameters() if p.requires_grad]
    with _deterministic_forward(model, 0):
        losses = loss_fn(model, batch)
        out = []
        for i in range(losses.shape[0]):
            grads = torch.autograd.grad(losses[i], params, retain_graph=i < losses.shape[0] - 1, allow_unused=True)
            out.append([torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, params, strict=True)])
    return out


def _probe(
    model: torch.nn.Module, batch: Mapping[str, torch.Tensor], loss_fn: LossFn, mode: str, ref: list[list[torch.Tensor]]
) -> str:
    """'' if ``mode`` reproduces the reference per-sample gradients, else the reason."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    attached = None
    try:
        attached = _attach(model, mode)
        with _deterministic_forward(model, 0):
            losses = loss_fn(attached.caller, batch)
            _backward(losses.mean())
        samples = []
        for (name, p), r in zip(named, ref[0], strict=True):
            gs = getattr(p, "grad_sample", None)
            if isinstance(gs, list):
                gs = torch.cat(gs, 0)
            if gs is None or tuple(gs.shape) != (len(ref), *r.shape):
                got = "none" if gs is None else f"shape {tuple(gs.shape)}"
                return f"wrong per-sample gradient for {name} ({got}, expected {(len(ref), *r.shape)})"
            samples.append(gs)
        worst = 0.0
        for i in range(len(ref)):
            num = sum(float((samples[j][i] - ref[i][j]).double().pow(2).sum()) for j in range(len(params)))
            den = sum(float(ref[i][j].double().pow(2).sum()) for j in range(len(params)))
            worst = max(worst, math.sqrt(num) / max(math.sqrt(den), 1e-12))
        if worst > _PROBE_TOLERANCE:
            return f"per-sample gradients differ from per-example backward (relative error {worst:.2e})"
        return ""
    except Exception as err:  # noqa: BLE001 - any failure disqualifies the mode, with its reason
        return f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    finally:
        if attached is not None:
            attached.detach(model)
        else:
            strip_opacus_attributes(model)
        for p in params:
            p.grad = None


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Run torch's intra-op work on the calling thread alone.

    CPU time summed over several OpenMP threads is inflated by their spin-waits whenever other
    processes compete for the cores, by an amount that depends on the moment, not the mode;
    one thread's CPU time measures the work itself.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _time_mode(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], loss_fn: LossFn, mode: str) -> float:
    """CPU seconds of one single-threaded forward+backward with per-sample gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    attached = _attach(model, mode)
    try:
        with _deterministic_forward(model, 0), _single_thread():
            t0 = time.thread_time()
            _backward(loss_fn(attached.caller, batch).mean())
            return time.thread_time() - t0
    finally:
        attached.detach(model)
        for p in params:
            p.grad = None


@dataclass(frozen=True)
class ModeChoice:
    """The per-sample-gradient mode in use, why, and the CPU seconds measured per candidate."""

    mode: str
    reason: str
    timings: Mapping[str, float] = field(default_factory=dict)


def choose_grad_sample_mode(
    model: torch.nn.Module,
    probe_batch: Mapping[str, torch.Tensor],
    *,
    loss_fn: LossFn,
    requested: str = "auto",
    timing_batch: Mapping[str, torch.Tensor] | None = None,
) -> ModeChoice:
    """Verify the per-sample-gradient modes and pick the fastest correct one.

    Every candidate (``ew``, ``hooks``) is checked against per-example backward passes on
    ``probe_batch``; the correct ones are timed (CPU time of one thread running torch
    single-threaded, robust to other processes on a shared machine; two interleaved rounds,
    the minimum) on ``timing_batch``
    (a batch of the training shape) and the fastest is kept. ``functorch`` (vmap per layer,
    the slowest) is the fallback when neither is correct. A requested mode other than
    ``"auto"`` is still verified; if it is wrong for this model a :class:`DPConfigError`
    says why.
    """
    if requested not in GRAD_SAMPLE_MODES:
        raise DPConfigError(f"grad_sample_mode must be one of {', '.join(GRAD_SAMPLE_MODES)}, got {requested!r}")
    ref = reference_per_sample_grads(model, probe_batch, loss_fn)
    failures: dict[str, str] = {}
    if requested != "auto":
        why = _probe(model, probe_batch, loss_fn, requested, ref)
        if not why:
            return ModeChoice(
                requested, f"{requested} requested; per-sample gradients verified against per-example backward"
            )
        failures[requested] = why
    else:
        correct = []
        for mode in AUTO_ORDER[:2]:
            why = _probe(model, probe_batch, loss_fn, mode, ref)
            if why:
                failures[mode] = why
            else:
                correct.append(mode)
        if not correct:
            why = _probe(model, probe_batch, loss_fn, "functorch", ref)
            if not why:
                rejected = "; ".join(f"{m}: {r}" for m, r in failures.items())
                return ModeChoice("functorch", f"functorch: the only correct mode (rejected {rejected})")
            failures["functorch"] = why
        else:
            timings: dict[str, float] = {}
            if len(correct) > 1:
                batch = timing_batch if timing_batch is not None else probe_batch
                for _ in range(2):
                    for mode in correct:
                        t = _time_mode(model, batch, loss_fn, mode)
                        timings[mode] = min(t, timings.get(mode, math.inf))
            best = min(correct, key=lambda m: timings.get(m, 0.0))
            rows = int(batch_rows(timing_batch if timing_batch is not None else probe_batch))
            measured = ", ".join(f"{m} {t:.3f} s" for m, t in timings.items())
            reason = f"{best}: per-sample gradients match per-example backward on a {len(ref)}-row probe"
            if timings:
                reason += (
                    f"; fastest of the correct modes (single-thread CPU s per {rows}-row forward+backward: "
                    f"{measured})"
                )
            if failures:
                reason += "; rejected " + "; ".join(f"{m}: {r}" for m, r in failures.items())
            return ModeChoice(best, reason, timings)
    detail = "; ".join(f"{m}: {r}" for m, r in failures.items())
    raise DPConfigError(
        f"no per-sample gradient mode is correct for this model ({detail}). Trainable embeddings (LoRA on "
        "embeddings, or full fine-tuning of tied input/output embeddings) are not supported: target Linear "
        "layers (q_proj, v_proj or 'all-linear'), or freeze the embeddings (requires_grad=False)"
    )


# --------------------------------------------------------------------------------------
# make_private
# --------------------------------------------------------------------------------------
@dataclass
class PrivateTraining:
    """A DP-SGD training set-up around a user's model and optimizer (from :func:`make_private`).

    Attributes
    ----------
    model: the user's model, unchanged in identity (per-sample hooks attached until :meth:`close`).
    optimizer: the DP optimizer (clips, noises, accounts, checks the weights each step).
    data_loader: Poisson-sampled logical batches, ``steps_per_epoch`` per iteration.
    mode / mode_reason: the per-sample-gradient mode in use and why it was chosen.
    noise_multiplier, max_grad_norm, sample_rate, target_delta, accountant: the DP parameters.
    """

    model: torch.nn.Module
    optimizer: FedsecureDPOptimizer
    data_loader: Any
    mode: str
    mode_reason: str
    mode_timings: dict[str, float]
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    target_delta: float
    accountant: str
    expected_batch_size: int
    steps_per_epoch: int
    planned_steps: int | None
    target_epsilon: float | None
    secure_mode: bool
    max_physical_batch_size: int | None
    loss_fn: LossFn
    accountant_state: Any
    enforce_budget: bool = True
    _attached: _Attached | None = None
    steps_taken: int = 0
    metrics: dict[str, float] = field(default_factory=dict)

    # ---- accounting ------------------------------------------------------------
    def _account(self, _optimizer: Any = None) -> None:
        self.accountant_state.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        self.steps_taken += 1

    def _budget_check(self) -> None:
        if self.enforce_budget and self.planned_steps is not None and self.steps_taken >= self.planned_steps:
            raise PrivacyBudgetExceededError(
                f"the noise was calibrated for {self.planned_steps} steps to reach ε = {self.target_epsilon} at "
                f"δ = {self.target_delta:.3g}; another step would exceed it. Pass a larger epochs/steps to "
                "make_private (more noise), or enforce_budget=False to continue and report the larger ε"
            )

    def privacy_spent(self) -> tuple[float, float]:
        """(ε, δ) spent so far, by the chosen accountant."""
        return (
            epsilon_of(self.accountant_state.history, delta=self.target_delta, accountant=self.accountant),
            self.target_delta,
        )

    # ---- training ----------------------------------------------------------------
    def _require_open(self) -> _Attached:
        if self._attached is None:
            raise DPConfigError("this PrivateTraining was closed; call make_private again")
        return self._attached

    def loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per-example losses ``[B]`` through the DP model (per-sample gradients on backward)."""
        return self.loss_fn(self._require_open().caller, batch)

    def step(self, batch: Mapping[str, torch.Tensor]) -> float:
        """One DP logical step on a Poisson batch from :attr:`data_loader`; returns its mean loss.

        The batch is split into micro-batches of at most ``max_physical_batch_size`` rows
        (clipping per micro-batch; noise, accounting and the optimizer step once). An empty
        batch is a noise-only step (it still costs privacy) and returns ``nan``.
        """
        self._require_open()
        t0 = time.perf_counter()
        self.model.train()
        rows = batch_rows(batch)
        opt = self.optimizer
        if rows == 0:
            for p in opt.params:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            opt.step()
            opt.zero_grad(set_to_none=True)
            self.metrics["last_step_s"] = time.perf_counter() - t0
            return math.nan
        chunk = self.max_physical_batch_size or rows
        starts = list(range(0, rows, chunk))
        total = 0.0
        for k, s in enumerate(starts):
            micro = take_rows(batch, slice(s, min(rows, s + chunk)))
            losses = self.loss(micro)
            _backward(losses.mean())
            total += float(losses.detach().sum())
            if k < len(starts) - 1:
                opt.signal_skip_step(do_skip=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
        self.metrics["last_step_s"] = time.perf_counter() - t0
        return total / rows

    def physical_batches(self, max_physical_batch_size: int) -> Any:
        """Opacus' ``BatchMemoryManager`` over :attr:`data_loader` for hand-written loops:

        ``with priv.physical_batches(4) as loader: for b in loader: priv.loss(b).mean().backward();
        priv.optimizer.step(); priv.optimizer.zero_grad()``.
        """
        from opacus.utils.batch_memory_manager import BatchMemoryManager

        return BatchMemoryManager(
            data_loader=self.data_loader, max_physical_batch_size=max_physical_batch_size, optimizer=self.optimizer
        )

    def close(self) -> None:
        """Remove every hook and attribute Opacus added; verify the frozen weights in full."""
        if self._attached is None:
            return
        attached, self._attached = self._attached, None
        attached.detach(self.model)
        for p in self.model.parameters():
            p.grad = None
        if self.optimizer.guard is not None:
            self.optimizer.guard.verify_frozen_full()

    def __enter__(self) -> PrivateTraining:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _dataset_and_collate(data_loader: Any) -> tuple[Any, Callable[[list[Any]], Any] | None, int]:
    dataset = getattr(data_loader, "dataset", None)
    batch_size = getattr(data_loader, "batch_size", None)
    if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise DPConfigError(
            "data_loader must be a torch DataLoader over a map-style dataset (len() and indexing): DP-SGD "
            "samples each example independently (Poisson), which needs random access"
        )
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise DPConfigError(
            "data_loader must have an integer batch_size (the logical batch size that sets the sampling rate "
            "q = batch_size / len(dataset)); a custom batch_sampler is replaced by Poisson sampling"
        )
    return dataset, getattr(data_loader, "collate_fn", None), batch_size


@dataclass(frozen=True)
class DPSettings:
    """DP-SGD parameters for :class:`DPTrainer` (same meaning as in ``make_private``)."""

    target_delta: float
    max_grad_norm: float
    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    accountant: str = "prv"
    secure_mode: bool = False
    grad_sample_mode: str = "auto"
    max_physical_batch_size: int | None = None
    enforce_budget: bool = True

    def __post_init__(self) -> None:
        check_accountant(self.accountant)
        check_epsilon(self.target_epsilon)
        check_noise_multiplier(self.noise_multiplier)
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise DPConfigError("DPSettings needs exactly one of target_epsilon or noise_multiplier")
        check_positive("max_grad_norm", self.max_grad_norm)
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise DPConfigError(f"grad_sample_mode must be one of {', '.join(GRAD_SAMPLE_MODES)}")


def make_private(
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: Any,
    target_epsilon: float | None = None,
    noise_multiplier: float | None = None,
    target_delta: float | None = None,
    max_grad_norm: float,
    epochs: int | None = None,
    steps: int | None = None,
    accountant: str = "prv",
    secure_mode: bool = False,
    grad_sample_mode: str = "auto",
    max_physical_batch_size: int | None = None,
    loss_fn: LossFn = per_sequence_loss,
    seed: int | None = None,
    enforce_budget: bool = True,
    accountant_history: Sequence[Sequence[float]] = (),
    check_weights: bool = True,
) -> PrivateTraining:
    """Make an existing training loop differentially private (DP-SGD with Poisson sampling).

    Parameters
    ----------
    model:
        A torch / transformers / peft model already on its device (``.to(device)`` *before*
        attaching LoRA: Opacus#820). Its trainable parameters are the ones trained.
    optimizer:
        Any torch optimizer over exactly the model's trainable parameters.
    data_loader:
        A ``DataLoader`` over a map-style dataset; its ``batch_size`` is the *logical* batch
        size B, giving the sampling rate q = B / N. Replaced by Poisson sampling.
    target_epsilon, noise_multiplier:
        Exactly one. With ``target_epsilon`` (``inf`` allowed: no noise) σ is calibrated for
        the planned ``epochs`` or ``steps``.
    target_delta:
        δ, required, 0 < δ < 1/N.
    max_grad_norm:
        C, the per-example L2 clipping bound.
    epochs, steps:
        The planned length (one of them with ``target_epsilon``); an epoch is
        ``floor(N / B)`` logical steps.
    accountant:
        ``"prv"`` (tight, default) or ``"rdp"``.
    secure_mode:
        Noise and Poisson masks from ``os.urandom`` (:mod:`fedsecure._hazmat.noise`); ``seed``
        is then refused.
    grad_sample_mode:
        ``"auto"`` (verified fastest), ``"ew"``, ``"hooks"`` or ``"functorch"``.
    max_physical_batch_size:
        Split logical batches into micro-batches of at most this many rows (memory).
    loss_fn:
        ``loss_fn(model, batch) -> [B]`` per-example losses; default: per-sequence mean
        next-token cross-entropy over supervised tokens.
    seed:
        Seeds the sampling and noise generators (non-secure mode only, for reproducibility).
    enforce_budget:
        Refuse a step beyond the calibrated plan (only with ``target_epsilon``).
    accountant_history:
        Earlier ``[σ, q, steps]`` history of the same data (privacy spent before).
    check_weights:
        Check after every optimizer step that the adapter moved and frozen weights did not.

    Returns
    -------
    PrivateTraining
        Use ``for batch in priv.data_loader: priv.step(batch)``; ``priv.privacy_spent()``.
    """
    dataset, collate_fn, batch_size = _dataset_and_collate(data_loader)
    return private_training(
        model=model,
        optimizer=optimizer,
        dataset=dataset,
        collate_fn=collate_fn,
        batch_size=batch_size,
        target_epsilon=target_epsilon,
        noise_multiplier=noise_multiplier,
        target_delta=target_delta,
        max_grad_norm=max_grad_norm,
        epochs=epochs,
        steps=steps,
        accountant=accountant,
        secure_mode=secure_mode,
        grad_sample_mode=grad_sample_mode,
        max_physical_batch_size=max_physical_batch_size,
        loss_fn=loss_fn,
        seed=seed,
        enforce_budget=enforce_budget,
        accountant_history=accountant_history,
        check_weights=check_weights,
    )


def private_training(
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset: Any,
    collate_fn: Callable[[list[Any]], Any] | None,
    batch_size: int,
    target_epsilon: float | None = None,
    noise_multiplier: float | None = None,
    target_delta: float | None = None,
    max_grad_norm: float,
    epochs: int | None = None,
    steps: int | None = None,
    accountant: str = "prv",
    secure_mode: bool = False,
    grad_sample_mode: str = "auto",
    max_physical_batch_size: int | None = None,
    loss_fn: LossFn = per_sequence_loss,
    seed: int | None = None,
    enforce_budget: bool = True,
    accountant_history: Sequence[Sequence[float]] = (),
    check_weights: bool = True,
    loader: Any = None,
    loader_steps: int | None = None,
    verify_mode: bool = True,
) -> PrivateTraining:
    """:func:`make_private` from a dataset and a collate function instead of a DataLoader.

    ``loader`` reuses an existing Poisson loader (the Trainer integration builds it before
    the optimizer exists); ``loader_steps`` sets how many batches one iteration of the
    built loader yields (default: an epoch, ``floor(N / batch_size)``). ``verify_mode=False``
    skips the per-sample-gradient probe for a ``grad_sample_mode`` already verified on this model.
    """
    check_accountant(accountant)
    target_epsilon = check_epsilon(target_epsilon)
    noise_multiplier = check_noise_multiplier(noise_multiplier)
    if (target_epsilon is None) == (noise_multiplier is None):
        raise DPConfigError("pass exactly one of target_epsilon or noise_multiplier")
    max_grad_norm = check_positive("max_grad_norm", max_grad_norm)
    if max_physical_batch_size is not None and (
        not isinstance(max_physical_batch_size, int) or max_physical_batch_size < 1
    ):
        raise DPConfigError(f"max_physical_batch_size must be a positive integer, got {max_physical_batch_size!r}")
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise DPConfigError(f"grad_sample_mode must be one of {', '.join(GRAD_SAMPLE_MODES)}, got {grad_sample_mode!r}")
    if secure_mode and seed is not None:
        raise DPConfigError("secure_mode draws noise from os.urandom and cannot be seeded: drop seed")
    n = len(dataset)
    if n == 0:
        raise DPConfigError("the dataset is empty")
    target_delta = check_delta(target_delta, num_units=n)
    if not isinstance(batch_size, int) or not 1 <= batch_size <= n:
        raise DPConfigError(f"batch_size must be an integer in [1, {n}] (the dataset size), got {batch_size!r}")
    sample_rate = batch_size / n
    steps_per_epoch = max(1, n // batch_size)
    if epochs is not None and steps is not None:
        raise DPConfigError("pass epochs or steps, not both")
    for name, v in (("epochs", epochs), ("steps", steps)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise DPConfigError(f"{name} must be a positive integer, got {v!r}")
    planned = steps if steps is not None else (epochs * steps_per_epoch if epochs is not None else None)
    if target_epsilon is not None:
        if planned is None:
            raise DPConfigError("target_epsilon needs the planned length: pass epochs or steps")
        prior = epsilon_of(accountant_history, delta=target_delta, accountant=accountant)
        if prior > 0:
            warnings.warn(
                f"{prior:.3g} of ε was already spent on this data; σ is calibrated for the new steps alone, "
                "privacy_spent() reports the total",
                stacklevel=2,
            )
        noise_multiplier = calibrate_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            sample_rate=sample_rate,
            steps=planned,
            accountant=accountant,
        )
    assert noise_multiplier is not None
    guard = WeightGuard(model, optimizer) if check_weights else None
    collate = EmptySafeCollate(collate_fn or _default_collate(), dataset)
    probe = _to_device(collate([dataset[i] for i in range(min(_PROBE_ROWS, n))]), _model_device(model))
    if loss_fn is None:
        loss_fn = per_sequence_loss
    if verify_mode or grad_sample_mode == "auto":
        timing_rows = min(n, batch_size, max_physical_batch_size or batch_size)
        timing = None
        if grad_sample_mode == "auto" and timing_rows > _PROBE_ROWS:
            timing = _to_device(collate([dataset[i] for i in range(timing_rows)]), _model_device(model))
        choice = choose_grad_sample_mode(model, probe, loss_fn=loss_fn, requested=grad_sample_mode, timing_batch=timing)
    else:
        choice = ModeChoice(grad_sample_mode, f"{grad_sample_mode}: verified earlier on this model")
    mode, reason = choice.mode, choice.reason
    generator = None
    if seed is not None:
        generator = torch.Generator(device=_model_device(model)).manual_seed(int(seed))
    if loader is None:
        sampling_gen = torch.Generator().manual_seed(int(seed) + 1) if seed is not None else None
        loader = poisson_loader(
            dataset=dataset,
            collate_fn=collate_fn,
            sample_rate=sample_rate,
            steps=loader_steps or steps_per_epoch,
            secure=secure_mode,
            generator=sampling_gen,
        )
    else:
        sampler = getattr(loader, "batch_sampler", None)
        if not isinstance(sampler, PoissonBatchSampler) or abs(sampler.sample_rate - sample_rate) > 1e-12:
            raise DPConfigError("loader must be a poisson_loader with sample_rate = batch_size / len(dataset)")
    dp_opt = FedsecureDPOptimizer(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=batch_size,
        secure_mode=secure_mode,
        generator=generator,
        guard=guard,
    )
    attached = _attach(model, mode)
    if attached.hooks is not None:
        attached.hooks.forbid_grad_accumulation()
    priv = PrivateTraining(
        model=model,
        optimizer=dp_opt,
        data_loader=loader,
        mode=mode,
        mode_reason=reason,
        mode_timings=dict(choice.timings),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        sample_rate=sample_rate,
        target_delta=target_delta,
        accountant=accountant,
        expected_batch_size=batch_size,
        steps_per_epoch=steps_per_epoch,
        planned_steps=planned,
        target_epsilon=target_epsilon,
        secure_mode=secure_mode,
        max_physical_batch_size=max_physical_batch_size,
        loss_fn=loss_fn,
        accountant_state=make_accountant(accountant, accountant_history),
        enforce_budget=enforce_budget and target_epsilon is not None,
        _attached=attached,
    )
    dp_opt.attach_step_hook(priv._account)
    dp_opt.budget_check = priv._budget_check
    return priv


def _backward(loss: torch.Tensor) -> None:
    with warnings.catch_warnings():
        # Opacus' full backward hooks on the first trainable layer warn that its inputs need no grad
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        loss.backward()


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch
