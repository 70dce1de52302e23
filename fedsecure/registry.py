"""One registry type for every pluggable catalog.

Models, datasets, aggregators, transports, defenses and attacks register themselves in
their own module with ``@REGISTRY.register("name")``. Lookups of an unknown name raise a
``KeyError`` subclass whose message lists the registered names and the fix.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

# Modules whose import registers the built-in entries of each catalog.
_BUILTIN_MODULES: dict[str, tuple[str, ...]] = {
    "model": ("fedsecure.models.catalog",),
    "dataset": ("fedsecure.data.catalog",),
    "aggregator": ("fedsecure.federation.aggregation",),
    "transport": (
        "fedsecure.federation.transport",
        "fedsecure.defenses.secagg",
        "fedsecure.defenses.ckks",
    ),
    "defense": (
        "fedsecure.defenses.dp",
        "fedsecure.defenses.central_dp",
    ),
    "attack": (
        "fedsecure.attacks.membership",
        "fedsecure.attacks.canaries",
        "fedsecure.attacks.client_membership",
        "fedsecure.attacks.inversion",
    ),
}


class UnknownNameError(KeyError, ValueError):
    """Raised for a name that is not registered; the message lists the registered ones."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """A name -> entry catalog with helpful errors.

    Parameters
    ----------
    kind:
        What the registry holds ("model", "dataset", ...), used in error messages and to
        find the modules that register the built-in entries.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._help: dict[str, str] = {}
        self._loaded = False

    def register(self, name: str, *, help: str = "") -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name`` (names are unique)."""

        def deco(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            doc = help or (getattr(obj, "__doc__", "") or "").strip().split("\n")[0]
            self._help[name] = doc
            return obj

        return deco

    def _load_builtins(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        # Catalog modules import their optional dependencies (opacus, tenseal, flwr) lazily, so
        # importing them never fails for a missing extra; any import error here is a bug to surface.
        for mod in _BUILTIN_MODULES.get(self.kind, ()):
            importlib.import_module(mod)

    def get(self, name: str) -> T:
        """Return the entry called ``name`` or raise :class:`UnknownNameError`."""
        self._load_builtins()
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; registered {self.kind}s: "
                f"{', '.join(sorted(self._entries)) or '(none)'}"
            ) from None

    def names(self) -> list[str]:
        self._load_builtins()
        return sorted(self._entries)

    def describe(self) -> dict[str, str]:
        """name -> one-line description, for ``fedsecure models`` and friends."""
        self._load_builtins()
        return {n: self._help[n] for n in sorted(self._entries)}

    def __contains__(self, name: object) -> bool:
        self._load_builtins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


MODELS: Registry = Registry("model")
DATASETS: Registry = Registry("dataset")
AGGREGATORS: Registry = Registry("aggregator")
TRANSPORTS: Registry = Registry("transport")
DEFENSES: Registry = Registry("defense")
ATTACKS: Registry = Registry("attack")
