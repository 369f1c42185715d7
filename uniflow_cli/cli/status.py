"""``uniflow status``: the state of a federation's workspace (file drop, or rounds run under Flower)."""

from __future__ import annotations

from uniflow_cli.cli.examples import Example, epilog
from uniflow_cli.cli.options import JsonOpt, WorkspaceOpt

EXAMPLES: list[Example] = [
    ("inside a workspace: rounds, drops, published globals, metrics", "uniflow status"),
    ("a workspace on shared storage, as JSON", "uniflow status -w /mnt/shared/fed --json"),
]
EPILOG = epilog(EXAMPLES)


def status(
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show rounds, which clients dropped (and which drops are invalid), what was published, and metrics."""
    from rich.table import Table

    from uniflow_cli.cli.console import out, print_json
    from uniflow_cli.federation import workspace_status
    from uniflow_cli.workspace import find_workspace

    info = workspace_status(find_workspace(workspace))  # type: ignore[arg-type]
    if as_json:
        print_json(info)
        return
    table = Table(title=f"workspace {info['workspace']}  (expected clients: {', '.join(info['expected_clients']) or 'unknown'})", title_justify="left")
    for col in ("round", "global", "method", "dropped", "invalid", "missing", "metrics"):
        table.add_column(col, overflow="fold")
    for r in info["rounds"]:
        metrics = r.get("metrics") or {}
        shown = []
        for modality, values in metrics.items():
            if modality == "overall" or not isinstance(values, dict):
                continue
            acc, f1 = values.get("acc"), values.get("bert_f1", values.get("macro_f1"))  # a classify eval: macro-F1
            shown.append(f"{modality}: Acc {acc if acc is not None else '-'} F1 {f1 if f1 is not None else '-'}")
        glob = "published" if r["published"] else ("[yellow]aggregating[/yellow]" if r.get("locked") else "-")
        table.add_row(
            str(r["round"]), glob, str(r.get("method") or "-"),
            ", ".join(r.get("dropped", [])) or (f"flower: {', '.join(r.get('clients', []))}" if r.get("engine") == "flower" else "-"),
            ", ".join(f"{i['client']}" for i in r.get("invalid", [])) or "-",
            ", ".join(r.get("missing", [])) or "-",
            "; ".join(shown) or "-",
        )
    out.print(table)
    for r in info["rounds"]:
        for bad in r.get("invalid", []):
            out.print(f"[yellow]round {r['round']}: drop {bad['client']} is invalid:[/yellow] {bad['reason']}", soft_wrap=True)
