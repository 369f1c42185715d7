"""LoRA in the encoders (Φ_E, stage I) and in the LLM (Φ_LLM, stage II) via one PEFT adapter.

The projectors P_m are ``modules_to_save``: PEFT keeps a trainable copy and saves it with the adapter,
so an adapter directory is the whole trainable state of a client. Key names are PEFT's
(``base_model.model.llm.model.layers.0.self_attn.q_proj.lora_A.weight``,
``base_model.model.encoders.image.encoder.layer.0.attention.q_proj.lora_B.weight``,
``base_model.model.projectors.image.weight``), as written by ``get_peft_model_state_dict``.

Stages (Eq. 7): ``encoder`` trains encoder LoRA + projectors, ``llm`` trains LLM LoRA only, ``both``
trains everything trainable (the ``joint`` ablation).

LoRA weights and projectors are float32 whatever dtype the frozen base is stored in, and start from the
same bytes as on a float32 base (:func:`add_lora`).

``[lora] adapter = "vera"`` builds PEFT's VeRA on the same targets instead (:mod:`.vera_adapter`): the
vectors ``…q_proj.vera_lambda_d`` / ``vera_lambda_b`` are "the LoRA weights" of every function here (stages,
counts, float32, loading), and the shared projections ``base_model.vera_A`` / ``vera_B`` are buffers.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from typing import Any

import torch

from uniflow_cli.errors import AdapterError, ConfigError, IncompatibleAdaptersError, ModelError, UsageError
from uniflow_cli.models.multimodal import unwrap  # lives with UniflowModel; importable from here too
from uniflow_cli.peft_keys import adapter_family, base_weight_key, lora_modules, lora_scaling
from uniflow_cli.settings import LoraSettings

STAGES = ("encoder", "llm", "both")


def target_regex(model: Any, lora: LoraSettings) -> str:
    """One regex (PEFT full-matches it against module names) selecting LLM and encoder linear layers."""
    alt = lambda names: "|".join(re.escape(n) for n in names)  # noqa: E731
    parts = []
    if lora.llm_target_modules:
        parts.append(rf"llm\.(.*\.)?({alt(lora.llm_target_modules)})")
    modalities = list(unwrap(model).encoders.keys())
    if lora.encoder_target_modules and modalities:
        parts.append(rf"encoders\.({alt(modalities)})\.(.*\.)?({alt(lora.encoder_target_modules)})")
    if not parts:
        raise ConfigError("both llm_target_modules and encoder_target_modules are empty", fix="list at least one module name")
    return "(" + "|".join(parts) + ")"


def _check_targets(model: Any, lora: LoraSettings, regex: str) -> None:
    names = [n for n, m in unwrap(model).named_modules() if isinstance(m, torch.nn.Linear)]
    hit = [n for n in names if re.fullmatch(regex, n)]
    for part, targets, prefix in (("llm", lora.llm_target_modules, "llm."), ("encoder", lora.encoder_target_modules, "encoders.")):
        if not targets or not any(n.startswith(prefix) for n in names):
            continue
        if not any(n.startswith(prefix) for n in hit):
            available = sorted({n.rsplit(".", 1)[-1] for n in names if n.startswith(prefix)})
            raise ConfigError(
                f"{part}_target_modules {targets} match no linear layer of the {part}",
                fix=f"choose from {available}",
            )


def adapter_config(lora: LoraSettings, *, target_modules: Any, modules_to_save: list[str] | None) -> Any:
    """PEFT's config of ``lora.adapter``'s family (``LoraConfig``, or ``VeraConfig``) for any model: the
    one place a task's model builder turns ``[lora]`` into PEFT's config."""
    if lora.is_vera:
        from uniflow_cli.models.vera_adapter import vera_config

        return vera_config(lora, target_modules=target_modules, modules_to_save=modules_to_save)
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        use_rslora=lora.use_rslora,
        target_modules=target_modules,
        modules_to_save=modules_to_save,
        bias="none",
    )


def lora_config(model: Any, lora: LoraSettings) -> Any:
    """The PEFT config for this model (targets as one regex, projectors as modules_to_save)."""
    regex = target_regex(model, lora)
    _check_targets(model, lora, regex)
    return adapter_config(lora, target_modules=regex, modules_to_save=[f"projectors.{m}" for m in unwrap(model).encoders])


def is_adapter_weight(name: str) -> bool:
    """A parameter of the adapter itself: LoRA's A/B or VeRA's d/b (not a modules_to_save copy, not a projection)."""
    return ".lora_" in name or ".vera_lambda_" in name


@contextlib.contextmanager
def _adapters_stay_float32() -> Iterator[None]:
    """While PEFT injects LoRA, tell it each base layer's device but not its dtype.

    PEFT creates and initialises every adapter in float32, moves it to its base layer's dtype, and (its
    ``autocast_adapter_dtype``) casts it back to float32 at the end: on a bfloat16 base, A's Kaiming init
    loses its low mantissa bits on the way (measured: every lora_A differs from the float32 build's). Not
    moving the dtype gives the state PEFT aims for, float32 adapters on the base's device, with the
    float32 build's exact bytes. A private PEFT hook: if a release drops it, nothing is patched and the
    adapters come out float32 but rounded (test_compute_models checks the bytes).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    original = BaseTunerLayer.__dict__.get("_get_base_layer_device_and_dtype")
    if original is None:
        yield
        return

    def device_only(self: Any, base_layer: Any) -> tuple[Any, None]:
        return original(self, base_layer)[0], None

    BaseTunerLayer._get_base_layer_device_and_dtype = device_only  # type: ignore[method-assign]
    try:
        yield
    finally:
        BaseTunerLayer._get_base_layer_device_and_dtype = original  # type: ignore[method-assign]


def add_lora(model: Any, lora: LoraSettings, seed: int = 0) -> Any:
    """Wrap a UniflowModel with LoRA (PEFT's init: A ~ Kaiming-uniform from ``seed``, B = 0).

    The LoRA weights (and the projectors' trainable copies) are float32 on any base dtype, with the
    bytes a float32 base gets from the same seed.
    """
    from peft import get_peft_model

    config = lora_config(model, lora)
    low_precision = any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters())
    with torch.random.fork_rng(devices=[]), _adapters_stay_float32() if low_precision else contextlib.nullcontext():
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    for name, param in peft_model.named_parameters():
        if (is_adapter_weight(name) or ".modules_to_save." in name) and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()  # PEFT's own autocast covers fp16/bf16; anything else is cast here
    set_trainable_stage(peft_model, "both")
    return peft_model


