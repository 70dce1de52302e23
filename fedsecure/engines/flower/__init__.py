"""Run fedsecure federations on Flower's deployment engine (SuperLink + SuperNodes).

The embedded simulation stays the default; ``fedsecure run SCENARIO.toml --engine flower``
runs the same client and server steps as a Flower ServerApp / ClientApp
(:mod:`~fedsecure.engines.flower.apps`) on Flower's Message API, with the transports'
client roles on the SuperNodes (plain, secagg with real dropouts, ckks with the key holder
as its own SuperNode) and DP accounting intact. See docs/flower.md.

Public API: :func:`run_flower` (Python), :func:`run_on_flower` (the CLI), :class:`FlowerOptions`,
:class:`LocalFederation` (start a local SuperLink and SuperNodes), :func:`check_superlink`,
:func:`generate_tls_certificates`, and the errors :class:`SuperLinkUnreachableError`,
:class:`FlowerSetupError`, :class:`FlowerRunError`.

Flower (``flwr``) is an optional dependency: ``pip install 'fedsecure[flower]'``.
"""

from fedsecure.engines.flower.launcher import (
    FlowerOptions,
    FlowerRun,
    FlowerRunError,
    FlowerSetupError,
    LocalFederation,
    SuperLinkUnreachableError,
    TlsFiles,
    check_superlink,
    generate_tls_certificates,
    run_flower,
    run_on_flower,
    write_app,
)

__all__ = [
    "FlowerOptions",
    "FlowerRun",
    "FlowerRunError",
    "FlowerSetupError",
    "LocalFederation",
    "SuperLinkUnreachableError",
    "TlsFiles",
    "check_superlink",
    "generate_tls_certificates",
    "run_flower",
    "run_on_flower",
    "write_app",
]
