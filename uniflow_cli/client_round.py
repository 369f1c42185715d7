"""One client's round in memory: build the starting model from the global, train, split what is uploaded
from what stays on the client. Shared by ``uniflow local-train`` (:mod:`uniflow_cli.local_train`) and the
Flower ClientApp (:mod:`uniflow_cli.flower.client`), so the same inputs give the same bytes on both paths.

Every per-method difference is asked of the method's :class:`~uniflow_cli.aggregation.registry.MethodSpec`:
which tensors a client shares (``spec.shares``), whether A is frozen (``frozen_A``), whether each client keeps
its own B (``private_B``, FedSA) or a whole local adapter beside the global one (``local_adapter``, FedDPA) —
its *client state*, kept in ``state/clients/<k>/`` between rounds — and whether earlier globals are folded into
the base (``folds_history``: FedEx residuals, FLoRA merges — :func:`uniflow_cli.models.history.fold_history`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from uniflow_cli.errors import IncompatibleAdaptersError
from uniflow_cli.peft_keys import adapter_family, factor_side
from uniflow_cli.schedule import mixed_seed
from uniflow_cli.settings import TrainSettings
from uniflow_cli.aggregation.registry import as_spec, check_family
from uniflow_cli.training import TrainStats, train_loop

def _is_B(key: str) -> bool:
    """LoRA's B or VeRA's b: the output side, which FedSA keeps on the client."""
    return factor_side(key) == "out"


@dataclass
class ClientRound:
    """What one client's round produced, before anything is written or sent."""

    shared: dict[str, Any]  # what the method uploads, in cfg.dtype
    private: dict[str, Any] | None  # the client state (FedSA's B, FedDPA's local adapter): never leaves the client
    peft_config: dict[str, Any]
    meta: Any  # AdapterMeta(role="client", ...)
    stats: TrainStats
    upload_bytes: int
    folded_rounds: list[int]
    private_config: dict[str, Any] | None = None  # the client state's adapter config (None: peft_config's)


# --------------------------------------------------------------------------------------------------
# What is shared, what stays
# --------------------------------------------------------------------------------------------------
def upload_tensors(method: Any, tensors: Mapping[str, Any]) -> dict[str, Any]:
    """What the client shares (``spec.shares``): FedSA keeps B private, FFA never re-sends the frozen A."""
    spec = as_spec(method)
    return {k: v for k, v in tensors.items() if spec.shares(k)}


def private_tensors(method: Any, tensors: Mapping[str, Any]) -> dict[str, Any] | None:
    """The client's own B (VeRA: b) of a method that keeps it (FedSA; a per-module spec: of its FedSA modules), else None."""
    spec = as_spec(method)
    return {k: v for k, v in tensors.items() if _is_B(k) and (spec.for_key(k) or spec).private_B} if spec.private_B else None


def method_may_keep_state(method: str | None) -> bool:
    """Methods whose client keeps private state between rounds (FedSA's B, FedDPA's local adapter), or a
    method not known yet."""
    from uniflow_cli.aggregation.registry import SPECS

    return method is None or (method in SPECS and SPECS[method].keeps_client_state)


def read_client_state(state_dir: Path | None, method: Any) -> dict[str, Any] | None:
    """What this client kept from its last round (FedSA's B, FedDPA's local adapter), or None (another
    method, or its first round)."""
    from uniflow_cli.adapters import TENSORS_FILE, read_adapter

    if state_dir is None or not as_spec(method).keeps_client_state or not (Path(state_dir) / TENSORS_FILE).exists():
        return None
    return read_adapter(Path(state_dir)).tensors


def write_client_state(state_dir: Path, result: ClientRound) -> Path | None:
    """Keep a round's client state (FedSA's B, FedDPA's local adapter) in ``state_dir`` for the client's next
    round and its personalised evaluation (replaced atomically).

    The one writer of client state, for the file-drop path and the Flower node alike; None when the round
    kept nothing private."""
    from uniflow_cli.adapters import AdapterMeta, write_adapter

    if result.private is None:
        return None
    m = result.meta
    meta = AdapterMeta(role="client", client_id=m.client_id, round=m.round, method=m.method, base_fingerprint=m.base_fingerprint)
    return write_adapter(Path(state_dir), peft_config=result.private_config or result.peft_config, tensors=result.private, meta=meta, force=True)


