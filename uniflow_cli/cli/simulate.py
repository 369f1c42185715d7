"""``uniflow simulate``: R rounds of local-train per client + aggregate in one process, the base loaded once."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Annotated, Any

import typer

from uniflow_cli.cli.examples import epilog
from uniflow_cli.cli.options import (
    DeviceOpt,
    GradientCheckpointingOpt,
    JsonOpt,
    MethodOpt,
    PrecisionOpt,
    ThreadsOpt,
    WorkspaceOpt,
)

EXAMPLES = [
    ("inside a workspace: publish rounds up to 10, every partitioned client each round, in one process", "uniflow simulate --rounds 10"),
    ("FedA²-LoRA, half the clients per round (a seeded sample), evaluated every 5 rounds and at the last",
     "uniflow simulate --rounds 20 --method fedA2 --fraction 0.5 --eval-every 5"),
    ("two clients only, on a GPU in bf16", "uniflow simulate -w fed --rounds 3 --clients 0,2 --device cuda --precision bf16"),
    ("after a kill: the same command goes on from the last published round", "uniflow simulate --rounds 10"),
]
EPILOG = epilog(EXAMPLES, [(
    "Each round writes what local-train per client and aggregate --round write (rounds/T/clients/K, rounds/T/global, "
    "rounds/T/report.json, FedSA's/FedDPA's state/clients/K), byte for byte the same for the same threads, device and precision; "
    "--eval-every writes eval/round-T.json as uniflow evaluate does (FedSA/FedDPA: also each trained client's personalised model, "
    "eval/clients/K/round-T.json). Training settings come from the workspace's [train] "
    "table. See docs/federation.md."),
])


# Long only by its signature: one Typer parameter per option; the body is parse → one library call → print.
def simulate(
    rounds: Annotated[int, typer.Option("--rounds", help="The last round to publish (a workspace at round 3 with --rounds 5 runs rounds 4 and 5).",
                                        show_default=False)],
    method: MethodOpt = None,
    clients: Annotated[str | None, typer.Option("--clients", help="Client ids, comma-separated, or all (default: every client of "
                                                   "data/partition.json).", show_default=False)] = None,
    fraction: Annotated[float | None, typer.Option("--fraction", help="Each round trains this share of the clients, a sample drawn "
                                                      "from the \\[train] seed and the round (default: all).", show_default=False)] = None,
    eval_every: Annotated[int | None, typer.Option("--eval-every", help="Evaluate the global every N rounds and at the last "
                                                      "(eval/round-T.json, as uniflow evaluate).", show_default=False)] = None,
    eval_limit: Annotated[int | None, typer.Option("--eval-limit", help="With --eval-every: the first N test samples per modality "
                                                      "(evaluate's --limit; default: all).", show_default=False)] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="With --eval-every: greedy generation length.")] = 16,
    fidelity: Annotated[bool, typer.Option("--fidelity", help="After each round, its function-space gap: the loss of the global "
                                           "against the exact one (W0 + U) on the clients' shards and the test split "
                                           "(rounds/T/fidelity.json).")] = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = None,
    gradient_checkpointing: GradientCheckpointingOpt = False,
    threads: ThreadsOpt = None,
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run rounds of the federation in one process: every client's local-train, then aggregate, per round."""
    from uniflow_cli.cli.console import err, print_json
    from uniflow_cli.compute import set_threads
    from uniflow_cli.evaluation import EvalOptions
    from uniflow_cli.simulate import run_simulation

    set_threads(threads)
    options = EvalOptions(max_new_tokens=max_new_tokens, limit=eval_limit)
    chosen = None if clients is None else [c for c in clients.split(",") if c.strip()]
    with _progress(err) as on_progress:
        outcome = run_simulation(workspace, rounds, method=method, clients=chosen, fraction=fraction, eval_every=eval_every,
                                 eval_options=options, device=device, precision=precision, gradient_checkpointing=gradient_checkpointing,
                                 on_progress=on_progress, fidelity=fidelity)
    if as_json:  # notices went to stderr as they came (the progress bar's console)
        print_json(simulate_json(outcome))
        return
    _print(outcome)


