"""Where and how a model computes: the device, the precision and the CPU threads.

One helper per choice, shared by ``uniflow local-train``, ``uniflow evaluate`` and the Flower ClientApp:

* :func:`resolve_device` — ``auto | cpu | cuda | cuda:N | mps`` → a ``torch.device`` that exists here;
* :data:`PRECISIONS`, :func:`precision_dtype`, :func:`check_precision`, :func:`autocast` — ``fp32 | bf16 |
  fp16``: the dtype the frozen base is loaded in and the autocast the forward/backward runs under (LoRA
  weights, projectors and the optimizer state stay float32);
* :func:`math_mode` / :func:`place` — on a CPU without bf16 kernels, bf16 is storage only and the math
  runs in float32 (:mod:`uniflow_cli.models.upcast`): half the memory without the slow kernels;
* :func:`to_device` — a collated batch (nested dicts/lists of tensors) on the device;
* :func:`default_threads` / :func:`set_threads` — torch's intra-op threads: ``$UNIFLOW_THREADS``, else
  ``$OMP_NUM_THREADS``, else the physical cores this process may use (never more: several clients on one
  machine must not oversubscribe it).

Determinism: the same inputs, seed, device, precision and thread count give the same bytes; change any of
them and the float sums run in another order (docs/federation.md). Errors are in library terms
(``ConfigError.invalid("device", ...)``), which the CLI words as its flag and Flower as its run-config key.
Torch is imported inside the functions: importing this module is cheap (the CLI's ``--help`` imports it).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from uniflow_cli.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
THREADS_ENV = "UNIFLOW_THREADS"
#: How bf16 computes on a CPU: ``native`` (bf16 kernels under autocast), ``upcast`` (bf16 storage, float32
#: math; :mod:`uniflow_cli.models.upcast`) or ``auto`` (native where the CPU has AVX-512 BF16 / AMX).
BF16_MATH_ENV = "UNIFLOW_BF16_MATH"
MATH_MODES = ("auto", "native", "upcast")


# --------------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------------
def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def _cuda_missing(name: str, index: int | None) -> ConfigError | None:
    """Why ``cuda[:index]`` cannot be used here (None: it can)."""
    import torch

    if torch.version.cuda is None:
        return ConfigError.invalid("device", name, f"is not available: this torch {torch.__version__} is built without CUDA", example="auto")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        why = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        return ConfigError.invalid("device", name, f"is not available: no CUDA device is visible{why}", example="auto")
    if index is not None and index >= count:
        return ConfigError.invalid("device", name, f"is not available: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}",
                                   example="cuda:0")
    return None


def resolve_device(name: Any = "auto") -> Any:
    """The ``torch.device`` that ``name`` (``auto | cpu | cuda | cuda:N | mps``, or a ``torch.device``) names.

    ``auto`` is CUDA when a device is visible, else MPS (Apple silicon), else the CPU. A name that is no
    device, or a device this machine lacks, is a ConfigError in one line (field ``device``)."""
    import torch

    text = str(name).strip().lower()
    kind, sep, index_text = text.partition(":")
    if text == "auto":
        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if kind == "cuda" and (not sep or index_text.isdigit()):
        index = int(index_text) if sep else None
        missing = _cuda_missing(str(name), index)
        if missing is not None:
            raise missing
        return torch.device("cuda", torch.cuda.current_device() if index is None else index)
    if text in ("mps", "mps:0"):
        if not _mps_available():
            raise ConfigError.invalid("device", str(name), "is not available: MPS needs Apple silicon, macOS 12.3+ and a torch built with it",
                                      example="auto")
        return torch.device("mps")
    raise ConfigError.invalid("device", str(name), f"is not one of {', '.join(DEVICES)}", example="auto")


# --------------------------------------------------------------------------------------------------
# Precision
# --------------------------------------------------------------------------------------------------
def check_precision_name(precision: Any) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else a ConfigError (field ``precision``). Torch-free."""
    if precision not in PRECISIONS:
        raise ConfigError.invalid("precision", precision, f"is not one of {', '.join(PRECISIONS)}", example="fp32")
    return precision