#: FedDPA's client-local adapter, beside PEFT's ``default`` (the global adapter every other function here means).
LOCAL_ADAPTER = "local"
#: Its init stream: another seed than the global adapter's, so the two do not start as twins (with B = 0 on
#: both, equal A would give both B the same gradient until the first aggregation told them apart).
_LOCAL_SEED_OFFSET = 0x10CA1


def add_local_adapter(peft_model: Any, lora: LoraSettings, seed: int = 0) -> Any:
    """FedDPA: a second adapter ``local`` on the global adapter's targets, both active in the forward
    (ΔW = Δ_global + Δ_local on each layer) and both trainable. It has no ``modules_to_save``: the projectors
    and a classifier head are the global adapter's (PEFT activates at most one copy of those). Same float32 and
    init discipline as :func:`add_lora`; ``seed`` is the build's."""
    import dataclasses

    if LOCAL_ADAPTER in peft_model.peft_config:
        raise UsageError("the model already has a local adapter", fix="build the model afresh")
    config = dataclasses.replace(peft_model.peft_config["default"], modules_to_save=None)
    low_precision = any(p.is_floating_point() and p.dtype != torch.float32 for n, p in peft_model.named_parameters() if not is_adapter_weight(n))
    with torch.random.fork_rng(devices=[]), _adapters_stay_float32() if low_precision else contextlib.nullcontext():
        torch.manual_seed(seed + _LOCAL_SEED_OFFSET)
        peft_model.add_adapter(LOCAL_ADAPTER, config)
    for name, param in peft_model.named_parameters():
        if is_adapter_weight(name) and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
    peft_model.base_model.set_adapter(["default", LOCAL_ADAPTER])
    return peft_model


