"""The adapter tensors reader is at least as strict as the safetensors library: explicit rules, then a fuzz test.

Whatever ``SafetensorsFile`` accepts, ``safetensors.torch.load_file`` must accept and read identically; on
top of the library's rules an adapter's tensors are float, at least 1-D and have no empty dimension.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save, save_file
from typer.testing import CliRunner

from uniflow_cli.adapters import META_FILE, RESIDUAL_FILE, TENSORS_FILE, open_adapter
from uniflow_cli.cli.app import app
from uniflow_cli.errors import AdapterError
from uniflow_cli.safetensors_io import SafetensorsFile, file_sha256
from tests.lora_factory import lora_tensors, write_client

A, B = "base_model.model.x.lora_A.weight", "base_model.model.x.lora_B.weight"
# Two float32 tensors of 16 bytes each: a = bytes 0..16, b = bytes 16..32 of the data section.
DATA = bytes(range(32))


def frame(header: dict | str | bytes, data: bytes = DATA, *, length: int | None = None) -> bytes:
    """A safetensors file: little-endian u64 header length, header bytes, data."""
    text = header if isinstance(header, (str, bytes)) else json.dumps(header)
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def f32(shape: list, begin: int, end: int) -> dict:
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


def header(**changes) -> dict:
    """The valid two-tensor header, with entries of ``a`` replaced or removed (value None)."""
    h = {"__metadata__": {"format": "pt"},
         "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
         "b": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}
    for key, value in changes.items():
        if value is None:
            del h["a"][key]
        else:
            h["a"][key] = value
    return h


def library(path: Path) -> dict | None:
    try:
        return load_file(str(path))
    except Exception:  # noqa: BLE001 - any refusal counts; the library raises several types
        return None


def ours(path: Path) -> dict:
    handle = SafetensorsFile(path)
    try:
        return {key: handle.get(key) for key in handle.keys()}
    finally:
        handle.close()


def same_tensors(got: dict, want: dict) -> bool:
    # Compare bytes, not values: a flipped byte may make a NaN, which is never equal to itself.
    return sorted(got) == sorted(want) and all(
        got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
        and torch.equal(got[k].contiguous().view(torch.uint8), want[k].contiguous().view(torch.uint8))
        for k in got
    )


# -------------------------------------------------------------------------------------- accepted files
@pytest.mark.parametrize("raw", [
    frame(header()),
    frame(header(dtype="F16", shape=[8])),
    frame(header(dtype="BF16", shape=[2, 1, 4])),
    frame(header(dtype="F64", shape=[2])),
    frame({"b": header()["b"], "a": header()["a"]}),  # any key order; no __metadata__
    frame(json.dumps(header()) + " " * 7),  # the writer pads the header to 8 bytes with spaces
    frame(" \n" + json.dumps(header())),
    frame(json.dumps(header()).replace('"a"', '"\\u00e9\\ud83d\\ude00"')),  # escaped non-ASCII name, surrogate pair
    frame({"a": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]},  # offsets need not follow the key order
           "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}),
], ids=["f32", "f16", "bf16-3d", "f64", "no-metadata", "padded", "leading-space", "unicode-name", "reordered"])
def test_accepts_what_the_library_reads_identically(tmp_path, raw):
    (tmp_path / "x").write_bytes(raw)
    want = library(tmp_path / "x")
    assert want is not None and same_tensors(ours(tmp_path / "x"), want)


def test_reads_a_real_adapter_file_like_the_library(tmp_path):
    save_file(lora_tensors(0, dtype=torch.float32), str(tmp_path / "x"), metadata={"format": "pt"})
    assert same_tensors(ours(tmp_path / "x"), load_file(str(tmp_path / "x")))


# -------------------------------------------------------------------------------------- refused files
# (raw bytes, our message, does the library refuse too?) - where it does not, uniflow is stricter on purpose.
BAD_FILES = {
    # dtypes: adapter tensors are float
    "int32": (frame(header(dtype="I32")), r"tensor 'a' has dtype 'I32'; adapter tensors must be float", False),
    "int64": (frame(header(dtype="I64", shape=[2])), r"tensor 'a' has dtype 'I64'", False),
    "bool": (frame(header(dtype="BOOL", shape=[16])), r"tensor 'a' has dtype 'BOOL'", False),
    "uint8": (frame(header(dtype="U8", shape=[4, 4])), r"tensor 'a' has dtype 'U8'", False),
    "float8": (frame(header(dtype="F8_E4M3", shape=[16])), r"tensor 'a' has dtype 'F8_E4M3'", False),
    "lowercase": (frame(header(dtype="f32")), r"tensor 'a' has dtype 'f32'", True),
    "dtype-number": (frame(header(dtype=4)), r"tensor 'a' has dtype 4", True),
    "dtype-list": (frame(header(dtype=["F32"])), r"tensor 'a' has dtype \['F32'\]", True),
    # shapes: positive Python ints, at least 1-D
    "negative-dim": (frame(header(shape=[-2, -2])), r"tensor 'a' has shape \[-2, -2\]; it must be a non-empty list of integers >= 1", True),
    "zero-dim": (frame({"a": f32([0, 4], 0, 0), "b": f32([4], 0, 16)}, DATA[:16]), r"tensor 'a' has shape \[0, 4\]", False),
    "rank-0": (frame({"a": f32([], 0, 4), "b": f32([3], 4, 16)}, DATA[:16]), r"tensor 'a' has shape \[\]", False),
    "float-dim": (frame(json.dumps(header()).replace("[2, 2]", "[2.0, 2]")), r"has shape \[2.0, 2\]", True),
    "exponent-dim": (frame(json.dumps(header()).replace("[2, 2]", "[2e0, 2]")), r"has shape \[2.0, 2\]", True),
    "string-dim": (frame(header(shape=["2", 2])), r"has shape \['2', 2\]", True),
    "bool-dim": (frame(header(shape=[True, 4])), r"has shape \[True, 4\]", True),
    "nan-dim": (frame(json.dumps(header()).replace("[2, 2]", "[NaN, 2]")), r"has shape \[nan, 2\]", True),
    "huge-dim": (frame(header(shape=[2**64, 1])), r"has shape \[18446744073709551616, 1\]", True),
    "shape-not-list": (frame(header(shape=4)), r"has shape 4", True),
    "shape-product": (frame(header(shape=[2**32, 2**32])), r"needs more than the 32-byte data section", True),
    # data_offsets: two ints, begin <= end, size = numel * itemsize
    "three-offsets": (frame(header(data_offsets=[0, 16, 16])), r"has data_offsets \[0, 16, 16\]; they must be two integers", True),
    "one-offset": (frame(header(data_offsets=[16])), r"has data_offsets \[16\]", True),
    "bool-offset": (frame(header(data_offsets=[False, 16])), r"has data_offsets \[False, 16\]", True),
    "minus-zero": (frame(json.dumps(header()).replace("[0, 16]", "[-0, 16]")), r"has data_offsets \[-0.0, 16\]", True),
    "negative-offset": (frame(header(data_offsets=[-16, 0])), r"has data_offsets \[-16, 0\]", True),
    "float-offset": (frame(json.dumps(header()).replace("[0, 16]", "[0, 16.0]")), r"has data_offsets \[0, 16.0\]", True),
    "begin-after-end": (frame(header(data_offsets=[16, 0])), r"0 <= begin <= end", True),
    "offsets-object": (frame(header(data_offsets={"begin": 0, "end": 16})), r"has data_offsets \{", True),
    "wrong-size": (frame(header(data_offsets=[0, 12])), r"data_offsets \[0, 12\] hold 12 bytes, shape \[2, 2\] of F32 needs 16", True),
    "past-the-end": (frame(header(data_offsets=[16, 48], shape=[8])), r"ends at byte 48 of a 32-byte data section", True),
    # tiling: contiguous from 0 to the end of the file
    "overlap": (frame({"a": f32([4], 0, 16), "b": f32([4], 8, 24)}, DATA[:24]), r"tensor 'b' overlaps the tensor before it \(it starts at byte 8, before 16\)", True),
    "hole-at-start": (frame({"a": header()["b"]}), r"bytes 0..16 of the data section belong to no tensor", True),
    "hole-between": (frame({"a": f32([4], 0, 16), "b": f32([4], 24, 40)}, DATA + bytes(8)), r"bytes 16..24 of the data section belong to no tensor", True),
    "trailing-bytes": (frame(header(), DATA + b"\0"), r"the data section has 1 trailing bytes", True),
    "same-offsets": (frame({"a": f32([4], 0, 16), "b": f32([4], 0, 16)}, DATA[:16]), r"tensor 'b' overlaps", True),
    # entry objects
    "extra-key": (frame(header(extra=1)), r"tensor 'a' must be an object with exactly the keys dtype, shape and data_offsets, not the keys \['data_offsets', 'dtype', 'extra', 'shape'\]", False),
    "missing-key": (frame(header(shape=None)), r"not the keys \['data_offsets', 'dtype'\]", True),
    "entry-null": (frame({"a": None, "b": header()["b"]}), r"tensor 'a' must be an object .* not None", True),
    "repeated-field": (frame(json.dumps(header()).replace('"dtype": "F32"', '"dtype": "F32", "dtype": "F32"', 1)), r"header repeats the key 'dtype'", True),
    "repeated-tensor": (frame(json.dumps(header())[:-1] + ', "b": {"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 32]}}'), r"header repeats the key 'b'", False),
    "no-tensors": (frame({"__metadata__": {}}, b""), r"header declares no tensors", False),
    # __metadata__: a str -> str map
    "metadata-int": (frame({**header(), "__metadata__": {"format": 1}}), r"__metadata__ must map strings to strings, not \{'format': 1\}", True),
    "metadata-list": (frame({**header(), "__metadata__": ["pt"]}), r"__metadata__ must map strings to strings", True),
    "metadata-null": (frame({**header(), "__metadata__": None}), r"__metadata__ must map strings to strings, not None", False),
    "metadata-repeated": (frame(json.dumps(header()).replace('{"format": "pt"}', '{"format": "pt", "format": "np"}')), r"header repeats the key 'format'", False),
    # the header as text
    "lone-surrogate": (frame(json.dumps(header()).replace('"a"', '"\\ud800"')), r"header holds the string '\\ud800', which is not valid Unicode", True),
    "not-utf8": (frame(json.dumps(header()).encode().replace(b'"a"', b'"\xff"')), r"header is not valid UTF-8", True),
    "bom": (frame("\ufeff" + json.dumps(header())), r"header is not valid JSON", True),
    "nul-padding": (frame(json.dumps(header()) + "\0"), r"header is not valid JSON \(Extra data", True),
    "not-json": (frame("{'a': 1}"), r"header is not valid JSON", True),
    "array": (frame("[1, 2]"), r"header is a JSON list, not an object", True),
    "deeply-nested": (frame("[" * 100_000), r"header JSON is nested too deeply", True),
    "long-number": (frame(json.dumps(header()).replace("[2, 2]", "[" + "9" * 5000 + ", 2]")), r"header holds the number 9{20}… with 5000 digits", True),
    # the length field
    "short-file": (b"\x10\0\0", r"file shorter than its 8-byte header length", True),
    "length-zero": (frame(header(), length=0), r"header length 0 does not fit the file", True),
    "length-past-end": (frame(header(), length=10**6), r"header length 1000000 does not fit the file", True),
    "length-short": (frame(header(), length=len(json.dumps(header())) - 1), r"header is not valid JSON", True),
    "length-long": (frame(header(), length=len(json.dumps(header())) + 1), r"header is not valid JSON \(Extra data", True),
    "length-2**63": (frame(header(), length=2**63), r"header length 9223372036854775808 does not fit the file", True),
}


@pytest.mark.parametrize("raw, message, library_refuses", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_refuses_bad_files_with_one_line(tmp_path, raw, message, library_refuses):
    (tmp_path / "x").write_bytes(raw)
    with pytest.raises(ValueError, match=message) as info:
        SafetensorsFile(tmp_path / "x")
    assert type(info.value) is ValueError and "\n" not in str(info.value) and len(str(info.value)) < 400
    # Documents where the library draws the line (if it changes, this table is revisited).
    assert (library(tmp_path / "x") is None) == library_refuses


def test_header_cap_is_the_librarys(tmp_path):
    # A sparse file big enough for a 100_000_001-byte header: refused before reading it, like the library.
    with open(tmp_path / "x", "wb") as fh:
        fh.write(struct.pack("<Q", 100_000_001))
        fh.truncate(200_000_000)
    with pytest.raises(ValueError, match=r"header length 100000001 does not fit the file .*header limit 100000000"):
        SafetensorsFile(tmp_path / "x")
    assert library(tmp_path / "x") is None


def test_does_not_leak_the_descriptor_when_refusing(tmp_path):
    (tmp_path / "x").write_bytes(BAD_FILES["int32"][0])
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(ValueError):
            SafetensorsFile(tmp_path / "x")
    assert len(os.listdir("/proc/self/fd")) == before


# -------------------------------------------------------------------------------------- adapter directories
def replace_tensors(adapter: Path, raw: bytes, name: str = TENSORS_FILE, field: str = "sha256") -> None:
    """Swap in crafted bytes and record their valid sha256, as a hostile client could."""
    (adapter / name).write_bytes(raw)
    meta = json.loads((adapter / META_FILE).read_text())
    meta[field] = file_sha256(adapter / name)
    (adapter / META_FILE).write_text(json.dumps(meta))


def crafted(a: dict | None = None, b: dict | None = None, data: bytes = DATA) -> bytes:
    """An adapter tensors file with one LoRA pair, its entries changed by ``a`` and ``b``."""
    return frame({"__metadata__": {"format": "pt"}, A: {**f32([2, 2], 0, 16), **(a or {})}, B: {**f32([2, 2], 16, 32), **(b or {})}}, data)


@pytest.fixture
def adapter(tmp_path) -> Path:
    return write_client(tmp_path / "drops", 0, lora_tensors(0, dtype=torch.float32))


ADAPTER_CASES = {
    "int32": (crafted({"dtype": "I32"}), rf"tensor '{A}' has dtype 'I32'; adapter tensors must be float"),
    "negative-shape": (crafted({"shape": [-2, -2]}), rf"tensor '{A}' has shape \[-2, -2\]"),
    "zero-dim": (crafted(f32([0, 2], 0, 0), f32([2, 2], 0, 16), DATA[:16]), r"has shape \[0, 2\]"),
    "rank-0": (crafted(f32([], 0, 4), f32([3], 4, 16), DATA[:16]), r"has shape \[\]"),
    "trailing-bytes": (crafted() + b"\0" * 8, r"8 trailing bytes after the last tensor"),
    "overlap": (crafted(b={"data_offsets": [8, 24]}, data=DATA[:24]), rf"tensor '{B}' overlaps the tensor before it"),
    "extra-key": (crafted({"note": "x"}), r"must be an object with exactly the keys dtype, shape and data_offsets"),
}


@pytest.mark.parametrize("raw, message", ADAPTER_CASES.values(), ids=ADAPTER_CASES.keys())
def test_adapter_reader_refuses_crafted_tensors(adapter, raw, message):
    replace_tensors(adapter, raw)
    with pytest.raises(AdapterError, match=message) as info:
        open_adapter(adapter)
    assert "not a readable safetensors file" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("raw, message", ADAPTER_CASES.values(), ids=ADAPTER_CASES.keys())
def test_inspect_refuses_crafted_tensors_with_one_line(adapter, raw, message):
    replace_tensors(adapter, raw)
    before = sorted(p.name for p in adapter.iterdir())
    result = CliRunner().invoke(app, ["inspect", str(adapter)])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output, result.output
    assert "not a readable safetensors file" in lines[0] and re.search(message, lines[0])
    assert sorted(p.name for p in adapter.iterdir()) == before


def test_aggregate_refuses_a_crafted_drop_and_writes_nothing(adapter, tmp_path):
    other = write_client(tmp_path / "drops", 1, lora_tensors(1, dtype=torch.float32))
    replace_tensors(adapter, crafted({"dtype": "I32"}))
    result = CliRunner().invoke(app, ["aggregate", str(adapter), str(other), "--out", str(tmp_path / "g")])
    assert result.exit_code == 1 and "has dtype 'I32'" in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "g").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".g")]


@pytest.mark.parametrize("dtype, itemsize", [("I32", 4), ("I64", 8), ("U8", 1), ("BOOL", 1), ("F8_E4M3", 1), ("F8_E8M0", 1), ("C64", 8)])
def test_residual_must_be_float(adapter, dtype, itemsize):
    # F8_E8M0 makes the library's load_file fail with a bare KeyError: the dtypes are checked before loading.
    residual = frame({"model.x.weight": {"dtype": dtype, "shape": [2, 2], "data_offsets": [0, 4 * itemsize]}}, bytes(4 * itemsize))
    replace_tensors(adapter, residual, RESIDUAL_FILE, "residual_sha256")
    with pytest.raises(AdapterError, match=rf"residual.safetensors: tensor 'model.x.weight' has dtype {dtype}; "
                                           r"residual tensors must be float \(F16, BF16, F32 or F64\)") as info:
        open_adapter(adapter).read_residual()
    assert "\n" not in str(info.value)


def test_unreadable_residual_is_one_line(adapter):
    replace_tensors(adapter, frame(header(), DATA + b"\0"), RESIDUAL_FILE, "residual_sha256")
    with pytest.raises(AdapterError, match=r"residual.safetensors is not readable \(.*incomplete metadata") as info:
        open_adapter(adapter).read_residual()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_float_residuals_are_read(adapter, dtype):
    value = torch.arange(4.0).reshape(2, 2).to(dtype)
    replace_tensors(adapter, save({"model.x.weight": value}), RESIDUAL_FILE, "residual_sha256")
    got = open_adapter(adapter).read_residual()
    assert got["model.x.weight"].dtype == dtype and torch.equal(got["model.x.weight"], value)


# -------------------------------------------------------------------------------------- fuzzing
GEN = torch.Generator().manual_seed(0)
BASE = save({A: torch.randn(2, 3, generator=GEN), B: torch.randn(4, 2, generator=GEN).to(torch.float16),
             "base_model.model.proj.modules_to_save.default.weight": torch.ones(3).to(torch.bfloat16)},
            metadata={"format": "pt"})
BASE_LEN = int.from_bytes(BASE[:8], "little")
BASE_HEADER = json.loads(BASE[8 : 8 + BASE_LEN])
BASE_DATA = BASE[8 + BASE_LEN :]

TEXT_EDITS = [  # (old, new) pairs of header text, half of them still valid
    ("[2, 3]", "[6]"), ("[2, 3]", "[3, 2]"), ("[2, 3]", "[1, 2, 3]"), ("[4, 2]", "[8]"), ('"F16"', '"BF16"'),
    ('"pt"', '"p\\u00e9"'), ("{", " {"), ('"pt"', '"pt", "k": ""'), ("[0, 24]", "[-0, 24]"), ("[2, 3]", "[2, 3.0]"),
    ('"pt"', '"\\udc00"'), ('"F32"', '"F32", "dtype": "F32"'), ('"format"', '"format": "x", "format"'),
    ("[24, 30]", "[24, 30, 30]"), ('"pt"', "1"), ("[3]", "[3, 1]"), ("[3]", "[1, 3, 1]"), ('"F32"', '"I32"'),
]
ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "BOOL": 1, "I16": 2, "I32": 4, "I64": 8}
ints = st.one_of(st.integers(-3, 40), st.sampled_from([2**31, 2**63, 2**64, -(2**63)]))
junk = st.one_of(st.none(), st.booleans(), ints, st.floats(allow_nan=True), st.text(max_size=4),
                 st.lists(ints, max_size=3), st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2))
dtypes = st.one_of(st.sampled_from(["F16", "BF16", "F32", "F64", "I32", "I64", "U8", "BOOL", "F8_E4M3", "f32", "I8"]), junk)
shapes = st.one_of(st.lists(st.integers(-2, 8), max_size=3), st.lists(junk, max_size=2), junk)
offsets = st.one_of(st.lists(st.integers(-4, 80), min_size=2, max_size=2), st.lists(junk, max_size=3), junk)


@st.composite
def header_edit(draw, h: dict) -> None:
    """One edit of the parsed header (in place): the fields the reader checks, keys, metadata."""
    names = sorted(k for k in h if k != "__metadata__")
    name = draw(st.sampled_from(names)) if names else "t"
    kind = draw(st.sampled_from(["dtype", "shape", "offsets", "shift", "extra", "drop", "add", "remove", "metadata",
                                 "retype", "retype", "reshape", "reshape", "reorder", "empty", "empty"]))
    entry = h.get(name) if isinstance(h.get(name), dict) else h.setdefault(name, {})
    sized = isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2 and isinstance(entry.get("shape"), list)
    if kind == "retype" and sized:  # the library reads these: same bytes, another dtype (integers included)
        nbytes = entry["data_offsets"][1] - entry["data_offsets"][0]
        dtype = draw(st.sampled_from(sorted(ITEMSIZE)))
        if nbytes % ITEMSIZE[dtype] == 0:
            entry["dtype"], entry["shape"] = dtype, [nbytes // ITEMSIZE[dtype]]
    elif kind == "reshape" and sized and all(isinstance(d, int) for d in entry["shape"]):  # same numel, other shape
        numel = math.prod(entry["shape"])
        entry["shape"] = draw(st.sampled_from([[numel], [1, numel], [numel, 1], entry["shape"][::-1], [1, *entry["shape"]]]))
    elif kind == "empty":  # the library reads a zero-size tensor at any tensor boundary
        at = draw(st.sampled_from([0, 24, 30, 46]))
        h["z"] = {"dtype": "F32", "shape": draw(st.sampled_from([[0], [0, 3], [2, 0]])), "data_offsets": [at, at]}
    elif kind == "reorder":
        items = draw(st.permutations(list(h.items())))
        h.clear()
        h.update(items)
    elif kind == "dtype":
        entry["dtype"] = draw(dtypes)
    elif kind == "shape":
        entry["shape"] = draw(shapes)
    elif kind == "offsets":
        entry["data_offsets"] = draw(offsets)
    elif kind == "shift" and isinstance(entry.get("data_offsets"), list):  # keep the size, move the tensor
        delta = draw(st.integers(-8, 8))
        entry["data_offsets"] = [o + delta if isinstance(o, int) else o for o in entry["data_offsets"]]
    elif kind == "extra":
        entry[draw(st.sampled_from(["x", "dtype_", "offsets"]))] = draw(junk)
    elif kind == "drop" and entry:
        del entry[draw(st.sampled_from(sorted(entry)))]
    elif kind == "add":
        h[draw(st.text(max_size=3))] = draw(st.one_of(junk, st.fixed_dictionaries(
            {"dtype": dtypes, "shape": shapes, "data_offsets": offsets})))
    elif kind == "remove":
        h.pop(name, None)
    elif kind == "metadata":
        h["__metadata__"] = draw(junk)


@st.composite
def mutated(draw) -> bytes:
    """The valid BASE file after one to three mutations: byte edits, resizing, header edits, length field."""
    raw = bytearray(BASE)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "truncate", "append", "length", "json", "json", "json", "text", "text"]))
        if kind == "flip" and raw:
            at = draw(st.integers(0, len(raw) - 1))
            raw[at] ^= draw(st.integers(1, 255))
        elif kind == "truncate":
            del raw[draw(st.integers(0, len(raw))):]
        elif kind == "append":
            raw += draw(st.binary(min_size=1, max_size=16))
        elif kind == "length" and len(raw) >= 8:
            n = int.from_bytes(raw[:8], "little")
            new = draw(st.one_of(st.integers(-4, 4).map(lambda d: min(max(n + d, 0), 2**64 - 1)), st.integers(0, 2**64 - 1)))
            raw[:8] = new.to_bytes(8, "little")
        elif kind in ("json", "text"):
            h = json.loads(json.dumps(BASE_HEADER))
            draw(header_edit(h))
            text = json.dumps(h)
            if kind == "text":  # what json.dumps never writes but a hostile writer can, valid or not
                old, new = draw(st.one_of(st.sampled_from(TEXT_EDITS), st.tuples(
                    st.sampled_from(['"F32"', "[2, 3]", "[4, 2]", '"pt"', "0", ":", "{"]),
                    st.sampled_from(["-0", "2.0", "1e1", '"\\ud800"', "NaN", " ", "{{", '"F32", "dtype": "F32"']))))
                text = text.replace(old, new, 1)
            pad = " " * draw(st.integers(0, 7))
            body = (text + pad).encode("utf-8", "surrogatepass")
            raw = bytearray(struct.pack("<Q", len(body)) + body + BASE_DATA)
    return bytes(raw)


@pytest.fixture(scope="module")
def fuzz_adapter(tmp_path_factory) -> Path:
    return write_client(tmp_path_factory.mktemp("fuzz"), 0, lora_tensors(0, dtype=torch.float32))


@settings(max_examples=250, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(raw=mutated())
def test_fuzz_never_accepts_what_the_library_refuses(fuzz_adapter, raw):
    replace_tensors(fuzz_adapter, raw)
    path = fuzz_adapter / TENSORS_FILE
    try:
        got = ours(path)
    except ValueError as exc:  # any other exception type fails the test
        assert type(exc) is ValueError and "\n" not in str(exc)
        with pytest.raises(AdapterError, match="not a readable safetensors file") as info:
            open_adapter(fuzz_adapter)
        assert "\n" not in str(info.value)
        return
    want = library(path)
    assert want is not None, "uniflow accepted a file the safetensors library refuses"
    assert same_tensors(got, want)
    assert all(t.is_floating_point() and t.dim() >= 1 and t.numel() >= 1 for t in got.values())


def test_fuzz_starts_from_a_valid_file(tmp_path):
    (tmp_path / "x").write_bytes(BASE)
    assert same_tensors(ours(tmp_path / "x"), library(tmp_path / "x"))
