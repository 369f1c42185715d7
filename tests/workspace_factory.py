"""A tiny tiny-random workspace with hand-made shards, shared by the local-train and federation tests."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch


def png(seed: int) -> bytes:
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(32, 32, 3, generator=gen) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_shard(path: Path, modality: str, n: int = 4, offset: int = 0) -> None:
    from uniflow_cli.data.schema import make_row, rows_to_dataset

    rows = [
        make_row(id=f"{modality}-{i}", modality=modality, question=f"What is {i} plus {i}?", answer=str(2 * i),
                 image_bytes=png(i) if modality == "image" else None)
        for i in range(offset, offset + n)
    ]
    rows_to_dataset(rows).save_to_disk(str(path))


def make_workspace(ws: Path, clients: dict[str, str], *, test: tuple[str, ...] = ()) -> Path:
    """``uniflow init`` (tiny-random, image encoder) + one shard per client + a minimal partition.json."""
    from typer.testing import CliRunner

    from uniflow_cli.cli.app import app

    result = CliRunner().invoke(app, ["init", str(ws), "--preset", "tiny-random", "--modalities", "image"])
    assert result.exit_code == 0, result.output
    for client, modality in clients.items():
        write_shard(ws / "data" / "clients" / client, modality, offset=4 * int(client))
    for modality in test:
        write_shard(ws / "data" / "test" / modality, modality, n=4, offset=100)
    (ws / "data" / "partition.json").write_text(json.dumps({"clients": [{"id": int(c), "modalities": [m]} for c, m in clients.items()]}))
    return ws