def has_local_adapter(model: Any) -> bool:
    return LOCAL_ADAPTER in getattr(model, "peft_config", {})


def local_adapter_tensors(model: Any) -> dict[str, torch.Tensor]:
    """The local adapter's own factors under PEFT key names (as :func:`adapter_tensors`; never VeRA's
    projections, which are the federation's and live in every global)."""
    from peft import get_peft_model_state_dict

    from uniflow_cli.peft_keys import factor_side

    state = get_peft_model_state_dict(model, adapter_name=LOCAL_ADAPTER)
    return {k: state[k].detach().to("cpu", torch.float32).clone().contiguous() for k in sorted(state) if factor_side(k) in ("in", "out")}


def load_local_tensors(model: Any, tensors: dict[str, torch.Tensor], *, where: str = "client state") -> None:
    """Copy a client's local adapter (FedDPA) into ``model``'s ``local`` adapter; every key and shape is
    checked first. Keys it does not give keep their current values. On VeRA the local adapter is given the
    global adapter's projections (they are one federation-wide pair), so call it after the global is loaded."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    expected = local_adapter_tensors(model)
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise IncompatibleAdaptersError(f"{where} has {len(unknown)} tensors this model's local adapter lacks (first {unknown[0]!r})",
                                        fix="use the client state this federation's model wrote")
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise IncompatibleAdaptersError(f"{where}: tensor {key!r} has shape {tuple(value.shape)}, the local adapter expects "
                                            f"{tuple(expected[key].shape)}", fix="use the same lora r as the federation")
    state = {**expected, **{k: v.to(torch.float32) for k, v in tensors.items()}}
    shared = get_peft_model_state_dict(model)  # the global's projections (VeRA); nothing else is taken from it
    state.update({k: v for k, v in shared.items() if k.startswith("base_model.vera_")})
    set_peft_model_state_dict(model, state, adapter_name=LOCAL_ADAPTER)


def _part(name: str) -> str | None:
    if ".encoders." in name or name.startswith("encoders."):
        return "encoder"
    if ".llm." in name or name.startswith("llm."):
        return "llm"
    if ".projectors." in name or name.startswith("projectors."):
        return "projector"
    return None


def set_trainable_stage(model: Any, stage: str) -> int:
    """Set ``requires_grad`` for a stage (module docstring); returns the number of trainable parameters."""
    if stage not in STAGES:
        raise UsageError(f"unknown stage {stage!r}", fix=f"use one of {', '.join(STAGES)}")
    total = 0
    for name, param in model.named_parameters():
        part = _part(name)
        is_lora = is_adapter_weight(name)
        is_projector = part == "projector" and ".modules_to_save." in name
        train = (
            (is_lora and part == "encoder" and stage in ("encoder", "both"))
            or (is_lora and part == "llm" and stage in ("llm", "both"))
            or (is_projector and stage in ("encoder", "both"))
        )
        param.requires_grad_(train)
        total += param.numel() if train else 0
    return total


def parameter_counts(model: Any) -> dict[str, int]:
    """Parameter counts: base (frozen) parts, LoRA per part, projectors, and trainable per stage."""
    counts = {"llm": 0, "encoders": 0, "llm_lora": 0, "encoder_lora": 0, "projectors": 0}
    for name, param in model.named_parameters():
        part = _part(name)
        if is_adapter_weight(name):
            counts[f"{part}_lora"] += param.numel()
        elif part == "projector":
            if ".original_module." not in name:
                counts["projectors"] += param.numel()
        elif part == "llm":
            counts["llm"] += param.numel()
        elif part == "encoder":
            counts["encoders"] += param.numel()
    counts["trainable_stage_encoder"] = counts["encoder_lora"] + counts["projectors"]
    counts["trainable_stage_llm"] = counts["llm_lora"]
    counts["trainable_stage_both"] = counts["trainable_stage_encoder"] + counts["trainable_stage_llm"]
    return counts


def adapter_tensors(model: Any) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT key names (detached float32 CPU copies, sorted by key)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    return {k: state[k].detach().to("cpu", torch.float32).clone().contiguous() for k in sorted(state)}


def peft_config_dict(model: Any, adapter: str = "default") -> dict[str, Any]:
    """The adapter's ``LoraConfig`` as a JSON-ready dict (what ``adapter_config.json`` holds)."""
    config = model.peft_config[adapter].to_dict()
    return json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else getattr(v, "value", str(v))))


