"""Reading and writing the eval JSON (``eval/round-<t>.json``): schema, validation, atomic write.

The schema is documented in ``docs/evaluation.md``. Writers validate before writing, so a file on
disk is always readable by :func:`read_eval_json`; readers validate again because the files are
shared and may be edited or truncated by hand.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from uniflow_cli.atomic import write_file_atomic
from uniflow_cli.errors import DataError, UniflowError, UnsafeInputError
from uniflow_cli.metrics import CLASSIFY_DEFINITIONS, METRIC_DEFINITIONS, OVERALL, metric_keys_of
from uniflow_cli.paths import read_regular

EVAL_FORMAT_VERSION = 1
_REQUIRED = ("format_version", "round", "adapter", "config", "metrics", "definitions", "samples")
_FIX_REWRITE = "re-run 'uniflow evaluate' for that round with --force"


class _Invalid(Exception):
    """Internal: one schema violation, turned into a DataError naming the file."""


def build_eval_payload(
    *,
    round: int,
    adapter: Mapping[str, Any],
    config: Mapping[str, Any],
    metrics: Mapping[str, Any],
    samples: Mapping[str, Any],
    definitions: Mapping[str, str] | None = None,
    task: str | None = None,
    labels: list[str] | None = None,
) -> dict[str, Any]:
    """Assemble a payload in the documented key order (definitions default to METRIC_DEFINITIONS).

    ``task="classify"`` (with its ``labels``) adds ``task`` and ``labels`` after ``round`` and defaults the
    definitions to CLASSIFY_DEFINITIONS; a QA payload (``task=None``) has neither key."""
    head: dict[str, Any] = {"format_version": EVAL_FORMAT_VERSION, "round": round}
    if task is not None:
        head.update(task=task, labels=list(labels or []))
    default = CLASSIFY_DEFINITIONS if task == "classify" else METRIC_DEFINITIONS
    payload = {
        **head,
        "adapter": dict(adapter),
        "config": dict(config),
        "metrics": {k: dict(v) for k, v in metrics.items()},
        "definitions": dict(default if definitions is None else definitions),
        "samples": {k: [dict(s) for s in v] for k, v in samples.items()},
    }
    validate_eval_payload(payload)
    return payload


def _check_number(where: str, value: Any, *, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _Invalid(f"{where} is {value!r}, not a finite number")


def _validate(payload: Any) -> None:
    if not isinstance(payload, dict):
        raise _Invalid(f"the top level is a {type(payload).__name__}, not an object")
    missing = [k for k in _REQUIRED if k not in payload]
    if missing:
        raise _Invalid(f"key(s) {', '.join(missing)} missing")
    if payload["format_version"] != EVAL_FORMAT_VERSION:
        raise _Invalid(f"format_version {payload['format_version']!r} is not {EVAL_FORMAT_VERSION}")
    rnd = payload["round"]
    if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0:
        raise _Invalid(f"round {rnd!r} is not an integer >= 0")

    adapter = payload["adapter"]
    if not isinstance(adapter, dict):
        raise _Invalid("adapter is not an object")
    for key in ("path", "method", "base_fingerprint"):
        if key not in adapter:
            raise _Invalid(f"adapter.{key} missing (use null when unknown)")
        if adapter[key] is not None and not isinstance(adapter[key], str):
            raise _Invalid(f"adapter.{key} is {adapter[key]!r}, not a string or null")

    classify = _validate_task(payload)
    config = payload["config"]
    if not isinstance(config, dict):
        raise _Invalid("config is not an object")
    for key in ("batch_size",) if classify else ("max_new_tokens", "batch_size"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _Invalid(f"config.{key} is {value!r}, not an integer >= 1")
    limit = config.get("limit", "absent")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise _Invalid(f"config.limit is {limit!r}, not null or an integer >= 1")
    bs = config.get("bertscore")
    # A classifier generates nothing: its config has no generation length and no BERTScore backbone.
    if not classify and (not isinstance(bs, dict) or not isinstance(bs.get("model"), str) or isinstance(bs.get("num_layers"), bool) or not isinstance(bs.get("num_layers"), int)):
        raise _Invalid("config.bertscore must be {\"model\": str, \"num_layers\": int}")
    _validate_results(payload)


def _validate_task(payload: dict[str, Any]) -> bool:
    """Whether the payload is a classify eval (``task`` and its ``labels``); a QA payload has no ``task``."""
    if "task" not in payload:
        return False
    if payload["task"] != "classify":
        raise _Invalid(f"task {payload['task']!r} is not 'classify' (a qa eval file records no task)")
    labels = payload.get("labels")
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels):
        raise _Invalid("labels must be a list of at least 2 class names")
    return True


def _validate_results(payload: dict[str, Any]) -> None:
    """metrics, definitions and samples of a payload whose header :func:`_validate` checked."""
    metrics = payload["metrics"]
    if not isinstance(metrics, dict) or not metrics:
        raise _Invalid("metrics is not a non-empty object")
    if OVERALL not in metrics:
        raise _Invalid(f"metrics.{OVERALL} missing")
    for modality, values in metrics.items():
        if not isinstance(values, dict):
            raise _Invalid(f"metrics.{modality} is not an object")
        for key in metric_keys_of(payload):
            if key not in values:
                raise _Invalid(f"metrics.{modality}.{key} missing (use null when not computed)")
            _check_number(f"metrics.{modality}.{key}", values[key])
        n = values.get("n")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise _Invalid(f"metrics.{modality}.n is {n!r}, not an integer >= 1")

    definitions = payload["definitions"]
    if not isinstance(definitions, dict) or not all(isinstance(v, str) for v in definitions.values()):
        raise _Invalid("definitions is not an object of strings")

    samples = payload["samples"]
    if not isinstance(samples, dict):
        raise _Invalid("samples is not an object")
    for modality, items in samples.items():
        if not isinstance(items, list):
            raise _Invalid(f"samples.{modality} is not a list")
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not isinstance(item.get("prediction"), str) or not isinstance(item.get("reference"), str):
                raise _Invalid(f"samples.{modality}[{i}] needs string 'prediction' and 'reference'")


def validate_eval_payload(payload: Any, *, source: str = "eval payload") -> None:
    """Raise :class:`DataError` naming ``source`` and the first schema violation found."""
    try:
        _validate(payload)
    except _Invalid as exc:
        raise DataError(f"{source} is not a valid uniflow eval file: {exc}", fix=_FIX_REWRITE) from None


def dumps_eval_json(payload: Mapping[str, Any]) -> bytes:
    """Canonical bytes: 2-space indent, key order as given, UTF-8, no NaN, trailing newline."""
    return (json.dumps(payload, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def write_eval_json(path: str | Path, payload: Mapping[str, Any], force: bool = False) -> Path:
    """Validate ``payload`` and write it atomically to ``path`` (refuses to overwrite without ``force``)."""
    path = Path(path)
    validate_eval_payload(payload)
    write_file_atomic(path, dumps_eval_json(payload), force=force, replaces=_is_eval_json, kind="uniflow eval JSON")
    return path


def _is_eval_json(path: Path) -> bool:
    """What ``evaluate --force`` may replace: an eval JSON uniflow wrote, nothing else."""
    try:
        read_eval_json(path)
    except UniflowError:
        return False
    return True


def read_eval_json(path: str | Path) -> dict[str, Any]:
    """Read and validate one eval JSON; every problem is a one-line :class:`DataError` naming the file."""
    path = Path(path)
    try:
        if path.is_dir():
            raise IsADirectoryError(path)
        text = read_regular(path, follow=True).decode("utf-8")  # a FIFO here must not hang `report`/`status`
    except UnsafeInputError as exc:
        raise DataError(f"eval file {exc.problem}", fix="pass a regular JSON file") from None
    except FileNotFoundError:
        raise DataError(f"eval file {path} does not exist", fix="run 'uniflow evaluate' first") from None
    except IsADirectoryError:
        raise DataError(f"eval file {path} is a directory", fix="pass the JSON file or its run directory") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"eval file {path} is not UTF-8 text ({exc.reason})", fix=_FIX_REWRITE) from None
    except OSError as exc:
        raise UniflowError(f"cannot read eval file {path}: {exc.strerror}", fix="check the file's permissions") from None
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"eval file {path} is not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg})", fix=_FIX_REWRITE
        ) from None
    validate_eval_payload(payload, source=f"eval file {path}")
    return payload