# --------------------------------------------------------------------------------------------------
# The round
# --------------------------------------------------------------------------------------------------
def starting_model(start: Any, settings: Any, lora: Any, spec: Any, *, round_: int, history: Sequence[tuple[int, Any]] = (),
                   private: Mapping[str, Any] | None = None, private_where: str = "client state",
                   started_from: str | None = None, dtype: Any = None, build: Callable[..., Any] | None = None) -> tuple[Any, list[int]]:
    """(the model round ``round_`` trains, the earlier rounds folded into its base); ``dtype`` is the frozen
    base's (None: float32), the LoRA and projectors stay float32. ``build`` (default ``models.load_model``,
    same signature) makes the model before the method's start is applied (``uniflow simulate``: a pool
    that reuses one loaded model, reset to what a fresh build would give)."""
    from uniflow_cli.models import load_model, model_from_adapter
    from uniflow_cli.models.history import fold_history
    from uniflow_cli.models.lora import load_adapter_tensors, unwrap
    from uniflow_cli.peft_keys import lora_modules

    if spec.truncates_to_client_rank:  # a client of rank r_k < the global's starts from its first r_k components ([lora] client_ranks)
        from uniflow_cli.aggregation.truncate import client_start

        start = client_start(start, getattr(lora, "r", None))
    if spec.merges_into_base and start.meta is not None and start.meta.round:
        # FLoRA: every published global so far is merged into the base; training starts from a fresh LoRA
        # whose init is the same on every client (seeded by the round only).
        model = (build or load_model)(settings, lora, seed=round_, dtype=dtype)
        fp = start.meta.base_fingerprint
        if fp is not None and fp != unwrap(model).fingerprint:
            raise IncompatibleAdaptersError(f"{started_from or 'the global'} was made for base {fp}, this model is {unwrap(model).fingerprint}",
                                            fix="use the model settings the global was made with")
        # Only the LoRA restarts (the stacked global LoRA goes into the base): the other trainables — the
        # projectors, a classifier head — continue from the global's average, as in every other method.
        _pairs, carried = lora_modules(start.tensors)
        if carried:
            load_adapter_tensors(model, {k: start.tensors[k] for k in carried}, strict=False, where=started_from or "the global")
    else:
        model = model_from_adapter(settings, start, lora, dtype=dtype, build=build, local_adapter=spec.local_adapter)
    folded = fold_history(model, history, spec).rounds if spec.folds_history else []
    if spec.private_B and private:
        load_adapter_tensors(model, {k: v for k, v in private.items() if _is_B(k)}, strict=False, where=private_where)
    if spec.local_adapter:  # FedDPA: the client's own adapter beside the global (its init in the first round)
        from uniflow_cli.models.lora import load_local_tensors

        load_local_tensors(model, dict(private or {}), where=private_where)
    return model, folded


