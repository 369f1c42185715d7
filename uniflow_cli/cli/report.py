"""``uniflow report``: the paper-style comparison table and metric-over-rounds plots of several runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from uniflow_cli.cli.examples import Example, epilog
from uniflow_cli.cli.options import ForceOpt, JsonOpt, OutDirOpt

EXAMPLES: list[Example] = [
    ("compare three runs (workspaces) in the paper's table layout", "uniflow report runs/fedA2 runs/fedit runs/ffa --out report/"),
    ("name the rows, pick the metrics", "uniflow report fed/ fed-lora/ --names FedA2-LoRA,LoRA --metrics acc,bert_f1,rouge_l --force"),
    ("the table as JSON", "uniflow report fed/ fed-lora/ --out report/ --json | jq '.rows[0]'"),
]
EPILOG = epilog(EXAMPLES, [
    "A RUN_DIR is a workspace (its eval/round-*.json are read) or a directory of eval JSON files. Writes report.md (rows = runs, "
    "the untrained base '–' from round 0, columns = modality × metric, values of each run's last round) and one <metric>.png over rounds. "
    "Metrics: acc, em, bleu, rouge_l, bert_p, bert_r, bert_f1 (default: acc,bert_p,bert_r,bert_f1 as in the paper's Tables 1–3).",
])


def report(
    run_dirs: Annotated[
        list[Path], typer.Argument(metavar="RUN_DIR...", help="Workspaces or directories of eval JSON files.", show_default=False)
    ],
    out: OutDirOpt = None,
    metrics: Annotated[  # no -m: that is --method (the table in options.py)
        Optional[str],
        typer.Option("--metrics", help="Comma-separated metrics (default acc,bert_p,bert_r,bert_f1).", show_default=False),
    ] = None,
    names: Annotated[
        Optional[str],
        typer.Option("--names", help="Comma-separated run names, one per RUN_DIR (default: directory names).", show_default=False),
    ] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Compare runs: a markdown table like the paper's Tables 1–3 and one PNG per metric over rounds."""
    from uniflow_cli.report import make_report

    out_dir = out if out is not None else Path("report")
    name_list = [n.strip() for n in names.split(",")] if names is not None else None
    result = make_report(run_dirs, out_dir, names=name_list, metrics=metrics, force=force)
    if as_json:
        from uniflow_cli.cli.console import print_json

        print_json(_as_json(result, out_dir))
    else:
        _print(result, out_dir)


def _as_json(result: Any, out_dir: Path) -> dict[str, Any]:
    """The table as data: one row per run, values by modality then metric (None where a run lacks one)."""
    rows = []
    for label, t, values in result.table.rows:
        by_modality: dict[str, dict[str, Any]] = {}
        for (modality, metric), value in zip(result.table.columns, values):
            by_modality.setdefault(modality, {})[metric] = value
        rows.append({"run": label, "round": t, "values": by_modality})
    files = [str(out_dir / name) for name in ("report.md", *result.pngs)]
    return {"out": str(out_dir), "files": files, "metrics": list(result.metrics), "rows": rows}


def _print(result: Any, out_dir: Path) -> None:
    from rich.table import Table

    from uniflow_cli.cli.console import out as console
    from uniflow_cli.metrics import METRIC_TITLES
    from uniflow_cli.report import format_value

    # One rich table per modality (the paper's column groups), so each fits a terminal's width.
    modalities = list(dict.fromkeys(m for m, _ in result.table.columns))
    for modality in modalities:
        idx = [i for i, (m, _) in enumerate(result.table.columns) if m == modality]
        table = Table(title=f"{modality} (%, last round of each run)", title_justify="left")
        table.add_column("Method")
        table.add_column("Round", justify="right")
        for i in idx:
            table.add_column(METRIC_TITLES[result.table.columns[i][1]], justify="right")
        for label, t, values in result.table.rows:
            table.add_row(label, str(t), *(format_value(values[i]) for i in idx))
        console.print(table)
    files = ", ".join(["report.md", *result.pngs])
    console.print(f"wrote {out_dir}/ ({files})", soft_wrap=True)
