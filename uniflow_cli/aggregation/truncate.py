"""A client's start at its own rank: the global truncated to the client's first r_k components (FlexLoRA, HetLoRA).

Every padding method (``MethodSpec.truncates_to_client_rank``) lets each client train at its own rank r_k
(``[lora] client_ranks``, else ``r``) while the server publishes rank r_max (heterogeneous drops are
zero-padded, :mod:`.core`). A
client with r_k < r_max starts from the global's first r_k components: rows ``A[:r_k]`` and columns
``B[:, :r_k]``. For FlexLoRA's global (SVD factors, singular values in decreasing order) that is the best
rank-r_k approximation of the global's ΔW (Eckart–Young); for HetLoRA's it is the paper's truncation.

The kept components keep their ΔW: PEFT's scaling depends on the rank (α/r, α/√r with rsLoRA), so B is
multiplied by s_global / s_client — the client's s_k·B'·A' equals s_g·B[:, :r_k]·A[:r_k] exactly. Pure: no
paths, no model; the caller (:func:`uniflow_cli.client_round.starting_model`) builds the model from the result.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from uniflow_cli.peft_keys import (
    PEFT_PREFIX,
    adapter_family,
    lora_modules,
    lora_scaling,
)

Tensor = torch.Tensor


def truncate_to_rank(tensors: Mapping[str, Tensor], peft_config: Mapping[str, Any], rank: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A LoRA adapter's tensors and config at rank ``rank``: every module keeps its first min(rank, r_module)
    components, B rescaled so that each kept component's ΔW is unchanged; non-LoRA tensors as they are.

    The config gets ``r = rank`` and a ``rank_pattern`` entry for each module whose own rank stays below it.
    A ``rank`` at or above the adapter's gives the adapter back unchanged (the same tensors and config).
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if adapter_family(peft_config) != "lora":
        raise ValueError("only LoRA adapters have components to truncate (a VeRA federation has one rank)")
    modules, _other = lora_modules(list(tensors))
    ranks = {m: _module_rank(tensors, m, pair) for m, pair in modules.items()}
    if all(r <= rank for r in ranks.values()):
        return dict(tensors), dict(peft_config)
    config = {**peft_config, "r": rank}
    pattern = {}
    out = dict(tensors)
    for module, (a_key, b_key) in modules.items():
        kept = min(rank, ranks[module])
        if kept < rank:
            pattern[module.split(PEFT_PREFIX, 1)[-1]] = kept
        if kept == ranks[module] and lora_scaling(peft_config, module, ranks[module]) == lora_scaling(config, module, kept):
            continue  # nothing cut and the scaling is the same: the tensors stay bit for bit
        if a_key is not None:
            out[a_key] = tensors[a_key][:kept].clone()
        if b_key is not None:
            factor = lora_scaling(peft_config, module, ranks[module]) / lora_scaling(config, module, kept)
            B = tensors[b_key][:, :kept]
            out[b_key] = (B.to(torch.float64) * factor).to(B.dtype) if factor != 1.0 else B.clone()
    config["rank_pattern"] = pattern
    return out, config


def client_start(start: Any, rank: int | None) -> Any:
    """The global ``start`` (a LoadedAdapter) as a client of rank ``rank`` starts from it: truncated when the
    global is a LoRA adapter of a larger rank, else ``start`` itself (None: the global's rank)."""
    if rank is None or adapter_family(start.peft_config) != "lora" or rank >= int(start.peft_config["r"]):
        return start
    tensors, config = truncate_to_rank(start.tensors, start.peft_config, rank)
    return replace(start, tensors=tensors, peft_config=config)


def _module_rank(tensors: Mapping[str, Tensor], module: str, pair: tuple[str | None, str | None]) -> int:
    a_key, b_key = pair
    return int(tensors[a_key].shape[0]) if a_key is not None else int(tensors[b_key].shape[1])  # type: ignore[index]

