"""Federated LoRA aggregation: pure math on tensors (no paths, no printing).

- :mod:`.registry` — what each method is (torch-free): uploads, frozen A, stacking, residual, private B
- :mod:`.linalg`   — per-layer linear algebra (Eq. 9–13, truncated SVD, Gram-based errors)
- :mod:`.methods`  — one function per method fusing one layer, bound to its spec in ``METHODS``
- :mod:`.core`     — validation and the layer-by-layer driver ``aggregate``
- :mod:`.vera`     — every method on VeRA adapters (shared frozen A, B; vectors d, b), FedA²'s closed-form b
- :mod:`.vera_core` — the VeRA layer driver ``aggregate`` hands VeRA adapters to (projections, layer shapes)

The package imports torch only when a torch-backed name is used, so ``aggregation.registry`` stays light.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "AggregationOptions": "core", "AggregationResult": "core", "ClientUpdate": "core", "LayerReport": "core",
    "aggregate": "core", "normalize_weights": "core", "METHODS": "methods",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"uniflow_cli.aggregation.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'uniflow_cli.aggregation' has no attribute {name!r}")
