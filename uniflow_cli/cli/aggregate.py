"""``uniflow aggregate``: the server's round — fuse client adapters into a global adapter."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from uniflow_cli.cli.examples import epilog
from uniflow_cli.cli.options import DtypeOpt, ForceOpt, JsonOpt, MethodOpt, OutDirOpt, RoundOpt, WorkspaceOpt

EXAMPLES = [
    ("inside a workspace: fuse rounds/3/clients/* into rounds/3/global", "uniflow aggregate --round 3"),
    ("explicit paths", "uniflow aggregate --method fedA2 --lambda 1 adapters/* --out global/"),
    ("the Table 12 ablation: Tikhonov term everywhere, per-layer report", "uniflow aggregate --method fedA2 --ridge always --lambda 0.1 a/ b/ c/ --out g/ --report g.json"),
    ("the server of a shared-storage federation: wait for a quorum", "uniflow aggregate --round 3 --wait --min-clients 2 --timeout 1800"),
    ("update defenses: bound each client's update per layer, median instead of every weighted sum",
     "uniflow aggregate --round 3 --clip-update-norm 1.0 --robust median"),
]
EPILOG = epilog(EXAMPLES, ["Methods: fedit (FedIT), ffa (FFA-LoRA), fedsa (FedSA-LoRA), fedex (FedEx-LoRA), fedA2 (FedA²-LoRA), "
                           "svd (best rank-r of Σ w B A), flora (stacked factors)."])


# Long only by its signature: one Typer parameter per option; the body is parse → one library call → print.
def aggregate(
    adapters: Annotated[Optional[list[Path]], typer.Argument(help="Client adapter directories.", show_default=False)] = None,
    method: MethodOpt = None,
    lambda_: Annotated[Optional[float], typer.Option("--lambda", help="Tikhonov λ of Eq. 13 (default 1.0).", show_default=False)] = None,
    ridge: Annotated[Optional[str], typer.Option("--ridge", help="auto: λ only where ĀĀᵀ is singular (Eq. 13); always: everywhere; never: plain least squares.", show_default=False)] = None,
    rcond: Annotated[Optional[float], typer.Option("--rcond", help="ĀĀᵀ counts as singular when λ_min ≤ rcond·λ_max (default 1e-7).", show_default=False)] = None,
    weighting: Annotated[Optional[str], typer.Option("--weighting", help="examples (num_examples of each drop) or uniform.", show_default=False)] = None,
    weights: Annotated[Optional[str], typer.Option("--weights", help="Explicit client weights in input order, e.g. 3,1,2.", show_default=False)] = None,
    clip_update_norm: Annotated[Optional[float], typer.Option("--clip-update-norm", help="Bound each client's update of each layer, ‖ΔW_k − ΔW_start‖_F from the global it started from, to this norm (needs the start).", show_default=False)] = None,
    robust: Annotated[Optional[str], typer.Option("--robust", help="median | trimmed-mean:β (β in (0, 0.5)): a coordinate-wise robust sum in place of every weighted sum.", show_default=False)] = None,
    out: OutDirOpt = None,
    start: Annotated[Optional[Path], typer.Option("--start", help="The global adapter the clients started from (ffa's frozen A; default in a workspace: the previous round's global).", show_default=False)] = None,
    report: Annotated[Optional[Path], typer.Option("--report", help="Write the per-layer report as JSON.", show_default=False)] = None,
    dtype: DtypeOpt = "float32",
    as_json: JsonOpt = False,
    round_: RoundOpt = None,
    workspace: WorkspaceOpt = None,
    wait: Annotated[bool, typer.Option("--wait", help="With --round: poll for drops until every expected client arrived, or until --timeout with at least --min-clients.")] = False,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for drops (and for another server's lock).")] = 600.0,
    min_clients: Annotated[int, typer.Option("--min-clients", help="Quorum: the fewest valid drops to aggregate.")] = 1,
    poll: Annotated[float, typer.Option("--poll", help="Seconds between scans of the drop directory.")] = 2.0,
    force: ForceOpt = False,
) -> None:
    """Fuse client LoRA adapters into one global adapter (the server side of a round)."""
    from uniflow_cli.cli.console import err, notice, print_json
    from uniflow_cli.cli.console import out as stdout
    from uniflow_cli.cli.render import print_aggregate_outcome
    from uniflow_cli.errors import UsageError
    from uniflow_cli.server import OutputOptions, WaitOptions, run_aggregate, run_round
    from uniflow_cli.settings import AggregateSettings, resolve
    from uniflow_cli.workspace import find_workspace

    inputs = list(adapters or [])
    if round_ is not None and (inputs or out is not None or start is not None):
        raise UsageError("--round reads rounds/T/clients, starts from rounds/T-1/global and writes rounds/T/global",
                         fix="drop the explicit adapters/--out/--start, or drop --round")
    if round_ is None and out is None:
        raise UsageError("no output directory", fix="pass --out DIR (or --round T inside a workspace)")
    if round_ is None and wait:
        raise UsageError("--wait needs --round (it polls a workspace round's drop directory)", fix="add --round T")
    # Explicit mode uses only what it is given: a workspace's [aggregate] defaults only with --workspace.
    ws = find_workspace(workspace) if (round_ is not None or workspace is not None) else None
    settings = resolve(AggregateSettings, ws, {"method": method, "lambda_": lambda_, "ridge": ridge, "weighting": weighting, "rcond": rcond,
                                               "clip_update_norm": clip_update_norm, "robust": robust})
    output = OutputOptions(dtype=dtype, force=force, report_path=report)
    with _progress(err) as (progress, task):
        progress.update(task, description=f"round {round_} ({settings.method})" if round_ is not None else settings.method)
        on_layer = lambda n, total: progress.update(task, completed=n, total=total)  # noqa: E731
        if round_ is not None:
            assert ws is not None
            waiting = WaitOptions(wait=wait, timeout=timeout, min_clients=min_clients, poll=poll)
            done = run_round(ws, round_, settings, weights=parse_weights(weights), output=output, waiting=waiting, log=notice, on_layer=on_layer)
            outcome = done.outcome
        else:
            outcome = run_aggregate(inputs, out, settings, weights=parse_weights(weights), output=output, start=start, on_layer=on_layer)
    if outcome is None:
        if as_json:
            print_json({"round": round_, "published": False, "out": ws.global_dir(round_), "late": done.late})  # type: ignore[union-attr,arg-type]
        else:
            stdout.print(f"round {round_} is already published ({ws.global_dir(round_)}); nothing to do")  # type: ignore[union-attr,arg-type]
        if done.late:
            notice(f"late drops not in that global: {', '.join(done.late)}")
        return
    for message in outcome.notices:
        notice(message)
    if as_json:
        print_json(aggregate_json(outcome, round_))
    else:
        print_aggregate_outcome(outcome)


def aggregate_json(outcome: Any, round_: int | None) -> dict[str, Any]:
    """``--json``: the method's summary, the clients fused and the sizes (the per-layer rows are in --report)."""
    return {"round": round_, "published": True, "out": outcome.out, **outcome.result.summary(), "clients": outcome.clients,
            "tensor_bytes": outcome.tensor_bytes, "residual_bytes": outcome.residual_bytes, "notices": outcome.notices}


def parse_weights(text: str | None) -> list[float] | None:
    """``--weights 3,1,2`` → [3.0, 1.0, 2.0]; a clear error names the bad entry."""
    from uniflow_cli.errors import UsageError

    if text is None:
        return None
    values = []
    for part in text.split(","):
        try:
            values.append(float(part))
        except ValueError:
            raise UsageError(f"--weights entry {part.strip()!r} is not a number", fix="e.g. --weights 3,1,2") from None
    return values


@contextmanager
def _progress(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]aggregate[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        yield progress, progress.add_task("", total=None)