QUANTIZE = ("nf4", "int8")


def check_quantize_name(scheme: Any) -> str | None:
    """``scheme`` (None, ``nf4`` or ``int8``: :mod:`uniflow_cli.models.quantize`), else a ConfigError
    (field ``quantize``). Torch-free."""
    if scheme is not None and scheme not in QUANTIZE:
        raise ConfigError.invalid("quantize", scheme, f"is not one of {', '.join(QUANTIZE)}", example="nf4")
    return scheme


def precision_dtype(precision: str) -> Any:
    """The torch dtype of ``fp32 | bf16 | fp16`` (the dtype the frozen base is loaded in)."""
    import torch

    return getattr(torch, _DTYPE_NAMES[check_precision_name(precision)])


def check_precision(precision: str, device: Any) -> None:
    """``precision`` runs on ``device``, else one line: fp16 only on CUDA (it needs the grad scaler and the
    GPU's half kernels), bf16 where the device has it (CPUs always; CUDA from compute capability 8.0)."""
    import torch

    check_precision_name(precision)
    device = resolve_device(device) if not isinstance(device, torch.device) else device
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError.invalid("precision", precision, f"needs a CUDA device (this run computes on {device}); on the CPU use bf16",
                                  example="bf16")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device)
        raise ConfigError.invalid("precision", precision, f"is not supported by {device} ({name}: compute capability < 8.0)", example="fp16")
    if precision == "bf16" and device.type == "mps":
        try:
            torch.ones(1, dtype=torch.bfloat16, device=device) @ torch.ones(1, dtype=torch.bfloat16, device=device)
        except (RuntimeError, TypeError) as exc:  # older macOS: MPS has no bfloat16
            raise ConfigError.invalid("precision", precision, f"is not supported on {device} ({str(exc).splitlines()[0]})",
                                      example="fp32") from None


def _cpu_has_bf16_kernels() -> bool:
    import torch

    try:  # oneDNN's own probe (AVX-512 BF16 or AMX); private, hence the guard
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def math_mode(device: Any, precision: str) -> str:
    """How ``precision`` computes on ``device``: ``native`` (its own kernels under autocast) or ``upcast``
    (weights stored in bf16, every matmul in float32: a CPU without bf16 kernels, where bf16 math is several
    times slower than float32). fp32, CUDA and MPS are always native; ``$UNIFLOW_BF16_MATH`` forces a CPU choice."""
    import torch

    if check_precision_name(precision) == "fp32":
        return "native"
    device_type = device.type if isinstance(device, torch.device) else torch.device(str(device)).type
    if device_type != "cpu":
        return "native"
    forced = os.environ.get(BF16_MATH_ENV, "auto").strip().lower() or "auto"
    if forced not in MATH_MODES:
        raise ConfigError.invalid(BF16_MATH_ENV, forced, f"is not one of {', '.join(MATH_MODES)}", example="auto")
    if forced != "auto":
        return forced
    return "native" if _cpu_has_bf16_kernels() else "upcast"


def compute_dtype(device: Any, precision: str) -> Any:
    """The dtype the matmuls run in: ``precision``'s where its :func:`math_mode` is native, else float32."""
    import torch

    return precision_dtype(precision) if math_mode(device, precision) == "native" else torch.float32


def place(model: Any, device: Any, precision: str) -> str:
    """Move ``model`` to ``device`` and set it up to compute in ``precision``; returns :func:`math_mode`.
    In ``upcast`` mode the frozen low-precision modules are rewired to float32 math (idempotent)."""
    model.to(device)
    mode = math_mode(device, precision)
    if mode == "upcast":
        from uniflow_cli.models.upcast import upcast_frozen

        upcast_frozen(model)
    return mode