def train_client_round(
    cfg: TrainSettings,
    start: Any,
    dataset: Any,
    settings: Any,
    lora: Any,
    *,
    method: Any,
    client_id: str | None,
    round_: int,
    history: Sequence[tuple[int, Any]] = (),
    private: Mapping[str, Any] | None = None,
    private_where: str = "client state",
    total_rounds: int | None = None,
    started_from: str | None = None,
    device: Any = "auto",
    gradient_checkpointing: bool = False,
    on_step: Callable[[int, int, float, str], None] | None = None,
    build: Callable[..., Any] | None = None,
) -> ClientRound:
    """Build the starting model from the global ``start`` (a LoadedAdapter), train, return the upload.

    ``history`` is ``[(round, LoadedAdapter), ...]`` of the globals published in rounds 1..t (fedex folds
    their residuals, flora their merged LoRA into the base); ``private`` is the client state from the last
    round; ``method`` a name or a MethodSpec. ``settings``/``lora`` (ModelSettings, LoraSettings) are
    recorded in the drop (``extra.settings``) so the server can carry them into the global. The base is
    loaded in ``cfg.precision``'s dtype and trained on ``device`` (a name or a ``torch.device``), with
    ``gradient_checkpointing`` if asked; the uploaded tensors are float32 on the CPU, then ``cfg.dtype``.
    ``build``: see :func:`starting_model`."""
    import torch

    from uniflow_cli.compute import check_precision, compute_dtype, precision_dtype, resolve_device
    from uniflow_cli.models import adapter_tensors, enable_gradient_checkpointing, peft_config_dict
    from uniflow_cli.models.quantize import check_quantize, quantize_llm
    from uniflow_cli.models.task import check_dataset_labels, check_global_task, check_train_settings
    from uniflow_cli.peft_keys import lora_modules

    spec = as_spec(method).at_round(round_)  # RoLoRA: this round's phase (what it trains and sends)
    check_family(spec, adapter_family(start.peft_config))
    if spec.per_module:  # it covers the global's modules, and each of its patterns matches one (LoRA only: check_family)
        spec.check_modules(lora_modules(start.tensors)[0])  # e.g. svd on a VeRA global: one line, before any build
    # The task's demands (classify: one stage, a global of the same task and labels, every label known), before any build.
    check_train_settings(settings, cfg)
    check_global_task(start.meta, settings, started_from or "the global")
    check_dataset_labels(dataset, settings, "the client's shard")
    device = resolve_device(device)
    check_precision(cfg.precision, device)  # before the model build: a wrong choice costs nothing
    check_quantize(cfg.quantize, device, spec)
    model, folded = starting_model(start, settings, lora, spec, round_=round_, history=history, private=private,
                                   private_where=private_where, started_from=started_from, dtype=precision_dtype(cfg.precision), build=build)
    if cfg.quantize is not None:
        quantize_llm(model, cfg.quantize, device=device, compute_dtype=compute_dtype(device, cfg.precision))
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    seed = mixed_seed(cfg.seed, round_, client_id or "0")
    stats = train_loop(model, dataset, cfg, method=spec, seed=seed, round_=round_, total_rounds=total_rounds, device=device, on_step=on_step)
    tensors = adapter_tensors(model)  # detached float32 CPU copies, whatever the device and precision
    dtype = getattr(torch, cfg.dtype)
    shared = {k: v.to(dtype) for k, v in upload_tensors(spec, tensors).items()}
    upload_bytes = sum(v.numel() * v.element_size() for v in shared.values())
    meta = client_meta(cfg, stats, model, dataset, spec=spec, settings=settings, lora=lora, client_id=client_id, round_=round_,
                       upload_bytes=upload_bytes, started_from=started_from, folded=folded, gradient_checkpointing=gradient_checkpointing)
    if adapter_family(start.peft_config) == "vera":  # the layers' shapes and the projections it trained with, for the server
        from uniflow_cli.models.vera_adapter import vera_record

        meta.extra["vera"] = vera_record(model, tensors, drop=True)
    if spec.local_adapter:  # FedDPA: the whole local adapter stays; its config has no modules_to_save
        from uniflow_cli.models.lora import LOCAL_ADAPTER, local_adapter_tensors

        return ClientRound(shared, local_adapter_tensors(model), peft_config_dict(model), meta, stats, upload_bytes, folded,
                           private_config=peft_config_dict(model, LOCAL_ADAPTER))
    return ClientRound(shared, private_tensors(spec, tensors), peft_config_dict(model), meta, stats, upload_bytes, folded)


def client_meta(cfg: TrainSettings, stats: TrainStats, model: Any, dataset: Any, *, spec: Any, settings: Any, lora: Any,
                client_id: str | None, round_: int, upload_bytes: int, started_from: str | None, folded: list[int],
                gradient_checkpointing: bool = False) -> Any:
    """The drop's ``uniflow.json``: who, which round, the training record (the settings, and where and how
    it computed: device, precision, gradient checkpointing) and the model settings."""
    from uniflow_cli.adapters import AdapterMeta
    from uniflow_cli.global_info import settings_record
    from uniflow_cli.models.quantize import quantized_layers
    from uniflow_cli.models.lora import unwrap

    train = {
        "steps": stats.steps,
        "steps_per_stage": stats.steps_per_stage,
        "first_loss": stats.first_loss,
        "last_loss": stats.last_loss,
        "seconds": round(stats.seconds, 3),
        "tokens": stats.tokens,
        "truncated": stats.truncated,
        "upload_bytes": upload_bytes,
        "started_from": started_from,
        "folded_rounds": folded,
        **({"phase": spec.phase} if spec.phase is not None else {}),  # RoLoRA: the factor this round trained and sent
        "config": {**asdict(cfg), "device": stats.device, "math": stats.math, "gradient_checkpointing": gradient_checkpointing,
                   "quantized_layers": quantized_layers(model)},
    }
    return AdapterMeta(
        role="client",
        client_id=client_id,
        round=round_,
        num_examples=stats.num_examples,
        modalities=sorted(set(dataset["modality"])),
        stage=cfg.stages if cfg.stages != "two-stage" else f"two-stage(tau={cfg.tau:g},by={cfg.stage_by})",
        method=spec.name,
        base_fingerprint=unwrap(model).fingerprint,
        extra={"train": train, "settings": settings_record(settings, lora)},
    )
