"""Gradient inversion of federated LoRA updates: the server reads the text a client trained on.

Threat model
------------
An honest-but-curious server (``View.SERVER_PER_CLIENT``) sees each client's plaintext
LoRA update ``delta = adapter_after_local_training - global_adapter`` and knows the base
model, the adapter it sent and the public training recipe (optimizer, lr, batch size,
local steps, max length, chat template). It never sees the data. Under secure
aggregation / CKKS it sees only the aggregate of the sampled clients and the attack runs
on that (or reports not applicable). The *malicious* variant also chooses the adapter it
broadcasts (:mod:`.malicious`).

Method (anchors: DAGER, Petrov et al., NeurIPS 2024 -- span checks on full-model
gradients; LAMP/TAG -- continuous optimisation, kept only as :mod:`.baseline`)
-------------------------------------------------------------------------------
1. *Token set* (:mod:`.recovery`). RoPE is applied after the q/k/v projections, so the
   first block's q/k/v inputs are ``RMSNorm(E[token])``; the rows of their LoRA-A
   gradients ``s B^T sum_t g_t x_t^T`` lie in ``span{x_t}``. Span check over the whole
   vocabulary while the distinct tokens are at most the stacked rows (``modules x r``; at
   the bound it is accepted only with a clear gap), rank-aware sparse recovery (RA-ORMP)
   beyond.
2. *Order* (:mod:`.ordering`). A beam search over prefixes; each extension's input at the
   ordering sites (first block o/MLP/down inputs, second block q/k/v input) must lie in
   that site's A-update span and add a new direction; a position whose gradient sits below
   the noise may be bridged when the next ones pass again (reported as unchecked). The last
   token has no gradient of its own and is chosen by gradient agreement among the model's
   top predictions, widened to a whole-vocabulary Gauss-Newton shortlist when they do not
   explain the update.
3. *Certificate* (:mod:`.invert`). The answer is certified when the inputs it implies
   explain every stacked row to within the update's noise level.

When it is exact (each condition is checked at run time; a result outside them says why)
-----------------------------------------------------------------------------------------
- the first block's q/k/v carry LoRA, LoRA dropout is 0, and the model is Llama-family
  (RoPE after the projections, no per-head q/k norm);
- ``B != 0`` in the adapter the client started from: rounds after the first, or a
  malicious server's crafted adapter. With peft's ``B = 0`` (round 1) ``dL/dA = 0``; the
  B-update identifies tokens only while they are fewer than ``r`` ("B-route");
- the update is a *linear combination of gradients*: SGD (with decoupled weight decay
  undone from the known lr); Adam/AdamW normalise every coordinate, so their updates are
  not -- except one local step from a malicious "quiet" adapter, whose gradients are far
  below Adam's ``eps`` (the step is ``-lr g / eps``);
- token set: distinct tokens <= ``q/k/v modules x r`` for the span check (exact), beyond
  that sparse recovery, certified when the chosen tokens explain the rows;
- order: positions over the whole update (batch x local steps x clients, last tokens
  excluded) <= stacked rows of each ordering site (``modules x r``); beyond it the order
  is ranked, not checked; positions whose gradient is below the noise end or are bridged
  (not checked);
- several local steps: the token set stays exact for SGD (first-block inputs do not
  depend on the weights); the ordering inputs move with the client's adapter, so the
  ordering check is approximate (exact again with the quiet craft, which keeps the model
  still);
- noise: float32 rounding of the trained weights is modelled exactly (half an ulp); DP
  noise or secagg quantisation larger than the signal leaves no span to read.
"""

from fedsecure.attacks.inversion.baseline import optimisation_baseline
from fedsecure.attacks.inversion.invert import (
    InversionSettings,
    Reconstruction,
    TrainFacts,
    invert_update,
)
from fedsecure.attacks.inversion.malicious import b_is_zero, craft_adapter
from fedsecure.attacks.inversion.observer import GradientInversion
from fedsecure.attacks.inversion.recovery import (
    TokenSetRecovery,
    b_route_check,
    row_space,
    span_check,
    sparse_recovery,
    vocabulary_atoms,
)
from fedsecure.attacks.inversion.scoring import score_reconstruction

__all__ = [
    "GradientInversion",
    "InversionSettings",
    "Reconstruction",
    "TokenSetRecovery",
    "TrainFacts",
    "b_is_zero",
    "b_route_check",
    "craft_adapter",
    "invert_update",
    "optimisation_baseline",
    "row_space",
    "score_reconstruction",
    "span_check",
    "sparse_recovery",
    "vocabulary_atoms",
]