def check_compatible(model: Any, peft_config: dict[str, Any], *, fingerprint: str | None = None, where: str = "adapter") -> None:
    """Refuse an adapter of another base or another LoRA layout (rank, targets, projectors)."""
    base = unwrap(model)
    if fingerprint is not None and fingerprint != base.fingerprint:
        raise IncompatibleAdaptersError(
            f"{where} was made for base {fingerprint}, this model is {base.fingerprint}",
            fix="use the [model] settings of the workspace that produced the adapter (same preset, modalities and files)",
        )
    ours = peft_config_dict(model)
    # The family first (a VeRA global is no LoRA model's), then what makes the tensors mean what they mean.
    keys = ("peft_type", "target_modules", "modules_to_save", "projection_prng_key") if ours.get("peft_type") == "VERA" else (
        "peft_type", "target_modules", "modules_to_save", "use_rslora")
    for key in keys:
        theirs = peft_config.get(key, "LORA" if key == "peft_type" else None)
        if isinstance(theirs, list):
            theirs = sorted(theirs)
        mine = sorted(ours[key]) if isinstance(ours.get(key), list) else ours.get(key)
        if theirs != mine:
            raise IncompatibleAdaptersError(f"{where}: {key}={theirs!r} differs from this model's {mine!r}", fix="load it into a model built with the same [lora] settings")


