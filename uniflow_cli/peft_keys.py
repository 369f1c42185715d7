"""PEFT's LoRA key names and scaling, torch-free: what the aggregation math needs to know about the format.

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
        else:
            other.append(key)
    return {m: (ab[0], ab[1]) for m, ab in pairs.items()}, other


def lora_key(module: str, which: str) -> str:
    """The key of a module's ``"A"`` or ``"B"`` factor."""
    return module + (A_SUFFIX if which == "A" else B_SUFFIX)


def base_weight_key(module: str) -> str:
    """The base model's state-dict key of the weight a LoRA module adapts (for FedEx residuals)."""
    name = module[len(PEFT_PREFIX) :] if module.startswith(PEFT_PREFIX) else module
    return name + ".weight"


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    # Same matching rule as PEFT: a pattern matches a module name that ends with it at a dot boundary.
    name = module[len(PEFT_PREFIX) :] if module.startswith(PEFT_PREFIX) else module
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
