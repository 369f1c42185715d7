"""PEFT's LoRA and VeRA key names and LoRA's scaling, torch-free: what the aggregation math needs to know about the format.

``aggregation/`` (pure math) and ``models/`` ask these questions of tensor key names and LoraConfig dicts;
they live apart from :mod:`uniflow_cli.adapters` (the directory format: files, checksums, publishing) so
that the math depends on PEFT's naming rules only, not on how adapters are stored. No torch here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from uniflow_cli.errors import AdapterError

PEFT_PREFIX = "base_model.model."
A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"


def lora_modules(keys: Iterable[str]) -> tuple[dict[str, tuple[str | None, str | None]], list[str]]:
    """Split PEFT key names into ``{module: (A key, B key)}`` and the remaining (non-LoRA) keys.

    A module may have only its A (FedSA uploads) or only its B (FFA uploads).
    """
    pairs: dict[str, list[str | None]] = {}
    other: list[str] = []
    for key in sorted(keys):
        if key.endswith(A_SUFFIX):
            pairs.setdefault(key[: -len(A_SUFFIX)], [None, None])[0] = key
        elif key.endswith(B_SUFFIX):
            pairs.setdefault(key[: -len(B_SUFFIX)], [None, None])[1] = key
        elif ".lora_" in key:
            raise AdapterError(
                f"tensor {key!r} is a LoRA variant uniflow does not aggregate (only lora_A/lora_B of linear layers)",
                fix="train plain LoRA adapters (no DoRA, no LoRA on embeddings)",
            )
        elif ".vera_" in key or key in PROJECTION_KEYS:
            # A VeRA tensor would otherwise be averaged as a plain trainable tensor, silently.
            raise AdapterError(f"tensor {key!r} is a VeRA tensor in a LoRA adapter", fix="set peft_type VERA in its adapter_config.json")
        else:
            other.append(key)
    return {m: (ab[0], ab[1]) for m, ab in pairs.items()}, other


def lora_key(module: str, which: str) -> str:
    """The key of a module's ``"A"`` or ``"B"`` factor."""
    return module + (A_SUFFIX if which == "A" else B_SUFFIX)


def base_weight_key(module: str) -> str:
    """The base model's state-dict key of the weight a LoRA module adapts (for FedEx residuals)."""
    name = module.removeprefix(PEFT_PREFIX)
    return name + ".weight"


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    # Same matching rule as PEFT: a pattern matches a module name that ends with it at a dot boundary.
    name = module.removeprefix(PEFT_PREFIX)
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def lora_scaling(peft_config: Mapping[str, Any], module: str, rank: int) -> float:
    """PEFT's scaling of one LoRA module: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
    alpha = float(_pattern_value(peft_config.get("alpha_pattern") or {}, module, peft_config.get("lora_alpha", 8)))
    if peft_config.get("use_rslora"):
        return alpha / math.sqrt(rank)
    return alpha / rank


# --------------------------------------------------------------------------------------------------
# Adapter families: LoRA (with rsLoRA's scaling) and VeRA
# --------------------------------------------------------------------------------------------------
#: The adapter families uniflow trains and fuses (``[lora] adapter``); rsLoRA is LoRA with ``use_rslora``.
ADAPTER_FAMILIES = ("lora", "vera")
_PEFT_TYPES = {"LORA": "lora", "VERA": "vera"}
# VeRA (PEFT's VeraConfig): per layer a vector d (rank r) on the input side and b (d_out) on the output side,
# over ONE pair of frozen random projections shared by every layer, saved at the model level.
VERA_D_SUFFIX = ".vera_lambda_d"
VERA_B_SUFFIX = ".vera_lambda_b"
VERA_A_KEY = "base_model.vera_A"
VERA_B_KEY = "base_model.vera_B"
PROJECTION_KEYS = (VERA_A_KEY, VERA_B_KEY)


def adapter_family(peft_config: Mapping[str, Any]) -> str:
    """``lora`` or ``vera`` from a PEFT config's ``peft_type`` (absent: LoRA, as PEFT's oldest configs)."""
    peft_type = peft_config.get("peft_type", "LORA")
    if peft_type not in _PEFT_TYPES:
        raise AdapterError(f"peft_type={peft_type!r} is not one of {', '.join(_PEFT_TYPES)}",
                           fix="uniflow trains and fuses LoRA and VeRA adapters only")
    return _PEFT_TYPES[peft_type]


def factor_side(key: str) -> str | None:
    """Which side of a layer's update a key is: ``in`` (LoRA's A, VeRA's d), ``out`` (B, b), ``projection``
    (VeRA's shared frozen A, B), or None (any other trainable tensor: modules_to_save).

    Λ_d A plays LoRA's A and Λ_b B plays B (docs/aggregation.md, "VeRA"), so every fact the method registry
    states about A applies to d and every fact about B to b."""
    if key.endswith((A_SUFFIX, VERA_D_SUFFIX)):
        return "in"
    if key.endswith((B_SUFFIX, VERA_B_SUFFIX)):
        return "out"
    if key in PROJECTION_KEYS:
        return "projection"
    return None


def vera_modules(keys: Iterable[str]) -> tuple[dict[str, tuple[str | None, str | None]], list[str], list[str]]:
    """Split a VeRA adapter's keys into ``{module: (d key, b key)}``, the projection keys and the other keys.

    A module may have only its d (FedSA uploads) or only its b (FFA uploads)."""
    pairs: dict[str, list[str | None]] = {}
    projections: list[str] = []
    other: list[str] = []
    for key in sorted(keys):
        if key.endswith(VERA_D_SUFFIX):
            pairs.setdefault(key[: -len(VERA_D_SUFFIX)], [None, None])[0] = key
        elif key.endswith(VERA_B_SUFFIX):
            pairs.setdefault(key[: -len(VERA_B_SUFFIX)], [None, None])[1] = key
        elif key in PROJECTION_KEYS:
            projections.append(key)
        elif ".vera_" in key or ".lora_" in key:
            raise AdapterError(f"tensor {key!r} is not a VeRA vector or projection uniflow knows",
                               fix="train VeRA adapters on linear layers with PEFT's VeraConfig")
        else:
            other.append(key)
    return {m: (db[0], db[1]) for m, db in pairs.items()}, projections, other


def vera_key(module: str, which: str) -> str:
    """The key of a module's ``"d"`` or ``"b"`` vector."""
    return module + (VERA_D_SUFFIX if which == "d" else VERA_B_SUFFIX)


def factor_modules(keys: Iterable[str]) -> dict[str, tuple[str | None, str | None]]:
    """``{module: (input-side key, output-side key)}`` of either family, decided by the keys themselves."""
    keys = list(keys)
    if any(factor_side(k) == "projection" or k.endswith((VERA_D_SUFFIX, VERA_B_SUFFIX)) for k in keys):
        return vera_modules(keys)[0]
    return lora_modules(keys)[0]
