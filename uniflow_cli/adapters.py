"""The adapter directory format — the only module that reads or writes it.

An adapter directory is a PEFT LoRA (or VeRA) adapter plus uniflow's metadata::

    <adapter>/
      adapter_config.json        PEFT LoraConfig (r, lora_alpha, target_modules, use_rslora, modules_to_save, ...)
                                 or VeraConfig (r, projection_prng_key, d_initial, save_projection=true, ...)
      adapter_model.safetensors  PEFT key names (...lora_A.weight, ...lora_B.weight, projector weights; VeRA:
                                 ...vera_lambda_d, ...vera_lambda_b and the shared base_model.vera_A / vera_B)
      uniflow.json               format_version, role, client_id, round, num_examples, modalities, stage,
                                 method, base_fingerprint, sha256 of the tensors file(s), created, extra
      residual.safetensors       FedEx only: dense per-layer residual, keyed by the base weight it is added to

It loads with ``peft.PeftModel.from_pretrained(base, dir)``. Directories are published atomically
(:func:`uniflow_cli.atomic.publish_dir`); readers skip hidden directories and refuse drops whose
``uniflow.json`` is missing or whose sha256 does not match (a half-written or corrupted drop).
Plain PEFT directories (no ``uniflow.json``) are accepted as input; they carry no metadata.
Tensors are only ever read from safetensors: nothing is unpickled.

Beside it: :mod:`uniflow_cli.peft_keys` (PEFT key names and scaling, torch-free, which the aggregation
math uses without depending on the format) and :mod:`uniflow_cli.safetensors_io` (the pread reader and
its header checks, and ``file_sha256``).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from uniflow_cli.atomic import publish_dir
from uniflow_cli.errors import AdapterError, UniflowError, UnsafeInputError
from uniflow_cli.paths import ID_RULE, is_real_dir, is_valid_id, read_regular, regular_file_problem
from uniflow_cli.peft_keys import adapter_family, lora_modules, vera_modules
from uniflow_cli.safetensors_io import FLOAT_DTYPES, FLOAT_NAMES, SafetensorsFile, file_sha256
from uniflow_cli.safetensors_io import is_int_in as _is_int
from uniflow_cli.safetensors_io import short_repr as _short


FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
TENSORS_FILE = "adapter_model.safetensors"
META_FILE = "uniflow.json"
RESIDUAL_FILE = "residual.safetensors"
ROLES = ("client", "global")


MAX_EXAMPLES = 2**53  # the largest integer float64 (the weights' dtype) represents exactly
MODALITY_NAMES = ("image", "audio", "text")


@dataclass
class AdapterMeta:
    """The contents of ``uniflow.json`` (validated on construction)."""

    role: str
    base_fingerprint: str | None = None
    client_id: str | None = None
    round: int | None = None
    num_examples: int | None = None
    modalities: list[str] = field(default_factory=list)
    stage: str | None = None
    method: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Filled in by write_adapter; checked by open_adapter.
    sha256: str | None = None
    residual_sha256: str | None = None
    created: str | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        # Every field is checked by type, not trusted: a drop's uniflow.json is written by another party.
        if self.role not in ROLES:
            raise AdapterError(f"role={self.role!r} is not one of {ROLES}", fix="use role 'client' or 'global'")
        if self.client_id is not None:
            if not (isinstance(self.client_id, int) and not isinstance(self.client_id, bool)) and not isinstance(self.client_id, str):
                raise AdapterError(f"client_id={self.client_id!r} must be a string", fix="record the client's id, e.g. \"3\"")
            self.client_id = str(self.client_id)
            if not is_valid_id(self.client_id):
                raise AdapterError(f"client_id={self.client_id!r} is not a plain name", fix=f"use {ID_RULE}")
        if self.num_examples is not None and not _is_int(self.num_examples, 1, MAX_EXAMPLES):
            raise AdapterError(
                f"num_examples={_short(self.num_examples)} must be a positive integer <= 2^53",
                fix="the client must record how many training examples it used",
            )
        if self.round is not None and not _is_int(self.round, 0, MAX_EXAMPLES):
            raise AdapterError(f"round={_short(self.round)} must be an integer >= 0", fix="record the round number the adapter belongs to")
        if not isinstance(self.modalities, list) or any(m not in MODALITY_NAMES for m in self.modalities):
            raise AdapterError(
                f"modalities={_short(self.modalities)} must be a list of {', '.join(MODALITY_NAMES)}", fix='e.g. "modalities": ["image"]'
            )
        for name in ("base_fingerprint", "stage", "method", "created"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and len(value) <= 256):
                raise AdapterError(f"{name}={_short(value)} must be a string", fix="re-publish the adapter with uniflow")
        for name in ("sha256", "residual_sha256"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value)):
                raise AdapterError(f"{name}={_short(value)} is not a sha256 hex digest", fix="re-publish the adapter with uniflow")
        if not isinstance(self.extra, dict):
            raise AdapterError(f"extra={_short(self.extra)} must be a JSON object", fix="re-publish the adapter with uniflow")
        if self.format_version != FORMAT_VERSION:
            raise AdapterError(
                f"format_version={self.format_version!r} is not supported (this uniflow reads {FORMAT_VERSION})",
                fix="upgrade uniflow on this machine to match the writer",
            )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any, *, where: Path) -> AdapterMeta:
        if not isinstance(data, dict):
            raise AdapterError(f"{where} does not hold a JSON object", fix="re-publish the adapter")
        known = {f for f in cls.__dataclass_fields__}  # noqa: C416 - explicit is clearer here
        unknown = sorted(set(data) - known)
        if unknown:
            raise AdapterError(f"{where} has unknown keys {unknown}", fix="re-publish the adapter with this uniflow version")
        if "role" not in data:
            raise AdapterError(f"{where} has no 'role'", fix="re-publish the adapter (role must be client or global)")
        try:
            return cls(**data)
        except AdapterError as exc:
            raise AdapterError(f"{where}: {exc.problem}", fix=exc.fix) from None
        except TypeError as exc:
            raise AdapterError(f"{where} is malformed ({exc})", fix="re-publish the adapter") from None


@dataclass
class LoadedAdapter:
    """A fully loaded adapter (small adapters, tests, Flower). Large ones are streamed with AdapterReader."""

    path: Path | None
    peft_config: dict[str, Any]
    tensors: dict[str, Any]
    meta: AdapterMeta | None
    residual: dict[str, Any] | None = None


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------
def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(read_regular(path, follow=True).decode("utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"{path} is missing", fix=f"{what}") from None
    except UnsafeInputError as exc:
        raise AdapterError(exc.problem, fix=what) from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise AdapterError(f"{path} is not valid JSON ({_short(exc, 120)})", fix=f"{what}") from None
    except ValueError as exc:  # e.g. an integer literal beyond Python's digit limit
        raise AdapterError(f"{path} is not valid JSON ({_short(str(exc), 120)})", fix=f"{what}") from None


def _check_peft_config(config: Any, path: Path) -> dict[str, Any]:
    if not isinstance(config, dict):
        raise AdapterError(f"{path} does not hold a JSON object", fix="re-save the adapter with PEFT or uniflow")
    if config.get("peft_type", "LORA") not in ("LORA", "VERA"):
        raise AdapterError(
            f"{path}: peft_type={_short(config.get('peft_type'))} is not LORA or VERA", fix="uniflow trains and aggregates LoRA and VeRA adapters only"
        )
    if config.get("peft_type") == "VERA":
        return _check_vera_config(config, path)
    if config.get("use_dora"):
        raise AdapterError(f"{path}: use_dora=true is not supported", fix="train plain LoRA (use_dora=false)")
    r = config.get("r")
    if not _is_int(r, 1, 1 << 20):
        raise AdapterError(f"{path}: r={_short(r)} must be a positive integer", fix="re-save the adapter with a valid LoraConfig")
    _check_alpha(config.get("lora_alpha", 8), f"{path}: lora_alpha")
    if not isinstance(config.get("use_rslora", False), bool):
        raise AdapterError(f"{path}: use_rslora={_short(config.get('use_rslora'))} must be true or false", fix="re-save the adapter")
    for name, check in (("alpha_pattern", _check_alpha), ("rank_pattern", _check_rank)):
        patterns = config.get(name) or {}
        if not isinstance(patterns, dict):
            raise AdapterError(f"{path}: {name}={_short(patterns)} must be an object of regex -> value", fix="re-save the adapter")
        for pattern, value in patterns.items():
            try:
                re.compile(rf"(.*\.)?({pattern})$")
            except (re.error, RecursionError, OverflowError) as exc:
                raise AdapterError(f"{path}: {name} key {_short(pattern)} is not a valid regex ({exc})", fix="correct the pattern") from None
            check(value, f"{path}: {name}[{_short(pattern)}]")
    targets = config.get("target_modules")
    if targets is not None and not isinstance(targets, str) and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise AdapterError(f"{path}: target_modules={_short(targets)} must be a list of names or a regex", fix="re-save the adapter")
    return config


def _check_vera_config(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """A VeraConfig's fields the aggregation and the model build rely on, by type and range."""
    if not _is_int(config.get("r"), 1, 1 << 20):
        raise AdapterError(f"{path}: r={_short(config.get('r'))} must be a positive integer", fix="re-save the adapter with a valid VeraConfig")
    if not _is_int(config.get("projection_prng_key", 0), 0, (1 << 63) - 1):
        raise AdapterError(f"{path}: projection_prng_key={_short(config.get('projection_prng_key'))} must be an integer in [0, 2^63)",
                           fix="re-save the adapter with a valid VeraConfig")
    # Without saved projections they would be regenerated from the key, which PEFT itself calls unreliable
    # across systems: uniflow's federation is defined by the round-0 global's saved projections.
    saved = config.get("save_projection", True)
    if saved is not True:
        shown = json.dumps(saved) if isinstance(saved, bool) else _short(saved)  # JSON's spelling: the file says false
        raise AdapterError(f"{path}: save_projection={shown} (the projections are not in the adapter)",
                           fix="save VeRA adapters with save_projection=true (uniflow always does)")
    for name, low, high in (("d_initial", -math.inf, math.inf), ("vera_dropout", 0.0, 1.0)):
        value = config.get(name, 0.0)
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and low <= value < high):
            raise AdapterError(f"{path}: {name}={_short(value)} is not a valid number", fix="re-save the adapter with a valid VeraConfig")
    if not isinstance(config.get("fan_in_fan_out", False), bool):
        raise AdapterError(f"{path}: fan_in_fan_out={_short(config.get('fan_in_fan_out'))} must be true or false", fix="re-save the adapter")
    targets = config.get("target_modules")
    if targets is not None and not isinstance(targets, str) and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise AdapterError(f"{path}: target_modules={_short(targets)} must be a list of names or a regex", fix="re-save the adapter")
    return config


