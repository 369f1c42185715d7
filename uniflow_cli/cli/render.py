"""Rich rendering of command results (tables); no logic beyond presentation."""

from __future__ import annotations

import math
from typing import Any

from rich.table import Table

from uniflow_cli.cli.console import out

MAX_LAYER_ROWS = 24


def fmt(value: float | None, spec: str = ".2e") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} GiB"


def print_aggregate_outcome(outcome: Any) -> None:
    result = outcome.result
    layers = result.layers
    shown = layers
    title = f"{result.method}: {len(layers)} LoRA layers"
    if len(layers) > MAX_LAYER_ROWS:
        shown = sorted(layers, key=lambda l: -(l.rel_error or 0.0))[:10]
        title += " (10 with the largest error; --report has all)"
    table = Table(title=title, title_justify="left")
    table.add_column("layer", overflow="fold")
    table.add_column("rank", justify="right")
    table.add_column("Eq. 13 branch")
    table.add_column("cond(ĀĀᵀ)", justify="right")
    table.add_column("‖s·BA−U‖/‖U‖", justify="right")
    for layer in shown:
        table.add_row(layer.module.removeprefix("base_model.model."), str(layer.rank), layer.branch, fmt(layer.cond), fmt(layer.rel_error))
    out.print(table)
    summary = result.summary()
    clients = Table(title="clients", title_justify="left")
    for col in ("client", "examples", "weight", "path"):
        clients.add_column(col, overflow="fold")
    for row in outcome.clients:
        clients.add_row(str(row["client_id"] or "-"), str(row["num_examples"] or "-"), f"{row['weight']:.4f}", row["path"])
    out.print(clients)
    # Only a method that solves Eq. 13 per layer (fedA2) reports branches; the others mark every layer "-".
    solved = {k: v for k, v in summary["branches"].items() if k != "-"}
    branches = ", ".join(f"{k}: {v}" for k, v in sorted(solved.items()))
    out.print(
        f"[green]published[/green] {outcome.out}  ({human_bytes(outcome.tensor_bytes)}"
        + (f" + residual {human_bytes(outcome.residual_bytes)}" if outcome.residual_bytes else "")
        + f")  mean rel. error {fmt(summary['rel_error_mean'])}, max {fmt(summary['rel_error_max'])}"
        + (f"  branches: {branches}" if branches else ""),
        soft_wrap=True,
    )
    for note in result.notes:
        out.print(f"[dim]{note}[/dim]")
    if result.defenses is not None:
        print_defenses(result.defenses)


def print_defenses(defenses: Any) -> None:
    """The update defenses of an aggregation: who was clipped (layers, largest pre-clip norm), per-layer counts."""
    report = defenses.report()
    robust = f"robust sum: {report['robust']}" if report["robust"] else "robust sum: none"
    if report["clip_update_norm"] is None:
        out.print(f"[bold]defenses[/bold]  {robust}")
        return
    clipped = report["clipped"]
    out.print(f"[bold]defenses[/bold]  clip-update-norm {report['clip_update_norm']:g}: {len(clipped)} client(s) clipped  {robust}")
    if clipped:
        table = Table(title="clipped clients", title_justify="left")
        for col in ("client", "layers clipped", "max pre-clip ‖update‖"):
            table.add_column(col, overflow="fold", justify="left" if col == "client" else "right")
        for row in clipped:
            table.add_row(row["client"], f"{row['layers']}/{row['of']}", fmt(row["max_update_norm"]))
        out.print(table)
    rows = sorted(report["layers"], key=lambda r: -r["clipped"])[:MAX_LAYER_ROWS]
    table = Table(title="pre-clip update norms per layer" + (" (the most clipped; --report has all)" if len(report["layers"]) > MAX_LAYER_ROWS else ""),
                  title_justify="left")
    for col in ("layer", "clipped", "max ‖update‖", "median ‖update‖"):
        table.add_column(col, overflow="fold", justify="left" if col == "layer" else "right")
    for row in rows:
        norms = sorted(math.inf if v is None else v for v in row["update_norms"])  # null in JSON: a norm that overflowed
        table.add_row(row["layer"].removeprefix("base_model.model."), str(row["clipped"]), fmt(norms[-1]), fmt(norms[(len(norms) - 1) // 2]))
    out.print(table)
