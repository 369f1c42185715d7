"""Models: presets, converters, the multimodal UniflowModel (paper Eq. 2–6) and its LoRA adapter.

Public API (import from here; heavy libraries load lazily)::

    settings = ModelSettings(preset="smol")                 # or "tiny-random", or "custom" + dirs
    model = load_model(settings, LoraSettings(r=8), seed=0)  # PeftModel around a UniflowModel
    batch = collate(samples, model)                         # samples: dicts, see multimodal.py
    loss = model(batch).loss                                # Eq. 6, answer tokens only
    loss = model(batch, full_logits=False).loss             # same loss, LM head only on answer positions
    model = load_model(settings, lora, dtype=torch.bfloat16) # frozen base in bf16; LoRA + projectors float32
    enable_gradient_checkpointing(model)                     # LLM and encoders, non-reentrant
    set_trainable_stage(model, "encoder")                   # | "llm" | "both" (Eq. 7)
    clf = load_model(ModelSettings(task="classify", preset="minilm", labels=["negative", "positive"]), lora)  # PeftModel(SequenceClassifier)
    texts = model.generate(collate(samples, model, train=False), max_new_tokens=16)
    tensors, cfg = adapter_tensors(model), peft_config_dict(model)   # → adapters.write_adapter
    load_adapter_tensors(model, read_adapter(path).tensors)          # ← adapters.read_adapter
    base_fingerprint(settings)                               # stamped into every adapter
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from uniflow_cli.models.presets import Progress, base_fingerprint, cache_status, prepare
from uniflow_cli.models.settings import MODALITIES, POOLS, PRESETS, ModelSettings, PromptSettings

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from uniflow_cli.settings import LoraSettings

__all__ = [
    "MODALITIES",
    "POOLS",
    "PRESETS",
    "ModelSettings",
    "PromptSettings",
    "adapter_tensors",
    "base_fingerprint",
    "build_base",
    "cache_status",
    "check_compatible",
    "collate",
    "enable_gradient_checkpointing",
    "load_adapter_tensors",
    "load_model",
    "model_from_adapter",
    "parameter_counts",
    "peft_config_dict",
    "prepare",
    "set_trainable_stage",
    "unwrap",
]


def _settings(model_cfg: Any) -> ModelSettings:
    if isinstance(model_cfg, ModelSettings):
        return model_cfg
    return ModelSettings.from_dict(model_cfg)


def build_base(
    model_cfg: ModelSettings | dict[str, Any], seed: int = 0, *, progress: Progress | None = None, dtype: torch.dtype | None = None
) -> Any:
    """A :class:`UniflowModel` without LoRA: frozen base + projectors initialised from ``seed``.

    ``dtype`` (None = float32) is the dtype of the frozen LLM and encoders, loaded straight into it; the
    projectors are float32 whatever it is, with the same initial values. The fingerprint ignores it.
    This is also the ``base`` for ``peft.PeftModel.from_pretrained(base, adapter_dir)``.
    """
    import torch

    from uniflow_cli.models.multimodal import UniflowModel
    from uniflow_cli.models.presets import load_parts

    settings = _settings(model_cfg)
    if settings.is_classify:  # a SequenceClassifier; its head comes from a fixed seed, not ``seed`` (every client's base is one)
        from uniflow_cli.models.classify import build_classifier

        return build_classifier(settings, progress=progress, dtype=dtype)
    parts = load_parts(settings, progress=progress, dtype=dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UniflowModel(parts.llm, parts.tokenizer, parts.encoders, settings, parts.fingerprint)


def load_model(
    model_cfg: ModelSettings | dict[str, Any],
    lora_cfg: LoraSettings,
    seed: int = 0,
    *,
    progress: Progress | None = None,
    dtype: torch.dtype | None = None,
    local_adapter: bool = False,
) -> Any:
    """The UniflowModel wrapped by PEFT with LoRA in the encoders and the LLM (all trainable: stage ``both``).

    ``dtype``: the frozen base's (see :func:`build_base`); LoRA weights stay float32. Same settings and
    seed give bit-identical initial adapter tensors, in any ``dtype``. ``local_adapter`` adds FedDPA's second,
    client-local adapter (:func:`~uniflow_cli.models.lora.add_local_adapter`), part of the build so that
    ``uniflow simulate``'s pool snapshots and resets it like every other trainable tensor.
    """
    from uniflow_cli.models.lora import add_local_adapter, add_lora

    settings = _settings(model_cfg)
    if settings.is_classify:
        from uniflow_cli.models.classify import add_classifier_lora

        model = add_classifier_lora(build_base(settings, seed, progress=progress, dtype=dtype), lora_cfg, seed)
    else:
        model = add_lora(build_base(settings, seed, progress=progress, dtype=dtype), lora_cfg, seed)
    return add_local_adapter(model, lora_cfg, seed) if local_adapter else model


def model_from_adapter(
    model_cfg: ModelSettings | dict[str, Any],
    adapter: Any,
    lora_defaults: LoraSettings | None = None,
    *,
    progress: Progress | None = None,
    dtype: torch.dtype | None = None,
    build: Any = None,
    local_adapter: bool = False,
) -> Any:
    """Build the model for a loaded adapter (``adapters.read_adapter(...)``) and load its tensors.

    Refuses an adapter whose ``base_fingerprint`` differs from this base's. ``dtype``: the frozen base's
    (the adapter's tensors load into float32 LoRA weights unchanged). ``build`` (default :func:`load_model`,
    same signature) makes the model before the tensors load: ``uniflow simulate`` passes one that hands back
    a loaded model reset to what ``load_model`` would build. ``local_adapter``: FedDPA's (see :func:`load_model`),
    left at its init; the caller loads the client's own.
    """
    from uniflow_cli.models.lora import check_compatible, load_adapter_tensors, lora_settings_from_peft

    options = {"local_adapter": True} if local_adapter else {}  # FedDPA only: every other build keeps load_model's signature
    model = (build or load_model)(model_cfg, lora_settings_from_peft(adapter.peft_config, lora_defaults), 0, progress=progress, dtype=dtype, **options)
    fingerprint = adapter.meta.base_fingerprint if adapter.meta is not None else None
    where = str(adapter.path) if adapter.path is not None else "adapter"
    check_compatible(model, adapter.peft_config, fingerprint=fingerprint, where=where)
    load_adapter_tensors(model, adapter.tensors, strict=False, where=where)
    return model


def enable_gradient_checkpointing(model: Any) -> None:
    """Recompute activations in the backward pass instead of storing them: the LLM and every encoder whose
    architecture supports it (a plain or PEFT-wrapped UniflowModel).

    Non-reentrant checkpointing: gradients reach LoRA weights inside a checkpointed layer even when the
    layer's inputs need no gradient (stage II's text embeddings, stage I's frozen pixels), so no input has
    to be made to require grad. Active only while the model is in training mode (HF's rule).
    """
    from uniflow_cli.models.classify import enable_gradient_checkpointing as classifier_checkpointing, is_classifier
    from uniflow_cli.models.multimodal import unwrap

    if is_classifier(model):
        return classifier_checkpointing(model)
    kwargs = {"use_reentrant": False}
    base = unwrap(model)
    for module in [base.llm, *base.encoders.values()]:
        if not getattr(module, "supports_gradient_checkpointing", False):
            continue  # e.g. a custom encoder family without HF's checkpointing hooks: it runs as before
        enable = getattr(module, "activation_checkpointing_enable", None)
        if enable is not None:  # transformers >= 5.x name; gradient_checkpointing_enable is its deprecated alias
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def set_trainable_stage(model: Any, stage: str) -> int:
    """Which parameters train in ``stage`` (Eq. 7; :func:`uniflow_cli.models.lora.set_trainable_stage`); a
    classify model trains LoRA and its head in every stage (:func:`uniflow_cli.models.classify.set_trainable_stage`)."""
    from uniflow_cli.models import classify, lora

    return (classify if classify.is_classifier(model) else lora).set_trainable_stage(model, stage)


def parameter_counts(model: Any) -> dict[str, int]:
    """Parameter counts by part (QA: :func:`uniflow_cli.models.lora.parameter_counts`; classify: encoder, lora, head, trainable)."""
    from uniflow_cli.models import classify, lora

    return (classify if classify.is_classifier(model) else lora).parameter_counts(model)


def __getattr__(name: str) -> Any:
    # Lazy re-exports: importing uniflow_cli.models must not import torch (CLI start-up time).
    if name in ("adapter_tensors", "peft_config_dict", "load_adapter_tensors", "check_compatible"):
        from uniflow_cli.models import lora

        return getattr(lora, name)
    if name in ("collate", "UniflowModel", "Collator", "AnswerOutput", "pool", "unwrap"):
        from uniflow_cli.models import multimodal

        return getattr(multimodal, name)
    raise AttributeError(name)
