"""What a global adapter's ``uniflow.json`` records beyond the format's fields (``extra``), typed.

The file-drop server (:mod:`uniflow_cli.server`) and the Flower strategy both build a global's metadata
with :func:`global_meta`, and every reader (status, late drops, evaluation, explicit-mode local-train)
reads it back with :meth:`GlobalInfo.of` instead of string keys. ``extra`` is another party's JSON:
:meth:`GlobalInfo.of` keeps only entries of the expected shape and never raises.

Keys of ``extra``:

* ``aggregation`` — the method's summary (``AggregationResult.summary()``: weights, branches, errors)
* ``options`` — λ, ridge, rcond, weighting, dtype the server used
* ``clients`` — one row per fused client: ``client_id``, ``num_examples``, ``weight`` (+ ``path``)
* ``notes`` — the core's notes (rank padding, ...)
* ``engine`` — ``{"name": "flower", "rejected": [...]}`` when Flower carried the uploads (else absent)
* ``settings`` — ``{"model": {...}, "lora": {...}}``: the model the adapter is for, so explicit-mode
  commands need no workspace or ``--preset`` (written by ``uniflow init``, carried by every round)
* ``seed`` — round 0 only: the seed of the initial adapter
* ``vera`` — VeRA adapters only: ``{"layers": {module: [d_out, d_in]}}`` (and in drops the ``projections``'
  sha256), what the server needs beside the vectors (:mod:`uniflow_cli.aggregation.vera_core`)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class GlobalInfo:
    aggregation: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    clients: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    engine: dict[str, Any] | None = None
    settings: dict[str, Any] | None = None
    seed: int | None = None
    vera: dict[str, Any] | None = None

    def to_extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"aggregation": self.aggregation, "options": self.options, "clients": self.clients, "notes": self.notes}
        if self.engine is not None:
            extra["engine"] = self.engine
        if self.settings is not None:
            extra["settings"] = self.settings
        if self.seed is not None:
            extra["seed"] = self.seed
        if self.vera is not None:
            extra["vera"] = self.vera
        return extra

    @classmethod
    def of(cls, meta: Any) -> GlobalInfo:
        """The typed view of ``meta.extra`` (an AdapterMeta or None); entries of another shape are dropped."""
        extra = getattr(meta, "extra", None)
        if not isinstance(extra, Mapping):
            return cls()

        def typed(key: str, kind: type) -> Any:
            value = extra.get(key)
            return value if isinstance(value, kind) and not isinstance(value, bool) else None

        settings = typed("settings", dict)
        return cls(
            aggregation=typed("aggregation", dict) or {},
            options=typed("options", dict) or {},
            clients=[row for row in typed("clients", list) or [] if isinstance(row, dict)],
            notes=[str(n) for n in typed("notes", list) or []],
            engine=typed("engine", dict),
            settings=settings if settings and isinstance(settings.get("model"), dict) else None,
            seed=typed("seed", int),
            vera=typed("vera", dict),  # checked where it is used (VeraRecord.of): a bad one is an error there, not dropped
        )

    @property
    def client_ids(self) -> list[str]:
        """The client ids the global says it fused."""
        return [str(row.get("client_id")) for row in self.clients]

    @property
    def engine_name(self) -> str:
        return str(self.engine.get("name", "file-drop")) if self.engine is not None else "file-drop"

    @property
    def rel_error_mean(self) -> float | None:
        value = self.aggregation.get("rel_error_mean")
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def settings_record(model: Any, lora: Any) -> dict[str, Any]:
    """``extra.settings`` for a ModelSettings and a LoraSettings (the adapter family's keys only)."""
    from uniflow_cli.settings import lora_table

    return {"model": model.to_dict(), "lora": lora_table(lora)}


def recorded_settings(meta: Any, where: str) -> tuple[Any, Any] | None:
    """(ModelSettings, LoraSettings) an adapter records (``extra.settings``), validated; None if it records none.

    The values are another party's: they go through the same dataclasses as ``uniflow.toml``, so a bad
    one is a ConfigError naming ``where``. A ``custom`` preset's directories are paths on the machine that
    wrote the adapter; they are accepted only if they exist here (else None: the caller asks for a preset)."""
    from pathlib import Path

    from uniflow_cli.errors import ConfigError
    from uniflow_cli.models.settings import ModelSettings
    from uniflow_cli.settings import LoraSettings, check_keys

    info = GlobalInfo.of(meta)
    if info.settings is None:
        return None
    try:
        model = ModelSettings.from_dict(info.settings["model"])
        lora_table = info.settings.get("lora") if isinstance(info.settings.get("lora"), dict) else {}
        lora = LoraSettings(**check_keys(lora_table, LoraSettings, f"{where} settings.lora"))
    except ConfigError as exc:
        raise ConfigError(f"{where}: the recorded model settings are invalid ({exc.problem})", fix="name the model preset, or re-publish the adapter") from None
    if model.preset == "custom" and not all(Path(p).is_dir() for p in (model.llm, model.image_encoder, model.audio_encoder) if p):
        return None
    return model, lora


def common_settings(metas: Sequence[Any]) -> dict[str, Any] | None:
    """The ``extra.settings`` every one of ``metas`` records alike (drops of one experiment), else None."""
    records = [GlobalInfo.of(m).settings for m in metas]
    if not records or any(r is None for r in records):
        return None
    first = records[0]
    return first if all(r == first for r in records[1:]) else None


def global_meta(
    result: Any,
    *,
    round_: int | None,
    clients: list[dict[str, Any]],
    options: dict[str, Any],
    base_fingerprint: str | None,
    modalities: Sequence[str],
    num_examples: int | None,
    engine: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
) -> Any:
    """The global's ``uniflow.json`` (an AdapterMeta): the one builder of the file-drop server and Flower."""
    from uniflow_cli.adapters import AdapterMeta

    info = GlobalInfo(aggregation=result.summary(), options=options, clients=clients, notes=list(result.notes), engine=engine, settings=settings,
                      vera=getattr(result, "vera", None))
    return AdapterMeta(
        role="global",
        base_fingerprint=base_fingerprint,
        round=round_,
        num_examples=num_examples,
        modalities=sorted(set(modalities)),
        method=result.method,
        extra=info.to_extra(),
    )
