"""safetensors files read with ``pread``, validated as strictly as the safetensors library, and their sha256.

The adapter format (:mod:`uniflow_cli.adapters`) reads every tensors file through :class:`SafetensorsFile`:
no mmap (K streamed client adapters must not stay resident), and a header checked before any byte of data
is trusted. Nothing here knows about adapter directories; torch is imported only to build a tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from uniflow_cli.paths import open_regular


def is_int_in(value: Any, low: int, high: int) -> bool:
    """``value`` is an int (not a bool) in ``[low, high]``: the check for counts read from untrusted JSON."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr`` of an untrusted value, cut short (a 10**400 or a 1 MB string must not flood the message)."""
    try:
        text = repr(value)
    except ValueError:  # ints beyond Python's str conversion limit
        text = f"<{type(value).__name__} too large to print>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def file_sha256(path: Path) -> str:
    """The hex sha256 of a regular file, read in 4 MiB chunks."""
    # open_regular: a FIFO in place of the tensors file must not block the server.
    digest = hashlib.sha256()
    with os.fdopen(open_regular(Path(path), follow=True), "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


# The dtypes an adapter tensor may have: LoRA factors and projector weights are float (an I32 header would be
# fused as if its integers were weights).
FLOAT_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
FLOAT_NAMES = "F16, BF16, F32 or F64"
_MAX_HEADER = 100_000_000  # the safetensors library's MAX_HEADER_SIZE (~95 MiB): never accept what it refuses
_MAX_USIZE = 2**64 - 1  # the library reads shapes and offsets as usize
_INFO_KEYS = ("data_offsets", "dtype", "shape")


def _header_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of repeated keys and accepts lone surrogates ("\ud800"). The library's serde_json
    # refuses surrogates and repeated fields but keeps the last repeated tensor name: an ambiguous header either way.
    obj: dict[str, Any] = {}
    for key, value in pairs:
        for text in (key, value) if isinstance(value, str) else (key,):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"header holds the string {short_repr(text)}, which is not valid Unicode") from None
        if key in obj:
            raise ValueError(f"header repeats the key {short_repr(key)}")
        obj[key] = value
    return obj


def _header_int(text: str) -> int | float:
    # serde_json reads "-0" as the float -0.0 (refused as a size); Python would read it as the int 0.
    if text == "-0":
        return -0.0
    try:
        return int(text)
    except ValueError:  # longer than Python's int-parsing limit (4300 digits)
        raise ValueError(f"header holds the number {text[:20]}… with {len(text)} digits") from None


