"""Create a workspace: ``uniflow.toml`` and the round-0 global adapter every client starts from.

The round-0 adapter is PEFT's initialisation of the configured model (LoRA A Kaiming-uniform from the
seed, B = 0, projectors from the seed; a classify model's head from its fixed seed) stamped with the base
fingerprint; its ``uniflow.json`` records
``role="global"``, ``round=0``, ``method=None``, ``extra.seed`` and ``extra.settings`` (the model and LoRA
settings, see :mod:`uniflow_cli.global_info`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uniflow_cli.errors import ConfigError, OutputExistsError
from uniflow_cli.global_info import settings_record
from uniflow_cli.models.presets import Progress
from uniflow_cli.models.settings import ModelSettings
from uniflow_cli.aggregation.registry import check_family
from uniflow_cli.settings import AggregateSettings, LoraSettings, TrainSettings, aggregate_table, lora_table, train_table
from uniflow_cli.workspace import CONFIG_NAME, Workspace


@dataclass
class InitResult:
    root: Path
    config_path: Path
    global_dir: Path
    fingerprint: str
    counts: dict[str, int]
    tensors: int


def settings_from_config(config: dict[str, Any]) -> tuple[ModelSettings, LoraSettings]:
    """``[model]`` and ``[lora]`` of a loaded ``uniflow.toml`` as validated dataclasses."""
    lora = dict(config.get("lora") or {})
    known = {f.name for f in dataclasses.fields(LoraSettings)}
    unknown = sorted(set(lora) - known)
    if unknown:
        raise ConfigError(f"unknown [lora] keys {unknown} in {CONFIG_NAME}", fix=f"use only {sorted(known)}")
    return ModelSettings.from_dict(config.get("model")), LoraSettings(**lora)


def _is_toml(path: Path) -> bool:
    import tomllib

    from uniflow_cli.errors import UniflowError
    from uniflow_cli.paths import read_regular

    try:
        return isinstance(tomllib.loads(read_regular(path).decode("utf-8")), dict)
    except (OSError, ValueError, UniflowError):
        return False


def config_dict(
    model: ModelSettings, lora: LoraSettings, seed: int, train: TrainSettings | None = None, aggregate: AggregateSettings | None = None
) -> dict[str, Any]:
    return {
        "model": model.to_dict(),
        "lora": lora_table(lora),
        "train": train_table(train or TrainSettings(seed=seed)),
        "aggregate": aggregate_table(aggregate or AggregateSettings()),
    }


def init_workspace(
    root: Path, model: ModelSettings, lora: LoraSettings, *, seed: int = 0, force: bool = False, progress: Progress | None = None,
    train: TrainSettings | None = None, aggregate: AggregateSettings | None = None,
) -> InitResult:
    """Write ``root/uniflow.toml`` and ``root/rounds/0/global``; nothing is written if anything fails first."""
    from uniflow_cli.adapters import AdapterMeta, write_adapter
    from uniflow_cli.atomic import check_writable_target, write_file_atomic
    from uniflow_cli.models import adapter_tensors, load_model, parameter_counts, peft_config_dict
    from uniflow_cli.models.vera_adapter import vera_record
    from uniflow_cli.workspace import dumps_config

    from uniflow_cli.models.task import check_train_settings

    if train is None and model.is_classify:
        from uniflow_cli.models.task import DEFAULT_LR

        train = TrainSettings(seed=seed, stages="joint", lr=DEFAULT_LR["classify"])  # a classifier trains in one stage
    if train is not None:
        check_train_settings(model, train)
    check_family((aggregate or AggregateSettings()).method, lora.adapter)  # e.g. svd on VeRA: one line, nothing written
    ws = Workspace(Path(root).resolve())
    # Refuse before the (slow) model build, so a mistaken re-init costs nothing and changes nothing.
    for target in (ws.config_path, ws.global_dir(0)):
        try:
            check_writable_target(target, force=force)
        except OutputExistsError:
            if force:
                raise
            raise OutputExistsError(
                f"{target} already exists (the workspace is initialised)", fix="pass --force to re-initialise it, or choose another directory"
            ) from None
    later = [t for t in ws.rounds() if t > 0] if ws.root.is_dir() else []
    if force and later:
        # A new round 0 (other model, seed or LoRA config) would no longer match the rounds built on the old one.
        raise OutputExistsError(
            f"{ws.root} already has rounds {later[0]}..{later[-1]} built on the current round 0; re-initialising would orphan them",
            fix=f"move or delete {ws.root / 'rounds'} first, or initialise a new directory",
        )
    text = dumps_config(config_dict(model, lora, seed, train, aggregate))

    peft_model = load_model(model, lora, seed, progress=progress)
    tensors = adapter_tensors(peft_model)
    if not lora.is_vera:  # a per-module spec covers the model's LoRA modules, each pattern matches one: before anything is written
        from uniflow_cli.aggregation.registry import method_spec
        from uniflow_cli.peft_keys import lora_modules

        method_spec((aggregate or AggregateSettings()).method).check_modules(lora_modules(list(tensors))[0])
    base = peft_model.get_base_model()
    meta = AdapterMeta(
        role="global",
        base_fingerprint=base.fingerprint,
        round=0,
        modalities=list(model.modalities),
        method=None,
        extra={"seed": seed, "settings": settings_record(model, lora),  # explicit-mode commands need no --preset
               **({"vera": vera_record(peft_model, tensors, drop=False)} if lora.is_vera else {})},  # the layers' shapes
    )
    ws.root.mkdir(parents=True, exist_ok=True)
    existed = ws.global_dir(0).exists()
    write_adapter(ws.global_dir(0), peft_config=peft_config_dict(peft_model), tensors=tensors, meta=meta, force=force)
    try:
        write_file_atomic(ws.config_path, text.encode("utf-8"), force=force, replaces=_is_toml, kind="uniflow.toml")
    except BaseException:
        if not existed:  # do not leave a round-0 adapter without its config
            import shutil

            shutil.rmtree(ws.global_dir(0), ignore_errors=True)
        raise
    return InitResult(ws.root, ws.config_path, ws.global_dir(0), base.fingerprint, parameter_counts(peft_model), len(tensors))
