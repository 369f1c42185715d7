"""The adapter directory format — the only module that reads or writes it.

An adapter directory is a PEFT LoRA adapter plus uniflow's metadata::

    <adapter>/
      adapter_config.json        PEFT LoraConfig (r, lora_alpha, target_modules, use_rslora, modules_to_save, ...)
      adapter_model.safetensors  PEFT key names (...lora_A.weight, ...lora_B.weight, projector weights)
      uniflow.json               format_version, role, client_id, round, num_examples, modalities, stage,
                                 method, base_fingerprint, sha256 of the tensors file(s), created, extra
      residual.safetensors       FedEx only: dense per-layer residual, keyed by the base weight it is added to

It loads with ``peft.PeftModel.from_pretrained(base, dir)``. Directories are published atomically
(:func:`uniflow_cli.atomic.publish_dir`); readers skip hidden directories and refuse drops whose
``uniflow.json`` is missing or whose sha256 does not match (a half-written or corrupted drop).
Plain PEFT directories (no ``uniflow.json``) are accepted as input; they carry no metadata.
Tensors are only ever read from safetensors: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
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
from uniflow_cli.errors import AdapterError

FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
TENSORS_FILE = "adapter_model.safetensors"
META_FILE = "uniflow.json"
RESIDUAL_FILE = "residual.safetensors"
ROLES = ("client", "global")
PEFT_PREFIX = "base_model.model."
_A_SUFFIX = ".lora_A.weight"
_B_SUFFIX = ".lora_B.weight"


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
        if self.role not in ROLES:
            raise AdapterError(f"role={self.role!r} is not one of {ROLES}", fix="use role 'client' or 'global'")
        if self.client_id is not None:
            self.client_id = str(self.client_id)
        if self.num_examples is not None and (
            isinstance(self.num_examples, bool) or not isinstance(self.num_examples, int) or self.num_examples <= 0
        ):
            raise AdapterError(
                f"num_examples={self.num_examples!r} must be a positive integer",
                fix="the client must record how many training examples it used",
            )
        if self.round is not None and (not isinstance(self.round, int) or self.round < 0):
            raise AdapterError(f"round={self.round!r} must be an integer >= 0", fix="record the round number the adapter belongs to")
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
# Key names and scaling
# --------------------------------------------------------------------------------------------------
def lora_modules(keys: Iterator[str] | list[str] | set[str]) -> tuple[dict[str, tuple[str | None, str | None]], list[str]]:
    """Split PEFT key names into ``{module: (A key, B key)}`` and the remaining (non-LoRA) keys.

    A module may have only its A (FedSA uploads) or only its B (FFA uploads).
    """
    pairs: dict[str, list[str | None]] = {}
    other: list[str] = []
    for key in sorted(keys):
        if key.endswith(_A_SUFFIX):
            pairs.setdefault(key[: -len(_A_SUFFIX)], [None, None])[0] = key
        elif key.endswith(_B_SUFFIX):
            pairs.setdefault(key[: -len(_B_SUFFIX)], [None, None])[1] = key
        elif ".lora_" in key:
            raise AdapterError(
                f"tensor {key!r} is a LoRA variant uniflow does not aggregate (only lora_A/lora_B of linear layers)",
                fix="train plain LoRA adapters (no DoRA, no LoRA on embeddings)",
            )
        else:
            other.append(key)
    return {m: (ab[0], ab[1]) for m, ab in pairs.items()}, other


def lora_key(module: str, which: str) -> str:
    return module + (_A_SUFFIX if which == "A" else _B_SUFFIX)


def base_weight_key(module: str) -> str:
    """The base model's state-dict key of the weight a LoRA module adapts (for FedEx residuals)."""
    name = module[len(PEFT_PREFIX) :] if module.startswith(PEFT_PREFIX) else module
    return name + ".weight"


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    # Same matching rule as PEFT: a pattern matches a module name that ends with it at a dot boundary.
    name = module[len(PEFT_PREFIX) :] if module.startswith(PEFT_PREFIX) else module
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def lora_scaling(peft_config: Mapping[str, Any], module: str, rank: int) -> float:
    """PEFT's scaling of one LoRA module: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
    alpha = float(_pattern_value(peft_config.get("alpha_pattern") or {}, module, peft_config.get("lora_alpha", 8)))
    if peft_config.get("use_rslora"):
        return alpha / math.sqrt(rank)
    return alpha / rank


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------
def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"{path} is missing", fix=f"{what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path} is not valid JSON ({exc})", fix=f"{what}") from None


def _check_peft_config(config: Any, path: Path) -> dict[str, Any]:
    if not isinstance(config, dict):
        raise AdapterError(f"{path} does not hold a JSON object", fix="re-save the adapter with PEFT or uniflow")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(
            f"{path}: peft_type={config.get('peft_type')!r} is not LORA", fix="uniflow aggregates LoRA adapters only"
        )
    if config.get("use_dora"):
        raise AdapterError(f"{path}: use_dora=true is not supported", fix="train plain LoRA (use_dora=false)")
    r = config.get("r")
    if not isinstance(r, int) or r < 1:
        raise AdapterError(f"{path}: r={r!r} must be a positive integer", fix="re-save the adapter with a valid LoraConfig")
    return config


# --------------------------------------------------------------------------------------------------
# Reading safetensors without mmap
# --------------------------------------------------------------------------------------------------
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
           "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """A safetensors file read tensor by tensor with ``pread`` (no mmap).

    The library's mmap-based reader leaves every page it touched resident, so streaming K large client
    adapters through it costs K adapters of RSS; plain reads cost one tensor at a time. The header is
    validated up front (JSON, dtypes, offsets inside the file and consistent with the shapes), so a
    truncated or corrupt file is refused before any math.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            size = os.fstat(self._fd).st_size
            head = os.pread(self._fd, 8, 0)
            if len(head) != 8:
                raise ValueError("file shorter than its 8-byte header length")
            n = int.from_bytes(head, "little")
            if n <= 0 or n > _MAX_HEADER or 8 + n > size:
                raise ValueError(f"header length {n} does not fit the file ({size} bytes)")
            header = json.loads(os.pread(self._fd, n, 8))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
            self.metadata = header.pop("__metadata__", None)
            data_size = size - 8 - n
            self._entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
            for key, info in header.items():
                dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
                if dtype not in _DTYPES:
                    raise ValueError(f"tensor {key!r} has unsupported dtype {dtype}")
                numel = math.prod(shape)
                if not (0 <= begin <= end <= data_size) or end - begin != numel * _ITEMSIZE[dtype]:
                    raise ValueError(f"tensor {key!r} lies outside the file or has the wrong size (truncated file?)")
                self._entries[key] = (dtype, shape, 8 + n + begin, end - begin)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            os.close(self._fd)
            raise ValueError(str(exc)) from None

    def keys(self) -> list[str]:
        return sorted(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def dtype(self, key: str) -> str:
        return self._entries[key][0]

    def get(self, key: str) -> Any:
        import torch

        dtype, shape, offset, length = self._entries[key]
        buf = bytearray(length)
        view, done = memoryview(buf), 0
        while done < length:
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got <= 0:
                raise ValueError(f"tensor {key!r}: unexpected end of file")
            done += got
        if length == 0:
            return torch.empty(shape, dtype=getattr(torch, _DTYPES[dtype]))
        return torch.frombuffer(buf, dtype=getattr(torch, _DTYPES[dtype])).reshape(shape)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:  # readers are short-lived; close the descriptor with them
        try:
            self.close()
        except OSError:
            pass


class AdapterReader(Mapping):
    """A lazily read adapter directory: metadata up front, tensors on demand (``reader[key]``).

    Opening validates the whole directory (config, metadata, checksum) before any math runs.
    Tensors are read one at a time from the safetensors file, so K large client adapters can be
    aggregated layer by layer without holding them all in memory.
    """

    def __init__(self, path: Path, *, verify: bool = True) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise AdapterError(f"adapter {self.path} does not exist or is not a directory", fix="check the path")
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
                f"{tensors_path} is not a readable safetensors file ({exc})", fix="the file is truncated or corrupt; re-publish it"
            ) from None
        self.residual_path = self.path / RESIDUAL_FILE
        if self.residual_path.exists() and verify and self.meta is not None and self.meta.residual_sha256:
            if file_sha256(self.residual_path) != self.meta.residual_sha256:
                raise AdapterError(
                    f"{self.residual_path} does not match its sha256 in uniflow.json", fix="re-publish the adapter"
                )
        self.modules, self.other_keys = lora_modules(self._keys)

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
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(self.residual_path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise AdapterError(f"{self.residual_path} is not readable ({exc})", fix="re-publish the adapter") from None

    @property
    def label(self) -> str:
        """How this adapter is named in messages and reports."""
        if self.meta is not None and self.meta.client_id is not None:
            return f"client {self.meta.client_id} ({self.path})"
        return str(self.path)


def open_adapter(path: Path, *, verify: bool = True) -> AdapterReader:
    return AdapterReader(Path(path), verify=verify)


def read_adapter(path: Path, *, verify: bool = True) -> LoadedAdapter:
    reader = open_adapter(path, verify=verify)
    tensors = {key: reader[key] for key in reader}
    return LoadedAdapter(reader.path, reader.peft_config, tensors, reader.meta, reader.read_residual())


def scan_adapter_dirs(parent: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Valid adapter directories directly below ``parent`` and the rejected ones with the reason.

    Hidden (dot-prefixed) directories are unfinished publishes and skipped silently.
    """
    valid: list[Path] = []
    rejected: list[tuple[Path, str]] = []
    if not Path(parent).is_dir():
        return valid, rejected
    for entry in sorted(Path(parent).iterdir()):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        if not (entry / META_FILE).exists():
            rejected.append((entry, "no uniflow.json (incomplete drop)"))
            continue
        try:
            open_adapter(entry)
        except AdapterError as exc:
            rejected.append((entry, str(exc)))
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
) -> Path:
    """Publish an adapter directory atomically; returns its path. Never overwrites unless ``force``."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    config = _check_peft_config(_jsonable(dict(peft_config)), out_dir / CONFIG_FILE)
    config.setdefault("peft_type", "LORA")
    payload = _contiguous(tensors)
    if not payload:
        raise AdapterError("refusing to publish an adapter with no tensors", fix="check which tensors the method shares")
    residual_payload = _contiguous(residual) if residual else None
    with publish_dir(out_dir, force=force) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        save_file(payload, str(tmp / TENSORS_FILE), metadata={"format": "pt"})
        meta_out = AdapterMeta(**{**meta.to_json(), "sha256": file_sha256(tmp / TENSORS_FILE), "created": _created()})
        if residual_payload:
            save_file(residual_payload, str(tmp / RESIDUAL_FILE), metadata={"format": "pt"})
            meta_out.residual_sha256 = file_sha256(tmp / RESIDUAL_FILE)
        else:
            meta_out.residual_sha256 = None
        (tmp / META_FILE).write_text(
            json.dumps(_jsonable(meta_out.to_json()), indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
    return out_dir


def describe_adapter(path: Path) -> dict[str, Any]:
    """Everything ``uniflow inspect`` shows: metadata, and per LoRA module its rank, shapes, dtype and norms.

    ``delta_norm`` is ‖s·B·A‖_F, computed from r×r Gram matrices (no d_out × d_in product).
    """
    import torch

    reader = open_adapter(path)
    layers = []
    for module, (a_key, b_key) in sorted(reader.modules.items()):
        entry: dict[str, Any] = {"module": module}
        A = reader[a_key].to(torch.float64) if a_key else None
        B = reader[b_key].to(torch.float64) if b_key else None
        rank = A.shape[0] if A is not None else B.shape[1]  # type: ignore[union-attr]
        entry["rank"] = rank
        entry["dtype"] = reader.dtype(a_key or b_key)  # type: ignore[arg-type]
        entry["A_shape"] = list(A.shape) if A is not None else None
        entry["B_shape"] = list(B.shape) if B is not None else None
        entry["A_norm"] = float(A.norm()) if A is not None else None
        entry["B_norm"] = float(B.norm()) if B is not None else None
        if A is not None and B is not None:
            scale = lora_scaling(reader.peft_config, module, rank)
            entry["delta_norm"] = scale * math.sqrt(max(float(((B.T @ B) * (A @ A.T)).sum()), 0.0))
        else:
            entry["delta_norm"] = None
        layers.append(entry)
    others = [{"key": k, "shape": list(reader.shape(k)), "dtype": reader.dtype(k)} for k in reader.other_keys]
    residual_bytes = reader.residual_path.stat().st_size if reader.residual_path.exists() else 0
    return {
        "path": str(reader.path),
        "meta": reader.meta.to_json() if reader.meta is not None else None,
        "peft": {k: reader.peft_config.get(k) for k in ("r", "lora_alpha", "use_rslora", "target_modules", "modules_to_save")},
        "layers": layers,
        "other_tensors": others,
        "tensor_bytes": reader.nbytes(),
        "residual_bytes": residual_bytes,
    }