def _parse_header(raw: bytearray) -> dict[str, Any]:
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_header_object, parse_int=_header_int)
    except UnicodeDecodeError as exc:
        raise ValueError(f"header is not valid UTF-8 ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"header is not valid JSON ({exc})") from None
    except RecursionError:
        raise ValueError("header JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise ValueError(f"header is a JSON {type(header).__name__}, not an object")
    return header


def _pop_metadata(header: dict[str, Any]) -> dict[str, str] | None:
    if "__metadata__" not in header:
        return None
    metadata = header.pop("__metadata__")
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"__metadata__ must map strings to strings, not {short_repr(metadata)}")
    return metadata


def _tensor_entry(key: str, info: Any, data_size: int) -> tuple[str, tuple[int, ...], int, int]:
    """``(dtype, shape, begin, end)`` of one header entry, checked against the data section's size."""
    name = short_repr(key)
    if not isinstance(info, dict) or tuple(sorted(info)) != _INFO_KEYS:
        got = f"the keys {short_repr(sorted(info))}" if isinstance(info, dict) else short_repr(info)
        raise ValueError(f"tensor {name} must be an object with exactly the keys dtype, shape and data_offsets, not {got}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in FLOAT_DTYPES:
        raise ValueError(f"tensor {name} has dtype {short_repr(dtype)}; adapter tensors must be float ({FLOAT_NAMES})")
    if not isinstance(shape, list) or not shape or not all(is_int_in(d, 1, _MAX_USIZE) for d in shape):
        raise ValueError(f"tensor {name} has shape {short_repr(shape)}; it must be a non-empty list of integers >= 1")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(is_int_in(o, 0, _MAX_USIZE) for o in offsets)
            or offsets[0] > offsets[1]):
        raise ValueError(f"tensor {name} has data_offsets {short_repr(offsets)}; they must be two integers 0 <= begin <= end")
    begin, end = offsets
    if end > data_size:
        raise ValueError(
            f"tensor {name} lies outside the file or has the wrong size: it ends at byte {end} of a "
            f"{data_size}-byte data section (truncated file?)"
        )
    need = _ITEMSIZE[dtype]
    for dim in shape:  # stop early: a crafted shape may multiply to a huge number
        need *= dim
        if need > data_size:
            raise ValueError(
                f"tensor {name} lies outside the file or has the wrong size: shape {short_repr(shape)} of {dtype} needs "
                f"more than the {data_size}-byte data section"
            )
    if end - begin != need:
        raise ValueError(
            f"tensor {name} lies outside the file or has the wrong size: data_offsets {offsets} hold "
            f"{end - begin} bytes, shape {short_repr(shape)} of {dtype} needs {need}"
        )
    return dtype, tuple(shape), begin, end


def _check_tiling(entries: dict[str, tuple[str, tuple[int, ...], int, int]], data_size: int) -> None:
    # The library's rule: sorted by offset, the tensors cover the data section exactly, from byte 0 to the end.
    cursor = 0
    for key, (_, _, begin, end) in sorted(entries.items(), key=lambda item: item[1][2:]):
        if begin > cursor:
            raise ValueError(f"bytes {cursor}..{begin} of the data section belong to no tensor (a hole before {short_repr(key)})")
        if begin < cursor:
            raise ValueError(f"tensor {short_repr(key)} overlaps the tensor before it (it starts at byte {begin}, before {cursor})")
        cursor = end
    if cursor != data_size:
        raise ValueError(f"the data section has {data_size - cursor} trailing bytes after the last tensor")


class SafetensorsFile:
    """The tensors file of an adapter, read tensor by tensor with ``pread`` (no mmap).

    The library's mmap-based reader leaves every page it touched resident, so streaming K large client
    adapters through it costs K adapters of RSS; plain reads cost one tensor at a time. The header is
    validated up front with the library's rules (UTF-8 JSON without repeated keys, exact entry keys, offsets
    tiling the data section to the end of the file, sizes consistent with the shapes) and the adapter's own
    (float dtypes, at least 1-D, no empty dimension), so a truncated, corrupt or crafted file is refused
    with a ValueError before any math; anything accepted here the library reads identically.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd = -1  # so that close() and __del__ work when open() fails
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self._entries = self._read_header()
        except BaseException:
            self.close()
            raise

    def _pread(self, length: int, offset: int) -> bytearray:
        buf = bytearray(length)
        view, done = memoryview(buf), 0
        while done < length:
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got <= 0:
                raise ValueError(f"unexpected end of file at byte {offset + done}")
            done += got
        return buf

    def _read_header(self) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
        size = os.fstat(self._fd).st_size
        if size < 8:
            raise ValueError("file shorter than its 8-byte header length")
        n = int.from_bytes(self._pread(8, 0), "little")
        if n == 0 or n > _MAX_HEADER or 8 + n > size:
            raise ValueError(f"header length {n} does not fit the file ({size} bytes, header limit {_MAX_HEADER})")
        header = _parse_header(self._pread(n, 8))
        self.metadata = _pop_metadata(header)
        if not header:
            raise ValueError("header declares no tensors")
        data_size = size - 8 - n
        entries = {key: _tensor_entry(key, info, data_size) for key, info in header.items()}
        _check_tiling(entries, data_size)
        return {key: (dtype, shape, 8 + n + begin, end - begin) for key, (dtype, shape, begin, end) in entries.items()}

    def keys(self) -> list[str]:
        return sorted(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def dtype(self, key: str) -> str:
        return self._entries[key][0]

    def get(self, key: str) -> Any:
        import torch

        dtype, shape, offset, length = self._entries[key]
        try:
            buf = self._pread(length, offset)
        except ValueError as exc:  # the file shrank after it was opened
            raise ValueError(f"tensor {short_repr(key)}: {exc}") from None
        return torch.frombuffer(buf, dtype=getattr(torch, FLOAT_DTYPES[dtype])).reshape(shape)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:  # readers are short-lived; close the descriptor with them
        try:
            self.close()
        except OSError:
            pass
