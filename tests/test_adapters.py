"""The adapter format: the pread safetensors reader against the library's, validation, atomic publish."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from uniflow_cli.adapters import AdapterMeta, open_adapter, read_adapter, scan_adapter_dirs, write_adapter
from uniflow_cli.errors import AdapterError, OutputExistsError
from uniflow_cli.safetensors_io import SafetensorsFile
from tests.lora_factory import lora_tensors, peft_config


# Adapter tensors are float and non-empty (integer dtypes and zero dims are refused: tests/test_safetensors_strict.py).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_reader_matches_the_safetensors_library(tmp_path, dtype):
    gen = torch.Generator().manual_seed(0)
    tensors = {"a": (torch.randn(3, 5, generator=gen) * 10).to(dtype), "b.c": torch.ones(7).to(dtype)}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    ours = SafetensorsFile(tmp_path / "x.safetensors")
    ref = load_file(str(tmp_path / "x.safetensors"))
    assert ours.keys() == sorted(ref)
    for key, value in ref.items():
        got = ours.get(key)
        assert got.dtype == value.dtype and got.shape == value.shape and torch.equal(got, value)


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:4], "shorter than its 8-byte header"),
    (lambda b: b[:-5], "outside the file or has the wrong size"),
    (lambda b: (10**9).to_bytes(8, "little") + b[8:], "does not fit the file"),
    (lambda b: b[:8] + b"x" + b[9:], "Expecting value"),
])
def test_reader_refuses_damaged_files(tmp_path, damage, message):
    save_file({"a": torch.ones(4, 4)}, str(tmp_path / "x.safetensors"))
    (tmp_path / "x.safetensors").write_bytes(damage((tmp_path / "x.safetensors").read_bytes()))
    with pytest.raises(ValueError, match=message):
        SafetensorsFile(tmp_path / "x.safetensors")


def test_round_trip_is_bit_identical(tmp_path):
    tensors = lora_tensors(0, dtype=torch.float32)
    meta = AdapterMeta(role="client", client_id="3", num_examples=5, round=2, modalities=["audio"], base_fingerprint="fp")
    out = write_adapter(tmp_path / "a", peft_config=peft_config(), tensors=tensors, meta=meta)
    loaded = read_adapter(out)
    assert all(torch.equal(loaded.tensors[k], v) for k, v in tensors.items())
    assert loaded.meta.client_id == "3" and loaded.meta.sha256 and loaded.meta.round == 2


def test_refuses_nan_and_overwrite_and_leaves_nothing(tmp_path):
    bad = lora_tensors(0, dtype=torch.float32)
    next(iter(bad.values()))[0, 0] = float("nan")
    with pytest.raises(AdapterError, match="contains NaN or Inf; refusing to publish"):
        write_adapter(tmp_path / "a", peft_config=peft_config(), tensors=bad, meta=AdapterMeta(role="client"))
    assert list(tmp_path.iterdir()) == []
    write_adapter(tmp_path / "a", peft_config=peft_config(), tensors=lora_tensors(0), meta=AdapterMeta(role="client"))
    with pytest.raises(OutputExistsError, match="already exists"):
        write_adapter(tmp_path / "a", peft_config=peft_config(), tensors=lora_tensors(1), meta=AdapterMeta(role="client"))


def test_scan_skips_hidden_and_reports_broken_drops(tmp_path):
    write_adapter(tmp_path / "0", peft_config=peft_config(), tensors=lora_tensors(0), meta=AdapterMeta(role="client", client_id="0"))
    write_adapter(tmp_path / "1", peft_config=peft_config(), tensors=lora_tensors(1), meta=AdapterMeta(role="client", client_id="1"))
    (tmp_path / ".2.tmp-abc").mkdir()
    (tmp_path / "3").mkdir()
    meta = json.loads((tmp_path / "1" / "uniflow.json").read_text())
    meta["sha256"] = "0" * 64
    (tmp_path / "1" / "uniflow.json").write_text(json.dumps(meta))
    valid, rejected = scan_adapter_dirs(tmp_path)
    assert [p.name for p in valid] == ["0"]
    assert {p.name: r for p, r in rejected}.keys() == {"1", "3"}
    assert "half-written or corrupted drop" in dict((p.name, r) for p, r in rejected)["1"]
    with pytest.raises(AdapterError, match="does not exist"):
        open_adapter(tmp_path / "nope")


# ---------------------------------------------------------------------------------------------- residuals
@pytest.fixture
def fedex_global(tmp_path):
    """A published FedEx-like global: LoRA tensors plus a dense residual recorded in uniflow.json."""
    meta = AdapterMeta(role="global", round=1, method="fedex")
    residual = {"model.x.weight": torch.arange(4.0).reshape(2, 2)}
    return write_adapter(tmp_path / "g", peft_config=peft_config(), tensors=lora_tensors(0), meta=meta, residual=residual)


def _rewrite_meta(adapter, **changes):
    data = json.loads((adapter / "uniflow.json").read_text())
    (adapter / "uniflow.json").write_text(json.dumps({**data, **changes}))


def test_a_recorded_residual_is_read(fedex_global):
    assert json.loads((fedex_global / "uniflow.json").read_text())["residual_sha256"]
    assert torch.equal(read_adapter(fedex_global).residual["model.x.weight"], torch.arange(4.0).reshape(2, 2))


@pytest.mark.parametrize("damage, message", [
    # residual_sha256 null with a residual present: it would be added to the base weights unverified
    (lambda g: _rewrite_meta(g, residual_sha256=None), r"residual.safetensors is not recorded in uniflow.json \(no residual_sha256\)"),
    # a plain PEFT directory cannot record a residual at all
    (lambda g: (g / "uniflow.json").unlink(), r"residual.safetensors has no uniflow.json to record its sha256"),
    # recorded, but the file is gone: FedEx's correction would be dropped silently
    (lambda g: (g / "residual.safetensors").unlink(), r"records a residual_sha256 but .*residual.safetensors is missing"),
    (lambda g: _rewrite_meta(g, residual_sha256="0" * 64), r"residual.safetensors does not match its sha256"),
])
def test_a_residual_must_be_recorded_and_verified(fedex_global, damage, message):
    damage(fedex_global)
    with pytest.raises(AdapterError, match=message) as info:
        open_adapter(fedex_global)
    assert "\n" not in str(info.value)
