"""``uniflow report``: the paper-style comparison table and metric-over-rounds plots of several runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from uniflow_cli.cli.options import ForceOpt, OutDirOpt

EPILOG = """[bold]Examples[/bold]

  uniflow report runs/fedA2 runs/fedit runs/ffa --out report/

  uniflow report fed/ fed-lora/ --names FedA2-LoRA,LoRA --metrics acc,bert_f1,rouge_l --force

A RUN_DIR is a workspace (its eval/round-*.json are read) or a directory of eval JSON files. Writes report.md (rows = runs, the untrained base '–' from round 0, columns = modality × metric, values of each run's last round) and one <metric>.png over rounds. Metrics: acc, em, bleu, rouge_l, bert_p, bert_r, bert_f1 (default: acc,bert_p,bert_r,bert_f1 as in the paper's Tables 1–3)."""


def report(
    run_dirs: Annotated[
        list[Path], typer.Argument(metavar="RUN_DIR...", help="Workspaces or directories of eval JSON files.", show_default=False)
    ],
    out: OutDirOpt = None,
    metrics: Annotated[
        Optional[str],
        typer.Option("--metrics", "-m", help="Comma-separated metrics (default acc,bert_p,bert_r,bert_f1).", show_default=False),
    ] = None,
    names: Annotated[
        Optional[str],
        typer.Option("--names", help="Comma-separated run names, one per RUN_DIR (default: directory names).", show_default=False),
    ] = None,
    force: ForceOpt = False,
) -> None:
    """Compare runs: a markdown table like the paper's Tables 1–3 and one PNG per metric over rounds."""
    from rich.table import Table

    from uniflow_cli.cli.console import out as console
    from uniflow_cli.metrics import METRIC_TITLES
    from uniflow_cli.report import format_value, make_report

    out_dir = out if out is not None else Path("report")
    name_list = [n.strip() for n in names.split(",")] if names is not None else None
    result = make_report(run_dirs, out_dir, names=name_list, metrics=metrics, force=force)

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
