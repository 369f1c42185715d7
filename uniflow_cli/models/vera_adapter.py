"""VeRA as uniflow's second adapter family: PEFT's ``VeraConfig`` from ``[lora]``, and what a VeRA model records.

VeRA (``[lora] adapter = "vera"``) puts ONE pair of frozen random projections, ``vera_A`` (r × max d_in)
and ``vera_B`` (max d_out × r), Kaiming-uniform from ``projection_prng_key``, under every target layer, and
trains two vectors per layer (d, b). The targets and ``modules_to_save`` are the same as LoRA's; nothing here
depends on the model's task: it works for any PEFT-wrapped model (:func:`vera_config` takes the targets).

The projections are saved in every adapter uniflow publishes (``save_projection``, PEFT's default), so the
round-0 global fixes them for the whole federation; a client loads them from its global and never uploads
them. Two facts the server cannot read from the vectors travel in ``uniflow.json`` ``extra.vera``
(:func:`vera_record`): each layer's shape [d_out, d_in] (A's columns: d has length r, b length d_out, so
d_in is nowhere in the tensors) and, in drops, the sha256 of the projections the client trained with, so a drop made
against other projections is refused instead of fused.
"""

from __future__ import annotations

from typing import Any

from uniflow_cli.errors import AdapterError
from uniflow_cli.peft_keys import PROJECTION_KEYS, VERA_D_SUFFIX
from uniflow_cli.settings import LoraSettings


def vera_config(lora: LoraSettings, *, target_modules: Any, modules_to_save: list[str] | None) -> Any:
    """PEFT's ``VeraConfig`` for ``[lora]`` settings with ``adapter = "vera"`` (projections always saved)."""
    from peft import VeraConfig

    return VeraConfig(
        r=lora.r,
        target_modules=target_modules,
        projection_prng_key=lora.projection_prng_key,
        save_projection=True,  # every adapter carries the federation's projections (module docstring)
        vera_dropout=lora.lora_dropout,
        d_initial=lora.d_initial,
        modules_to_save=modules_to_save,
        bias="none",
    )


def layer_shapes(model: Any) -> dict[str, list[int]]:
    """``{module: [d_out, d_in]}`` of every VeRA layer of a PEFT model, named as in its keys (``…q_proj``)."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "vera_lambda_d") and hasattr(module, "in_features"):
            out[name] = [int(module.out_features), int(module.in_features)]
    return out


def vera_record(model: Any, tensors: dict[str, Any], *, drop: bool) -> dict[str, Any]:
    """``extra.vera`` of an adapter made from ``model`` (``tensors``: its :func:`~.lora.adapter_tensors`).

    ``layers`` (each layer's [d_out, d_in]) always; a drop (``drop``) adds the sha256 of the projections
    it trained with (:class:`uniflow_cli.aggregation.vera_core.VeraRecord`)."""
    from uniflow_cli.aggregation.vera_core import projection_digest

    layers = layer_shapes(model)
    modules = {k[: -len(VERA_D_SUFFIX)] for k in tensors if k.endswith(VERA_D_SUFFIX)}
    if set(layers) != modules:  # PEFT names modules as its state dict does; a new release that did not would show here
        raise AdapterError(f"the model's VeRA layers ({len(layers)}) do not match its adapter's vectors ({len(modules)})", fix="report this bug")
    record: dict[str, Any] = {"layers": dict(sorted(layers.items()))}
    if drop:
        missing = [k for k in PROJECTION_KEYS if k not in tensors]
        if missing:
            raise AdapterError(f"the VeRA model saves no {missing[0]}", fix="build VeRA with save_projection=True (uniflow always does)")
        record["projections"] = projection_digest(tensors[PROJECTION_KEYS[0]], tensors[PROJECTION_KEYS[1]])
    return record


def vera_settings_from_peft(peft_config: dict[str, Any], base: LoraSettings) -> LoraSettings:
    """LoraSettings for a VeRA adapter's config (r, projection key, d_initial, dropout); targets from ``base``."""
    return LoraSettings(
        adapter="vera",
        r=int(peft_config["r"]),
        lora_dropout=float(peft_config.get("vera_dropout", base.lora_dropout)),
        d_initial=float(peft_config.get("d_initial", base.d_initial)),
        projection_prng_key=int(peft_config.get("projection_prng_key", 0)),
        llm_target_modules=list(base.llm_target_modules),
        encoder_target_modules=list(base.encoder_target_modules),
    )