def check_peft_config(config: Any, where: str) -> dict[str, Any]:
    """A LoraConfig or VeraConfig dict from an untrusted source (a Flower reply): the same checks as an adapter's file."""
    return _check_peft_config(config, Path(where))


def _check_alpha(value: Any, where: str) -> None:
    # alpha = 0 would scale every update to zero; a string would fail deep inside the math.
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0):
        raise AdapterError(f"{where}={_short(value)} must be a finite number > 0", fix="re-save the adapter (lora_alpha is usually 2*r)")


def _check_rank(value: Any, where: str) -> None:
    if not _is_int(value, 1, 1 << 20):
        raise AdapterError(f"{where}={_short(value)} must be a positive integer", fix="re-save the adapter")


class AdapterReader(Mapping):
    """A lazily read adapter directory: metadata up front, tensors on demand (``reader[key]``).

    Opening validates the whole directory (config, metadata, checksum) before any math runs.
    Tensors are read one at a time from the safetensors file, so K large client adapters can be
    aggregated layer by layer without holding them all in memory.
    """

    def __init__(self, path: Path, *, verify: bool = True, strict: bool = False) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise AdapterError(f"adapter {self.path} does not exist or is not a directory", fix="check the path")
        _check_files(self.path, strict=strict)
        tensors_path = self.path / TENSORS_FILE
        self.peft_config = _check_peft_config(
            _read_json(self.path / CONFIG_FILE, "the adapter needs its adapter_config.json; re-publish it"), self.path / CONFIG_FILE
        )
        if not tensors_path.is_file():
            raise AdapterError(f"{tensors_path} is missing", fix="re-publish the adapter (the drop is incomplete)")
        meta_path = self.path / META_FILE
        self.meta: AdapterMeta | None = None
        if meta_path.exists():
            self.meta = AdapterMeta.from_json(_read_json(meta_path, "re-publish the adapter"), where=meta_path)
            if verify:
                if self.meta.sha256 is None:
                    raise AdapterError(f"{meta_path} records no sha256", fix="re-publish the adapter with uniflow")
                actual = file_sha256(tensors_path)
                if actual != self.meta.sha256:
                    raise AdapterError(
                        f"{tensors_path} sha256 {actual[:12]}… does not match uniflow.json ({self.meta.sha256[:12]}…): "
                        "half-written or corrupted drop",
                        fix="have the client publish it again",
                    )
        try:
            self._handle = SafetensorsFile(tensors_path)
            self._keys = self._handle.keys()
            self._key_set = set(self._keys)
        except (OSError, ValueError) as exc:
            raise AdapterError(
                f"{tensors_path} is not a readable safetensors file ({exc})",
                fix="re-publish it with uniflow or PEFT (float tensors in a complete safetensors file)",
            ) from None
        self.residual_path = self.path / RESIDUAL_FILE
        if verify:
            _verify_residual(self.residual_path, self.meta, meta_path)
        # LoRA: {module: (A key, B key)}; VeRA: its vectors {module: (d key, b key)} and projection keys.
        self.family = adapter_family(self.peft_config)
        self.vera_modules: dict[str, tuple[str | None, str | None]] = {}
        self.projection_keys: list[str] = []
        try:
            if self.family == "vera":
                self.modules = {}
                self.vera_modules, self.projection_keys, self.other_keys = vera_modules(self._keys)
            else:
                self.modules, self.other_keys = lora_modules(self._keys)
        except AdapterError as exc:
            raise AdapterError(f"{tensors_path}: {exc.problem}", fix=exc.fix) from None

    # Mapping protocol: reader[key] reads one tensor from disk.
    def __getitem__(self, key: str) -> Any:
        if key not in self._keys:
            raise KeyError(key)
        try:
            return self._handle.get(key)
        except (OSError, ValueError) as exc:
            raise AdapterError(
                f"{self.path / TENSORS_FILE}: tensor {key!r} cannot be read ({exc})", fix="the file is corrupt; re-publish it"
            ) from None

    def __contains__(self, key: object) -> bool:  # Mapping's default would read the tensor
        return key in self._key_set

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._handle.shape(key)

    def dtype(self, key: str) -> str:
        return self._handle.dtype(key)

    def nbytes(self) -> int:
        return (self.path / TENSORS_FILE).stat().st_size

    def read_residual(self) -> dict[str, Any] | None:
        if not self.residual_path.exists():
            return None
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            # Dtypes from the header, before any conversion: integers would be added to the base weights as if they
            # were deltas, and some dtypes (F8_E8M0) make load_file fail with a bare KeyError.
            with safe_open(str(self.residual_path), "pt") as handle:
                dtypes = {key: handle.get_slice(key).get_dtype() for key in handle.keys()}
            for key, dtype in sorted(dtypes.items()):
                if dtype not in FLOAT_DTYPES:
                    raise AdapterError(
                        f"{self.residual_path}: tensor {_short(key)} has dtype {dtype}; residual tensors must be float ({FLOAT_NAMES})",
                        fix="re-publish the adapter with float residuals",
                    )
            return load_file(str(self.residual_path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise AdapterError(f"{self.residual_path} is not readable ({exc})", fix="re-publish the adapter") from None

    @property
    def label(self) -> str:
        """How this adapter is named in messages and reports."""
        if self.meta is not None and self.meta.client_id is not None:
            return f"client {self.meta.client_id} ({self.path})"
        return str(self.path)


def _verify_residual(residual_path: Path, meta: AdapterMeta | None, meta_path: Path) -> None:
    """A residual is recorded in uniflow.json and matches its sha256; a recorded one is present.

    The residual is added to the frozen base weights of every client, so an unverified one (a plain PEFT
    directory cannot record it; a null ``residual_sha256`` records nothing) would change the model unseen,
    and a recorded residual that is gone would silently drop FedEx's correction.
    """
    present = residual_path.exists()
    recorded = meta.residual_sha256 if meta is not None else None
    if present and meta is None:
        raise AdapterError(f"{residual_path} has no uniflow.json to record its sha256 (refused unverified)",
                           fix="re-publish the adapter with uniflow, or remove the residual")
    if present and not recorded:
        raise AdapterError(f"{residual_path} is not recorded in uniflow.json (no residual_sha256)", fix="re-publish the adapter")
    if not present and recorded:
        raise AdapterError(f"{meta_path} records a residual_sha256 but {residual_path} is missing (incomplete drop)",
                           fix="re-publish the adapter")
    if present and file_sha256(residual_path) != recorded:
        raise AdapterError(f"{residual_path} does not match its sha256 in uniflow.json", fix="re-publish the adapter")


def _check_files(path: Path, *, strict: bool) -> None:
    """The adapter's files are regular files: never a FIFO or device (reading one would block or never end).

    ``strict`` (drops found in a shared directory, written by another party): the directory and its files
    must not be symlinks either. Explicit paths a user names may be symlinks (e.g. a model cache).
    """
    if strict and not is_real_dir(path):
        raise AdapterError(f"drop {path} is a symlink (refused: it could point anywhere)", fix="publish the drop as a directory")
    for name in (CONFIG_FILE, TENSORS_FILE, META_FILE, RESIDUAL_FILE):
        problem = regular_file_problem(path / name, follow=not strict)
        if problem is not None and problem != "is missing":
            raise AdapterError(f"{path / name} {problem}", fix="publish the drop again with uniflow (plain files only)")


def open_adapter(path: Path, *, verify: bool = True, strict: bool = False) -> AdapterReader:
    return AdapterReader(Path(path), verify=verify, strict=strict)


def read_adapter(path: Path, *, verify: bool = True) -> LoadedAdapter:
    reader = open_adapter(path, verify=verify)
    tensors = {key: reader[key] for key in reader}
    return LoadedAdapter(reader.path, reader.peft_config, tensors, reader.meta, reader.read_residual())


def scan_adapter_dirs(parent: Path, *, round_: int | None = None) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Valid client drops directly below ``parent`` and the rejected ones with the reason.

    Hidden (dot-prefixed) directories are unfinished publishes and skipped silently. A drop is valid when
    it is a real directory (no symlink) named by a client id, its files are regular files, its checksum
    matches, and its ``uniflow.json`` says it is that client's drop (and for ``round_``, of that round).
    """
    valid: list[Path] = []
    rejected: list[tuple[Path, str]] = []
    if not is_real_dir(Path(parent)):
        return valid, rejected
    for entry in sorted(Path(parent).iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_symlink():
            rejected.append((entry, "is a symlink (refused: a drop must be a directory, not a link to elsewhere)"))
            continue
        if not entry.is_dir():
            continue
        if not is_valid_id(entry.name):
            rejected.append((entry, f"directory name {_short(entry.name)} is not a client id ({ID_RULE})"))
            continue
        if not os.path.lexists(entry / META_FILE):
            rejected.append((entry, "no uniflow.json (incomplete drop)"))
            continue
        try:
            reader = open_adapter(entry, strict=True)
        except AdapterError as exc:
            rejected.append((entry, str(exc)))
            continue
        if reader.meta is None or reader.meta.role != "client" or reader.meta.client_id != entry.name:
            said = "no metadata" if reader.meta is None else f"role {reader.meta.role!r}, client_id {reader.meta.client_id!r}"
            rejected.append((entry, f"uniflow.json says {said}; a drop in clients/{entry.name} must be client {entry.name!r}"))
            continue
        if round_ is not None and reader.meta.round != round_:
            rejected.append((entry, f"uniflow.json says round {reader.meta.round!r}, but the drop sits in round {round_}"))
            continue
        valid.append(entry)
    return valid, rejected


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "value") and type(value).__module__.startswith("peft"):  # PEFT enums (TaskType, PeftType)
        return value.value
    return value


def _created() -> str:
    # SOURCE_DATE_EPOCH makes uniflow.json byte-reproducible too (the tensors always are).
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    stamp = int(epoch) if epoch and epoch.isdigit() else int(time.time())
    return datetime.fromtimestamp(stamp, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _contiguous(tensors: Mapping[str, Any]) -> dict[str, Any]:
    import torch

    out = {}
    for key in sorted(tensors):
        tensor = tensors[key]
        if not isinstance(tensor, torch.Tensor):
            raise AdapterError(f"tensor {key!r} is a {type(tensor).__name__}, not a torch.Tensor", fix="pass torch tensors")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise AdapterError(f"tensor {key!r} contains NaN or Inf; refusing to publish it", fix="check the training run")
        out[key] = tensor.detach().to("cpu").contiguous()
    return out


def write_adapter(
    out_dir: Path,
    *,
    peft_config: Mapping[str, Any],
    tensors: Mapping[str, Any],
    meta: AdapterMeta,
    residual: Mapping[str, Any] | None = None,
    force: bool = False,
    on_staged: Any = None,
) -> Path:
    """Publish an adapter directory atomically; returns its path.

    Never overwrites unless ``force``, and even then only an adapter uniflow published with the same role
    (never a dataset, an input, or any other directory). ``on_staged(tmp)`` runs after the files are
    written and before the rename.
    """
    out_dir = Path(out_dir)
    config = _check_peft_config(_jsonable(dict(peft_config)), out_dir / CONFIG_FILE)
    config.setdefault("peft_type", "LORA")
    payload = _contiguous(tensors)
    if not payload:
        raise AdapterError("refusing to publish an adapter with no tensors", fix="check which tensors the method shares")
    residual_payload = _contiguous(residual) if residual else None
    with publish_dir(out_dir, force=force, replaces=lambda old: is_adapter_of_role(old, meta.role), kind=f"uniflow {meta.role} adapter") as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _save_tensors(payload, tmp / TENSORS_FILE, out_dir)
        meta_out = AdapterMeta(**{**meta.to_json(), "sha256": file_sha256(tmp / TENSORS_FILE), "created": _created()})
        if residual_payload:
            _save_tensors(residual_payload, tmp / RESIDUAL_FILE, out_dir)
            meta_out.residual_sha256 = file_sha256(tmp / RESIDUAL_FILE)
        else:
            meta_out.residual_sha256 = None
        (tmp / META_FILE).write_text(
            json.dumps(_jsonable(meta_out.to_json()), indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        if on_staged is not None:  # e.g. the server stages its report here, so nothing can fail after the rename
            on_staged(tmp)
    return out_dir


def _save_tensors(payload: Mapping[str, Any], path: Path, out_dir: Path) -> None:
    """safetensors' writer reports a full disk as its own error type: make it one line (publish_dir cleans up)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(dict(payload), str(path), metadata={"format": "pt"})
    except (SafetensorError, OSError) as exc:
        text = str(exc)
        reason = "no space left on device" if ("No space left" in text or "code: 28" in text) else _short(text, 160)
        raise UniflowError(f"cannot write {out_dir / path.name}: {reason}", fix="free disk space (nothing was published)") from None


def is_adapter_of_role(path: Path, role: str) -> bool:
    """Whether ``path`` is an adapter directory uniflow published with this role (what --force may replace)."""
    if not is_real_dir(path):
        return False
    try:
        data = json.loads(read_regular(path / META_FILE).decode("utf-8"))
    except (OSError, UniflowError, ValueError):
        return False
    return isinstance(data, dict) and data.get("role") == role
