"""``uniflow sweep run`` / ``uniflow sweep report``: a grid of simulations, resumable, and its tables and plots."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from uniflow_cli.cli.boundary import UniflowGroup
from uniflow_cli.cli.examples import Example, epilog
from uniflow_cli.cli.options import OUT_FLAGS, DeviceOpt, ForceOpt, JsonOpt, ThreadsOpt

EXAMPLES: list[Example] = [
    ("run a grid (methods × adapters × seeds × knobs), each cell a workspace under sweeps/NAME/runs/, rows in sweeps/NAME/NAME.jsonl",
     "uniflow sweep run examples/paper/lambda.toml"),
    ("the cells it would run, and which are done, without running any", "uniflow sweep run examples/paper/table4-snli.toml --dry-run"),
    ("the published rows, at the grid's full size, on a GPU machine with 4 cells at a time",
     "uniflow sweep run examples/paper/table4-snli.toml --full --jobs 4 --device cuda --rows docs/results/table4-snli-full.jsonl"),
    ("one knob changed for this run (a list replaces an axis)", "uniflow sweep run grid.toml --set rounds=50 --set seed=[0,1,2,3,4] --out sweeps/long"),
    ("after a kill: the same command skips finished cells and resumes the interrupted one", "uniflow sweep run examples/paper/lambda.toml"),
    ("tables (mean ± std (n) over seeds) and plots over rounds from the rows", "uniflow sweep report docs/results/ --out docs/results/tables"),
]
RUN_NOTES = [(
    "A grid is a TOML file: [sweep] (name and the knobs every cell shares: the keys of uniflow.toml's [model], [lora], [train], "
    "[aggregate] tables, partition's dataset, clients, scheme, alpha, train_per_client, test_per_modality, and rounds, eval_every, "
    "eval_limit, seed, warm_start, train_clients), [axes] (lists of values or tables of named variants; the cartesian product), "
    "[[exclude]] (cells left out) and [full] (the full size, with --full). See examples/paper/ and docs/results/README.md."),
]
EPILOG = epilog(EXAMPLES, RUN_NOTES)
REPORT_EXAMPLES = EXAMPLES[-1:] + [("one grid's rows, accuracy and macro-F1, against FedIT",
                                    "uniflow sweep report sweeps/table4-snli/table4-snli.jsonl --metrics accuracy,macro_f1 --baseline fedit --out t4/")]
REPORT_EPILOG = epilog(REPORT_EXAMPLES, [(
    "Writes OUT/<grid>.md (rows adapter × method and the grid's other axes, columns datasets or test modalities, cells mean ± "
    "std (n) over seeds at the final round, and each method's difference from the baseline with its standard error: beyond "
    "2 SE or within) and OUT/<grid>-<column>-<metric>.png (accuracy and the aggregation error over rounds)."),
])

app = typer.Typer(cls=UniflowGroup, name="sweep", help="Run grids of simulations (resumable) and tabulate their rows.",
                  no_args_is_help=True, rich_markup_mode="rich", epilog=EPILOG)


# Long only by its signature: one Typer parameter per option; the body is parse → one library call → print.
@app.command("run", epilog=EPILOG)
def run(
    grid: Annotated[Path, typer.Argument(metavar="GRID.toml", help="The grid file.", show_default=False)],
    out: Annotated[Optional[Path], typer.Option(*OUT_FLAGS, help="Where the cells' workspaces go (OUT/runs/CELL; default sweeps/NAME).",
                                                show_default=False)] = None,
    rows: Annotated[Optional[Path], typer.Option("--rows", help="The rows file, one JSON object per (cell, round) (default OUT/NAME.jsonl).",
                                                 show_default=False)] = None,
    jobs: Annotated[int, typer.Option("--jobs", help="Cells run at once, each in its own process (threads split between them).")] = 1,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate the grid and list its cells and their state; run nothing.")] = False,
    sets: Annotated[Optional[list[str]], typer.Option("--set", metavar="KEY=VALUE", help="Override a \\[sweep] knob or an axis (VALUE in "
                                                      "TOML: 50, \\[0,1,2], \"x\"); repeatable.", show_default=False)] = None,
    full: Annotated[bool, typer.Option("--full", help="Apply the grid's \\[full] table (the full size; the name gets -full).")] = False,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Redo cells recorded with another config; replace a rows file of another grid.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Run a grid of simulations: every cell's init, partition and simulate, skipping finished cells."""
    from uniflow_cli.cli.console import err, print_json
    from uniflow_cli.sweep import load_grid, plan_sweep, run_sweep

    plan = plan_sweep(load_grid(grid, sets=sets or [], full=full), out, rows, force=force)
    if dry_run:
        if as_json:
            print_json(plan_json(plan))
        else:
            _print_plan(plan)
        return
    with _progress(err, len(plan.grid.cells)) as on_event:
        outcome = run_sweep(plan, jobs=jobs, device=device, threads=threads, on_event=on_event)
    if as_json:
        print_json({**plan_json(plan), "ran": outcome.ran, "skipped": outcome.skipped, "rows_written": outcome.rows_written,
                    "seconds": outcome.seconds})
        return
    from uniflow_cli.cli.console import out as stdout

    stdout.print(f"[green]grid {outcome.grid}[/green]: ran {len(outcome.ran)} cell(s), skipped {len(outcome.skipped)} finished; "
                 f"{outcome.rows_written} rows in {outcome.rows} ({outcome.seconds:.1f} s)", soft_wrap=True)


