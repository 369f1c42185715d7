"""``uniflow inspect``: what an adapter directory holds."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer

from uniflow_cli.cli.examples import epilog
from uniflow_cli.cli.options import JsonOpt

EXAMPLES = [
    ("what an adapter directory holds", "uniflow inspect fed/rounds/3/global"),
    ("machine-readable, for scripts", "uniflow inspect fed/rounds/3/clients/0 --json | jq .meta"),
]
EPILOG = epilog(EXAMPLES)


def inspect(
    adapter: Annotated[Path, typer.Argument(help="An adapter directory (uniflow or plain PEFT).")],
    as_json: JsonOpt = False,
) -> None:
    """Show an adapter's metadata, per-layer ranks, shapes, dtype, norms and size."""
    from rich.table import Table

    from uniflow_cli.cli.console import out, print_json
    from uniflow_cli.cli.render import fmt, human_bytes

    info = describe_adapter(adapter)
    if as_json:
        print_json(info)
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
    # VeRA: the A and B columns show d and b (the input- and output-side vectors), ‖s·BA‖ is ‖Λ_b B Λ_d A‖.
    table = Table(title=f"{len(info['layers'])} {'VeRA' if info.get('family') == 'vera' else 'LoRA'} layers", title_justify="left")
    for col, justify in (("layer", "left"), ("rank", "right"), ("A", "right"), ("B", "right"), ("dtype", "left"), ("‖A‖", "right"), ("‖B‖", "right"), ("‖s·BA‖", "right")):
        table.add_column(col, justify=justify, overflow="fold")
    for layer in info["layers"]:
        table.add_row(
            layer["module"].removeprefix("base_model.model."), str(layer["rank"]),
            "×".join(map(str, layer["A_shape"])) if layer["A_shape"] else "-",
            "×".join(map(str, layer["B_shape"])) if layer["B_shape"] else "-",
            layer["dtype"], fmt(layer["A_norm"], ".3g"), fmt(layer["B_norm"], ".3g"), fmt(layer["delta_norm"], ".3g"),
        )
    out.print(table)
    if info["other_tensors"]:
        others = Table(title="other trainable tensors (averaged by every method)", title_justify="left")
        for col in ("key", "shape", "dtype"):
            others.add_column(col, overflow="fold")
        for row in info["other_tensors"]:
            others.add_row(row["key"], "×".join(map(str, row["shape"])), row["dtype"])
        out.print(others)


def describe_adapter(path: Path) -> dict[str, Any]:
    """Everything ``uniflow inspect`` shows: metadata, and per LoRA module its rank, shapes, dtype and norms.

    Read through the format's public reader (:func:`uniflow_cli.adapters.open_adapter`, which verifies the
    directory first). ``delta_norm`` is ‖s·B·A‖_F, computed from r×r Gram matrices (no d_out × d_in product).
    """
    import torch

    from uniflow_cli.adapters import open_adapter
    from uniflow_cli.peft_keys import lora_scaling

    reader = open_adapter(path)
    layers = _vera_layers(reader) if reader.family == "vera" else []
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
        "family": reader.family,
        "peft": {k: reader.peft_config.get(k) for k in ("r", *(("projection_prng_key", "d_initial") if reader.family == "vera" else ("lora_alpha", "use_rslora")),
                                                         "target_modules", "modules_to_save")},
        "layers": layers,
        "other_tensors": others,
        "tensor_bytes": reader.nbytes(),
        "residual_bytes": residual_bytes,
    }


def _vera_layers(reader: Any) -> list[dict[str, Any]]:
    """A VeRA adapter's rows: d and b per layer, and ‖Λ_b B Λ_d A‖_F where the layer's shape is recorded."""
    import torch

    from uniflow_cli.aggregation.vera import effective_factors, slice_projections
    from uniflow_cli.aggregation.vera_core import VeraRecord
    from uniflow_cli.global_info import GlobalInfo
    from uniflow_cli.peft_keys import VERA_A_KEY, VERA_B_KEY

    record = VeraRecord.of(GlobalInfo.of(reader.meta).vera, str(reader.path))
    has_projections = VERA_A_KEY in reader and VERA_B_KEY in reader
    rows = []
    for module, (d_key, b_key) in sorted(reader.vera_modules.items()):
        d = reader[d_key].to(torch.float64) if d_key else None
        b = reader[b_key].to(torch.float64) if b_key else None
        entry: dict[str, Any] = {"module": module, "rank": int(reader.peft_config["r"]), "dtype": reader.dtype(d_key or b_key),
                                 "A_shape": list(d.shape) if d is not None else None, "B_shape": list(b.shape) if b is not None else None,
                                 "A_norm": float(d.norm()) if d is not None else None, "B_norm": float(b.norm()) if b is not None else None,
                                 "delta_norm": None}
        if d is not None and b is not None and has_projections and record is not None and module in record.layers:
            d_out, d_in = record.layers[module]
            A, B = slice_projections(reader[VERA_A_KEY], reader[VERA_B_KEY], d_in, d_out)
            B_eff, A_eff = effective_factors(A, B, d, b)
            entry["delta_norm"] = math.sqrt(max(float(((B_eff.T @ B_eff) * (A_eff @ A_eff.T)).sum()), 0.0))
        rows.append(entry)
    return rows
