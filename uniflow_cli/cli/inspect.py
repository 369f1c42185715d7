"""``uniflow inspect``: what an adapter directory holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

EPILOG = """[bold]Examples[/bold]

  uniflow inspect fed/rounds/3/global

  uniflow inspect fed/rounds/3/clients/0 --json | jq .meta"""


def inspect(
    adapter: Annotated[Path, typer.Argument(help="An adapter directory (uniflow or plain PEFT).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")] = False,
) -> None:
    """Show an adapter's metadata, per-layer ranks, shapes, dtype, norms and size."""
    from rich.table import Table

    from uniflow_cli.adapters import describe_adapter
    from uniflow_cli.cli.console import out
    from uniflow_cli.cli.render import _fmt, human_bytes

    info = describe_adapter(adapter)
    if as_json:
        out.print_json(json.dumps(info, default=str))
        return
    meta = info["meta"]
    head = Table(show_header=False, title=f"adapter {info['path']}", title_justify="left")
    head.add_column(style="bold")
    head.add_column(overflow="fold")
    if meta is None:
        head.add_row("metadata", "none (plain PEFT adapter)")
    else:
        for key in ("role", "client_id", "round", "method", "num_examples", "modalities", "stage", "base_fingerprint", "created", "sha256"):
            head.add_row(key, str(meta.get(key)))
    for key, value in info["peft"].items():
        head.add_row(key, str(value))
    head.add_row("tensors", human_bytes(info["tensor_bytes"]) + (f" + residual {human_bytes(info['residual_bytes'])}" if info["residual_bytes"] else ""))
    out.print(head)
    table = Table(title=f"{len(info['layers'])} LoRA layers", title_justify="left")
    for col, justify in (("layer", "left"), ("rank", "right"), ("A", "right"), ("B", "right"), ("dtype", "left"), ("‖A‖", "right"), ("‖B‖", "right"), ("‖s·BA‖", "right")):
        table.add_column(col, justify=justify, overflow="fold")
    for layer in info["layers"]:
        table.add_row(
            layer["module"].removeprefix("base_model.model."), str(layer["rank"]),
            "×".join(map(str, layer["A_shape"])) if layer["A_shape"] else "-",
            "×".join(map(str, layer["B_shape"])) if layer["B_shape"] else "-",
            layer["dtype"], _fmt(layer["A_norm"], ".3g"), _fmt(layer["B_norm"], ".3g"), _fmt(layer["delta_norm"], ".3g"),
        )
    out.print(table)
    if info["other_tensors"]:
        others = Table(title="other trainable tensors (averaged by every method)", title_justify="left")
        for col in ("key", "shape", "dtype"):
            others.add_column(col, overflow="fold")
        for row in info["other_tensors"]:
            others.add_row(row["key"], "×".join(map(str, row["shape"])), row["dtype"])
        out.print(others)
