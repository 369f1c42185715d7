"""Federated LoRA aggregation: pure math on tensors (no paths, no printing).

- :mod:`.linalg`  — per-layer linear algebra (Eq. 9–13, truncated SVD, Gram-based errors)
- :mod:`.methods` — one function per method and the registry ``METHODS``
- :mod:`.core`    — validation and the layer-by-layer driver ``aggregate``
"""

from uniflow_cli.aggregation.core import (
    AggregationOptions,
    AggregationResult,
    ClientUpdate,
    LayerReport,
    aggregate,
    normalize_weights,
)
from uniflow_cli.aggregation.methods import METHODS

__all__ = [
    "METHODS",
    "AggregationOptions",
    "AggregationResult",
    "ClientUpdate",
    "LayerReport",
    "aggregate",
    "normalize_weights",
]