def plan_json(plan: Any) -> dict[str, Any]:
    """The grid's cells, their knobs and state (``--dry-run --json``)."""
    return {"grid": plan.grid.name, "file": str(plan.grid.path), "out": str(plan.out), "rows": str(plan.rows), "axes": plan.grid.axes,
            "cells": [{"cell": s.cell.id, "knobs": s.cell.knobs, "status": s.status, "round": s.round, "workspace": str(s.root)}
                      for s in plan.states]}


def _print_plan(plan: Any) -> None:
    from rich.table import Table

    from uniflow_cli.cli.console import out as stdout

    table = Table(title=f"grid {plan.grid.name}: {len(plan.states)} cells ({len(plan.todo())} to run) → {plan.rows}", title_justify="left")
    for column in ("#", "cell", *plan.grid.axes, "state"):
        table.add_column(column, justify="right" if column == "#" else "left")
    for i, s in enumerate(plan.states, 1):
        state = f"partial (round {s.round})" if s.status == "partial" else s.status
        table.add_row(str(i), s.cell.id, *(str(s.cell.knobs[a]) for a in plan.grid.axes), state)
    stdout.print(table)


@contextmanager
def _progress(console: Any, cells: int) -> Any:
    """A bar over the grid's cells and one for the round, client and step at hand; yields the event callback."""
    from uniflow_cli.cli.console import two_bars

    with two_bars(console, "sweep", "cells") as (progress, overall, detail):

        def on_event(event: Any) -> None:
            if event.kind == "start":
                progress.update(overall, total=event.total, completed=0, info=f"{cells - event.total} finished before")
            elif event.kind in ("cell", "finished"):
                progress.update(overall, completed=event.done, description=f"cell {event.cell}")
            elif event.kind == "simulate":
                sim = event.event
                if sim.kind == "step":
                    progress.update(detail, description=f"round {sim.round} · client {sim.client}", completed=sim.done, total=sim.total,
                                    info=f"loss {sim.loss:.4f}")
                elif sim.kind in ("aggregate", "evaluate"):
                    progress.update(detail, description=f"{sim.kind} round {sim.round}", completed=sim.done, total=sim.total, info="")
                elif sim.kind == "notice":
                    progress.console.print(f"[yellow]notice:[/yellow] {event.cell}: {sim.message}", soft_wrap=True)

        yield on_event


@app.command("report", epilog=REPORT_EPILOG)
def report(
    source: Annotated[Path, typer.Argument(metavar="DIR_OR_JSONL", help="A rows file, or a directory of them (e.g. docs/results/).",
                                           show_default=False)],
    out: Annotated[Path, typer.Option(*OUT_FLAGS, help="Output directory (must not exist unless --force).")] = Path("sweep-report"),
    metrics: Annotated[Optional[str], typer.Option("--metrics", help="Comma-separated table metrics (default: accuracy; qa: accuracy,"
                                                   "bert_f1); rel_error is the aggregation error.", show_default=False)] = None,
    baseline: Annotated[str, typer.Option("--baseline", help="The method every other is compared with, or AXIS=VALUE to compare along another axis (stages=joint); none: no comparison.")] = "fedit",
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Tables (mean ± std (n) over seeds, the paper's layout) and plots over rounds from a sweep's rows."""
    from uniflow_cli.sweep_report import make_sweep_report

    chosen = [m.strip() for m in metrics.split(",") if m.strip()] if metrics else None
    result = make_sweep_report(source, out, metrics=chosen, baseline=None if baseline == "none" else baseline, force=force)
    if as_json:
        from uniflow_cli.cli.console import print_json

        print_json(report_json(result, out))
        return
    from uniflow_cli.cli.console import out as stdout

    for name, data in result.files.items():
        if name.endswith(".md"):
            stdout.print(data.decode("utf-8"), markup=False, highlight=False, soft_wrap=True)
    stdout.print(f"[green]wrote[/green] {len(result.files)} file(s) to {out}", soft_wrap=True)


def report_json(result: Any, out: Path) -> dict[str, Any]:
    """The tables as data: per grid and metric, each row's labels and each column's mean, std, n."""
    grids = {}
    for grid, tables in result.grids.items():
        grids[grid] = [{"metric": t.metric, "axes": t.axes, "columns": t.columns, "rounds": t.rounds,
                        "rows": [{"labels": list(labels), "values": {c: {"mean": s.mean, "std": s.std, "n": s.n} for c, s in zip(t.columns, summaries)}}
                                 for labels, summaries in t.rows]} for t in tables]
    return {"out": str(out), "files": [str(out / name) for name in result.files], "grids": grids}