def autocast(device: Any, precision: str) -> Any:
    """The context the forward/backward runs under: ``torch.autocast`` in ``precision``'s dtype (fp32, and
    bf16 in ``upcast`` :func:`math_mode`: none).

    Under it the bf16/fp16 base and the float32 LoRA/projector weights meet in the low precision inside
    each matmul, while the weights themselves (and their gradients) keep their own dtypes."""
    import torch

    if check_precision_name(precision) == "fp32" or math_mode(device, precision) == "upcast":
        return contextlib.nullcontext()
    device_type = device.type if isinstance(device, torch.device) else torch.device(str(device)).type
    return torch.autocast(device_type=device_type, dtype=precision_dtype(precision))


def grad_scaler(device: Any, precision: str) -> Any:
    """fp16 on CUDA: a ``torch.amp.GradScaler`` (fp16 gradients underflow without loss scaling); else None."""
    import torch

    device_type = device.type if isinstance(device, torch.device) else torch.device(str(device)).type
    return torch.amp.GradScaler(device_type) if precision == "fp16" and device_type == "cuda" else None


def to_device(batch: Any, device: Any) -> Any:
    """``batch`` with every tensor on ``device``, recursively through dicts, lists and tuples (the rest as is)."""
    import torch

    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def module_device(model: Any) -> Any:
    """The device of ``model``'s first parameter (the CPU for a model without parameters)."""
    import torch

    return next((p.device for p in model.parameters()), torch.device("cpu"))


# --------------------------------------------------------------------------------------------------
# Threads
# --------------------------------------------------------------------------------------------------
def _cgroup_cpus() -> int | None:
    """The CPUs a cgroup-v2 quota grants (``cpu.max`` "200000 100000" → 2), None without a quota."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, -(-int(quota) // int(period)))  # rounded up: 1.5 CPUs of quota still run 2 threads well
    except (ValueError, ZeroDivisionError):
        return None


def available_cores() -> int:
    """The physical cores this process may run on: its CPU affinity with hyperthread siblings counted once
    (matmul threads on two siblings of one core only contend), capped by a cgroup CPU quota."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1
    cores: set[str] = set()
    for cpu in cpus:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:  # no sysfs topology (some containers): count logical CPUs
            cores = {str(c) for c in cpus}
            break
    count = max(1, len(cores))
    quota = _cgroup_cpus()
    return min(count, quota) if quota is not None else count


def _count(raw: str) -> int | None:
    try:
        value = int(raw)
    except ValueError:
        return None
    return value if value >= 1 else None


def default_threads() -> int:
    """``$UNIFLOW_THREADS``, else ``$OMP_NUM_THREADS`` (the standard knob, which torch reads too), else
    :func:`available_cores`. A bad ``$UNIFLOW_THREADS`` is one line naming it; a bad ``$OMP_NUM_THREADS``
    is not ours to refuse (OpenMP's own syntax allows "4,2": its first level counts) and is passed over."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if raw:
        value = _count(raw)
        if value is None:
            raise ConfigError(f"{THREADS_ENV}={raw!r} is not a whole number >= 1", fix=f"set {THREADS_ENV}=1 (or more), or unset it for the default")
        return value
    omp = _count(os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip())
    return omp if omp is not None else available_cores()


def set_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads to ``threads`` (None: :func:`default_threads`); returns the count.

    ``torch.set_num_threads`` only: the inter-op pool is left alone (uniflow runs no parallel ops). A count
    below 1 is a ConfigError (field ``threads``), not torch's RuntimeError."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError.invalid("threads", threads, "must be >= 1", example=1)
    count = default_threads() if threads is None else threads
    import torch

    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count


__all__ = ["DEVICES", "PRECISIONS", "THREADS_ENV", "autocast", "available_cores", "check_precision", "check_precision_name",
           "default_threads", "grad_scaler", "module_device", "precision_dtype", "resolve_device", "set_threads", "to_device"]