def load_adapter_tensors(model: Any, tensors: dict[str, torch.Tensor], *, strict: bool = True, where: str = "adapter") -> None:
    """Copy adapter tensors (PEFT key names) into the model.

    ``strict`` requires exactly the model's adapter keys; ``strict=False`` accepts a subset (e.g. an
    FFA global that only carries B). Unknown keys and shape mismatches always raise.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    expected = adapter_tensors(model)
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise IncompatibleAdaptersError(f"{where} has {len(unknown)} tensors this model lacks (first {unknown[0]!r})", fix="load it into a model with the same base and [lora] settings")
    missing = sorted(set(expected) - set(tensors))
    if strict and missing:
        raise IncompatibleAdaptersError(f"{where} lacks {len(missing)} tensors of this model (first {missing[0]!r})", fix="use an adapter written for this model")
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise IncompatibleAdaptersError(
                f"{where}: tensor {key!r} has shape {tuple(value.shape)}, the model expects {tuple(expected[key].shape)}",
                fix="use the same lora r as the adapter (see its adapter_config.json)",
            )
    # Each tensor in its parameter's dtype (LoRA and projectors are float32 even on a bfloat16 base).
    dtypes = {k: v.dtype for k, v in get_peft_model_state_dict(model).items()}
    # PEFT expects every modules_to_save tensor; a partial load keeps the model's current values elsewhere.
    merged = {**expected, **tensors}
    result = set_peft_model_state_dict(model, {k: v.to(dtypes.get(k, torch.float32)) for k, v in merged.items()})
    bad = [k for k in getattr(result, "unexpected_keys", []) if is_adapter_weight(k) or ".vera_" in k or "modules_to_save" in k]
    if bad:
        raise AdapterError(f"{where}: PEFT did not place {bad[0]!r}", fix="report this bug")


def lora_settings_from_peft(peft_config: dict[str, Any], defaults: LoraSettings | None = None) -> LoraSettings:
    """LoraSettings matching an adapter's config (its family; r, alpha, rsLoRA, dropout; VeRA's projection key
    and d_initial); targets from ``defaults``."""
    from uniflow_cli.models.vera_adapter import vera_settings_from_peft

    base = defaults or LoraSettings()
    try:
        if adapter_family(peft_config) == "vera":
            return vera_settings_from_peft(peft_config, base)
        return LoraSettings(
            r=int(peft_config["r"]),
            lora_alpha=float(peft_config.get("lora_alpha", base.lora_alpha)),
            lora_dropout=float(peft_config.get("lora_dropout", base.lora_dropout)),
            use_rslora=bool(peft_config.get("use_rslora", False)),
            llm_target_modules=list(base.llm_target_modules),
            encoder_target_modules=list(base.encoder_target_modules),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise AdapterError(f"adapter config is malformed ({exc})", fix="re-publish the adapter") from None


def _base_weight(peft_model: Any, key: str, where: str) -> Any:
    """The frozen base weight a residual key (``llm.model.layers.0.self_attn.q_proj.weight``) names."""
    if not key.endswith(".weight"):
        raise AdapterError(f"{where}: residual key {key!r} does not name a weight", fix="re-publish the adapter with 'uniflow aggregate'")
    module_name = key[: -len(".weight")]
    try:
        module = unwrap(peft_model).get_submodule(module_name)
    except AttributeError:
        raise AdapterError(f"{where}: residual key {key!r} names no module of this model", fix="use the model the adapter was made for") from None
    # A LoRA-wrapped layer keeps the frozen W_0 in base_layer; the residual belongs there, not in LoRA.
    layer = getattr(module, "base_layer", module)
    weight = getattr(layer, "weight", None)
    if weight is None:
        raise AdapterError(f"{where}: module {module_name!r} has no weight", fix="use the model the adapter was made for")
    if not weight.is_floating_point():  # a bitsandbytes layer: its packed integers cannot take a dense ΔW
        raise ModelError(f"{where}: cannot fold a dense update into the quantised layer {module_name!r}",
                         fix="load the base without quantize (precision bf16) for methods that fold updates into it")
    return weight


def add_to_base(peft_model: Any, deltas: dict[str, torch.Tensor], *, where: str = "adapter") -> int:
    """W_0 += ΔW for each ``{base weight key: dense ΔW}`` (FedEx residuals, merged FLoRA globals).

    Keys are module paths inside the UniflowModel + ``.weight``; every key and shape is checked before
    any weight changes, so a bad residual leaves the model untouched. Returns the number of weights changed.
    """
    targets = {}
    for key in sorted(deltas):
        weight = _base_weight(peft_model, key, where)
        if tuple(deltas[key].shape) != tuple(weight.shape):
            raise AdapterError(
                f"{where}: residual {key!r} has shape {tuple(deltas[key].shape)}, the base weight is {tuple(weight.shape)}",
                fix="use the model the adapter was made for",
            )
        targets[key] = weight
    with torch.no_grad():
        for key, weight in targets.items():
            delta = deltas[key].to(weight.device)  # the model may already be on its device, the adapter is read to the CPU
            if weight.dtype == torch.float32 or weight.dtype == delta.dtype:
                weight.add_(delta.to(weight.dtype))
            else:  # a bfloat16/float16 base: add in float32 and round once, not the ΔW and then the sum
                weight.copy_(weight.float() + delta.float())
    return len(targets)


def lora_deltas(peft_config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The dense ΔW = s·B·A of every complete LoRA pair of an adapter, keyed by base weight (FLoRA merges)."""
    pairs, _ = lora_modules(list(tensors))
    out = {}
    for module, (a_key, b_key) in pairs.items():
        if a_key is None or b_key is None:
            continue  # only A (FedSA) or only B: B = 0 or A unknown, nothing to merge
        A, B = tensors[a_key].to(torch.float32), tensors[b_key].to(torch.float32)
        out[base_weight_key(module)] = lora_scaling(peft_config, module, A.shape[0]) * (B @ A)
    return out
