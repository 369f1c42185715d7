"""Folding earlier rounds into the frozen base: FedEx residuals and FLoRA merges, in one place.

Methods that leave part of the global outside the LoRA factors (:attr:`MethodSpec.folds_history`) need
the earlier globals to rebuild the model of a round: FedEx's dense residual ``U − B̄Ā`` of every round is
added to W_0 (:attr:`MethodSpec.residual`), and FLoRA's stacked adapter of every round is merged into
W_0 before the next round starts from a fresh LoRA (:attr:`MethodSpec.merges_into_base`). Local training
(the next round's start) and evaluation (a round's model) both go through :func:`fold_history`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Folded:
    rounds: list[int] = field(default_factory=list)  # rounds whose residual or merge changed the base
    residual_tensors: int = 0  # base weights changed by FedEx residuals
    merged_layers: int = 0  # base weights changed by FLoRA merges


def fold_history(model: Any, history: Sequence[tuple[int, Any]], spec: Any, *, merge: bool = True, into: Folded | None = None) -> Folded:
    """Add each ``(round, LoadedAdapter)`` of ``history`` to ``model``'s base weights, oldest first.

    A residual the adapter carries is always added (only FedEx globals carry one); its LoRA pairs are
    merged (ΔW = s·B·A) when ``spec.merges_into_base`` and ``merge`` (evaluation loads the last round's
    pairs as LoRA instead). Every key and shape is checked before a weight changes (``add_to_base``).
    """
    from uniflow_cli.models.lora import add_to_base, lora_deltas

    folded = into if into is not None else Folded()
    for r, adapter in history:
        where = str(adapter.path) if getattr(adapter, "path", None) is not None else f"round {r} global"
        changed = False
        if adapter.residual:
            folded.residual_tensors += add_to_base(model, adapter.residual, where=f"{where} (residual)")
            changed = True
        if merge and spec is not None and spec.merges_into_base:
            folded.merged_layers += add_to_base(model, lora_deltas(adapter.peft_config, adapter.tensors), where=where)
            changed = True
        if changed and r not in folded.rounds:
            folded.rounds.append(r)
    return folded
