"""``uniflow aggregate``: the server's round — fuse client adapters into a global adapter."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from uniflow_cli.cli.options import DtypeOpt, ForceOpt, OutDirOpt, RoundOpt, WorkspaceOpt

EPILOG = """[bold]Examples[/bold]

  [dim]# explicit paths[/dim]
  uniflow aggregate --method fedA2 --lambda 1 adapters/* --out global/

  [dim]# inside a workspace: fuse rounds/3/clients/* into rounds/3/global[/dim]
  uniflow aggregate --round 3

  [dim]# the Table 12 ablation: Tikhonov term everywhere, per-layer report[/dim]
  uniflow aggregate --method fedA2 --ridge always --lambda 0.1 a/ b/ c/ --out g/ --report g.json

Methods: fedit (FedIT), ffa (FFA-LoRA), fedsa (FedSA-LoRA), fedex (FedEx-LoRA), fedA2 (FedA²-LoRA),
svd (best rank-r of Σ w B A), flora (stacked factors)."""

MethodOpt = Annotated[
    Optional[str],
    typer.Option("--method", "-m", help="fedit | ffa | fedsa | fedex | fedA2 | svd | flora (default: workspace config, else fedA2).", show_default=False),
]


def aggregate(
    adapters: Annotated[Optional[list[Path]], typer.Argument(help="Client adapter directories.", show_default=False)] = None,
    method: MethodOpt = None,
    lambda_: Annotated[Optional[float], typer.Option("--lambda", help="Tikhonov λ of Eq. 13 (default 1.0).", show_default=False)] = None,
    ridge: Annotated[Optional[str], typer.Option("--ridge", help="auto: λ only where ĀĀᵀ is singular (Eq. 13); always: everywhere; never: plain least squares.", show_default=False)] = None,
    rcond: Annotated[float, typer.Option("--rcond", help="ĀĀᵀ counts as singular when λ_min ≤ rcond·λ_max.")] = 1e-7,
    weighting: Annotated[Optional[str], typer.Option("--weighting", help="examples (num_examples of each drop) or uniform.", show_default=False)] = None,
    weights: Annotated[Optional[str], typer.Option("--weights", help="Explicit client weights in input order, e.g. 3,1,2.", show_default=False)] = None,
    out: OutDirOpt = None,
    start: Annotated[Optional[Path], typer.Option("--start", help="The global adapter the clients started from (ffa's frozen A; default in a workspace: the previous round's global).", show_default=False)] = None,
    report: Annotated[Optional[Path], typer.Option("--report", help="Write the per-layer report as JSON.", show_default=False)] = None,
    dtype: DtypeOpt = "float32",
    round_: RoundOpt = None,
    workspace: WorkspaceOpt = None,
    wait: Annotated[bool, typer.Option("--wait", help="With --round: poll for drops until every expected client arrived, or until --timeout with at least --min-clients.")] = False,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for drops (and for another server's lock).")] = 600.0,
    min_clients: Annotated[int, typer.Option("--min-clients", help="Quorum: the fewest valid drops to aggregate.")] = 1,
    poll: Annotated[float, typer.Option("--poll", help="Seconds between scans of the drop directory.")] = 2.0,
    force: ForceOpt = False,
) -> None:
    """Fuse client LoRA adapters into one global adapter (the server side of a round)."""
    from uniflow_cli.aggregation import AggregationOptions
    from uniflow_cli.cli.console import err, notice
    from uniflow_cli.cli.console import out as stdout
    from uniflow_cli.cli.render import print_aggregate_outcome
    from uniflow_cli.errors import UsageError
    from uniflow_cli.server import parse_weights, run_aggregate, run_round, settings_for

    settings = settings_for(workspace if (round_ is not None or workspace is not None) else None, method, lambda_, ridge, weighting)
    inputs = list(adapters or [])
    options_kw = dict(method=settings.method, lambda_=settings.lambda_, ridge=settings.ridge, rcond=rcond)
    if round_ is not None:
        if inputs or out is not None:
            raise UsageError("--round reads rounds/T/clients and writes rounds/T/global", fix="drop the explicit adapters/--out, or drop --round")
        if start is not None:
            raise UsageError("--round uses the previous round's global as --start", fix="drop --start")
        options = AggregationOptions(**options_kw)
        with _progress(err) as (progress, task):
            progress.update(task, description=f"round {round_} ({options.method})")
            done = run_round(
                workspace, round_, options, weighting=settings.weighting, weights=parse_weights(weights), dtype=dtype, force=force,
                report_path=report, wait=wait, timeout=timeout, min_clients=min_clients, poll=poll, log=notice,
                on_layer=lambda n, total: progress.update(task, completed=n, total=total),
            )
        if done.outcome is None:
            stdout.print(f"round {round_} is already published ({workspace_global(workspace, round_)}); nothing to do")
            if done.late:
                notice(f"late drops not in that global: {', '.join(done.late)}")
            return
        for message in done.outcome.notices:
            notice(message)
        print_aggregate_outcome(done.outcome)
        return
    if out is None:
        raise UsageError("no output directory", fix="pass --out DIR (or --round T inside a workspace)")
    if wait:
        raise UsageError("--wait needs --round (it polls a workspace round's drop directory)", fix="add --round T")
    options = AggregationOptions(**options_kw)
    with _progress(err) as (progress, task):
        progress.update(task, description=options.method)
        outcome = run_aggregate(
            inputs, out, options, weighting=settings.weighting, weights=parse_weights(weights), dtype=dtype,
            force=force, report_path=report, start=start,
            on_layer=lambda done, total: progress.update(task, completed=done, total=total),
        )
    for message in outcome.notices:
        notice(message)
    print_aggregate_outcome(outcome)


def workspace_global(workspace: Optional[Path], t: int) -> Path:
    from uniflow_cli.workspace import find_workspace

    ws = find_workspace(workspace)
    return ws.global_dir(t)  # type: ignore[union-attr]


@contextmanager
def _progress(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]aggregate[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        yield progress, progress.add_task("", total=None)
