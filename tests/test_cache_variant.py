"""cache.ensure_variant: a bf16/fp16 copy of a float32 cache entry, built once, checked like the entry."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from uniflow_cli.models import cache


@pytest.fixture
def entry(tmp_path: Path) -> Path:
    directory = tmp_path / "part-abc"
    directory.mkdir()
    save_file({"w": torch.linspace(-1, 1, 12).reshape(3, 4), "ids": torch.arange(5)}, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text('{"hidden_size": 4}\n')
    source = cache.EmbeddedSource(name="part", package="p", distribution="p==1", relpath="f.bin")
    cache.write_manifest(directory, source=source, source_sha="ab" * 32)
    return directory


def test_the_variant_holds_the_rounded_floats_and_the_same_other_files(entry: Path) -> None:
    variant = cache.ensure_variant(entry, "bfloat16")
    tensors = load_file(str(variant / "model.safetensors"))
    assert tensors["w"].dtype == torch.bfloat16 and torch.equal(tensors["w"], torch.linspace(-1, 1, 12).reshape(3, 4).bfloat16())
    assert tensors["ids"].dtype == torch.int64  # integers are not cast
    assert (variant / "config.json").read_bytes() == (entry / "config.json").read_bytes()
    manifest = cache.read_manifest(variant)
    assert manifest["dtype"] == "bfloat16" and manifest["variant_of"] == entry.name
    assert cache.check_entry(variant, "ab" * 32) is None


def test_the_variant_is_built_once_and_rebuilt_when_corrupt(entry: Path) -> None:
    variant = cache.ensure_variant(entry, "float16")
    first = (variant / "model.safetensors").read_bytes()
    stamp = (variant / "model.safetensors").stat().st_mtime_ns
    assert cache.ensure_variant(entry, "float16") == variant and (variant / "model.safetensors").stat().st_mtime_ns == stamp
    (variant / "model.safetensors").write_bytes(b"garbage")
    assert cache.ensure_variant(entry, "float16") == variant
    assert (variant / "model.safetensors").read_bytes() == first  # deterministic: the same bytes again