def simulate_json(outcome: Any) -> dict[str, Any]:
    """``--json``: the rounds published (who trained, the aggregation error, the times), the evaluations."""
    return {
        "workspace": outcome.workspace, "method": outcome.method, "rounds": outcome.rounds, "resumed_from": outcome.resumed_from,
        "published": [{"round": r.round, "clients": r.clients, "retrained": r.retrained, "global": r.global_dir, "report": r.report,
                       "rel_error_mean": r.rel_error_mean, "train_seconds": r.train_seconds, "aggregate_seconds": r.aggregate_seconds,
                       "published_here": r.published, "fidelity": _fidelity(r)} for r in outcome.records],
        "evaluations": outcome.evaluations, "model_builds": outcome.model_builds, "build_seconds": outcome.build_seconds,
        "seconds": outcome.seconds, "notices": outcome.notices,
    }


def _fidelity(record: Any) -> dict[str, Any] | None:
    import json

    return json.loads(record.fidelity.read_text()) if record.fidelity is not None else None


def _print(outcome: Any) -> None:
    from rich.table import Table

    from uniflow_cli.cli.console import out as stdout
    from uniflow_cli.cli.render import fmt

    if not outcome.records:
        stdout.print(f"{outcome.workspace} already has round {outcome.resumed_from} published (--rounds {outcome.rounds}); nothing to train"
                     + (f"; wrote {len(outcome.evaluations)} evaluation(s)" if outcome.evaluations else ""), soft_wrap=True)
        return
    table = Table(title=f"{outcome.method}: rounds {outcome.records[0].round}..{outcome.records[-1].round}", title_justify="left")
    gaps = any(r.fidelity is not None for r in outcome.records)
    for column in ("round", "clients", "mean ‖s·BA−U‖/‖U‖", *(("loss gap train", "loss gap test") if gaps else ()), "train s", "aggregate s"):
        table.add_column(column, justify="right" if column != "clients" else "left")
    for r in outcome.records:
        who = ", ".join(r.clients) + (f" (retrained {', '.join(r.retrained)})" if r.retrained else "")
        gap = _fidelity(r) or {}
        table.add_row(str(r.round), who, fmt(r.rel_error_mean), *((fmt(gap.get("gap_train")), fmt(gap.get("gap_test"))) if gaps else ()),
                      f"{r.train_seconds:.1f}", f"{r.aggregate_seconds:.1f}")
    stdout.print(table)
    resumed = f", resumed after round {outcome.resumed_from}" if outcome.resumed_from else ""
    stdout.print(f"[green]published[/green] rounds {outcome.records[0].round}..{outcome.records[-1].round} in {outcome.workspace / 'rounds'} "
                 f"in {outcome.seconds:.1f} s{resumed}; {outcome.model_builds} model build(s), {outcome.build_seconds:.1f} s"
                 + (f"; wrote {', '.join(str(p) for p in outcome.evaluations)}" if outcome.evaluations else ""), soft_wrap=True)


@contextmanager
def _progress(console: Any) -> Any:
    """A bar over rounds × clients and one for the step, layer or batch at hand; yields the event callback."""
    from uniflow_cli.cli.console import two_bars

    with two_bars(console, "simulate", "rounds × clients") as (progress, overall, detail):

        def on_progress(event: Any) -> None:
            if event.kind == "plan":
                progress.update(overall, total=event.total, completed=0)
            elif event.kind == "client":
                progress.update(overall, completed=event.done, description=f"round {event.round} · client {event.client}")
                progress.update(detail, description="training", completed=0, total=None, info="")
            elif event.kind == "step":
                progress.update(detail, completed=event.done, total=event.total, info=f"loss {event.loss:.4f} ({event.stage})")
            elif event.kind == "aggregate":
                progress.update(detail, description=f"aggregate round {event.round}", completed=event.done, total=event.total, info="")
            elif event.kind == "published":
                progress.update(overall, completed=event.done, description=f"round {event.round} published")
            elif event.kind == "evaluate":
                who = f" client {event.client}" if event.client is not None else ""
                progress.update(detail, description=f"evaluate round {event.round}{who}", completed=event.done, total=event.total,
                                info=event.message or "")
            elif event.kind == "notice":
                progress.console.print(f"[yellow]notice:[/yellow] {event.message}", soft_wrap=True)

        yield on_progress
