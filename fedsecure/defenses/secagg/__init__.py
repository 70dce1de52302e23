"""Secure aggregation (SecAgg+): the server learns only the sum of the client updates.

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning",
CCS'17; Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead",
CCS'20. Threat model: honest-but-curious server colluding with fewer than t of any
client's neighbours, with cheap checks against a malicious one (see :mod:`.protocol`).

Importing this package registers the ``secagg`` transport
(:class:`SecAggTransport`); :mod:`.protocol` holds the per-stage messages and the
client / server state machines a distributed engine can drive with bytes.
"""

from fedsecure.defenses.secagg.graph import GraphParameters, derive_graph
from fedsecure.defenses.secagg.protocol import (
    STAGES,
    ModelMismatchError,
    ProtocolStateError,
    SecAggAbortError,
    SecAggClient,
    SecAggError,
    SecAggIntegrityError,
    SecAggServer,
)
from fedsecure.defenses.secagg.transport import SecAggTransport

__all__ = [
    "STAGES",
    "GraphParameters",
    "ModelMismatchError",
    "ProtocolStateError",
    "SecAggAbortError",
    "SecAggClient",
    "SecAggError",
    "SecAggIntegrityError",
    "SecAggServer",
    "SecAggTransport",
    "derive_graph",
]
