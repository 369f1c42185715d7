"""``uniflow local-train``: one client's round — two-stage LoRA training on its shard, adapter out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from uniflow_cli.cli.options import DtypeOpt, ForceOpt, RoundOpt, SeedOpt, WorkspaceOpt

EPILOG = """[bold]Examples[/bold]

  [dim]# inside a workspace: train on data/clients/3 from the latest global, drop rounds/t+1/clients/3[/dim]
  uniflow local-train --client 3 --stage-tau 0.25

  [dim]# explicit paths[/dim]
  uniflow local-train --global fed/rounds/2/global --data fed/data/clients/3 --out drop/ --steps 40

  [dim]# the paper's ablations[/dim]
  uniflow local-train --client 0 --stages joint
  uniflow local-train --client 0 --stage-by round --total-rounds 10 --stage-tau 0.5"""


def set_threads(threads: int | None) -> None:
    """``--threads N`` (shared with evaluate): a bad count is one line, not torch's RuntimeError."""
    if threads is None:
        return
    if threads < 1:
        from uniflow_cli.errors import UsageError

        raise UsageError(f"--threads {threads} must be >= 1", fix="use --threads 1 or more (or omit it: torch picks)")
    import torch

    torch.set_num_threads(threads)


def local_train(
    client: Annotated[Optional[str], typer.Option("--client", "-c", help="Client id (its shard is data/clients/<id>).", show_default=False)] = None,
    stage_tau: Annotated[Optional[float], typer.Option("--stage-tau", "--tau", help="τ of Eq. 7: share of local steps (or rounds) in stage I (encoders).", show_default=False)] = None,
    stages: Annotated[Optional[str], typer.Option("--stages", help="two-stage | joint | reverse | llm-only | encoder-only (default: the train table, else two-stage).", show_default=False)] = None,
    stage_by: Annotated[Optional[str], typer.Option("--stage-by", help="step: split each round's steps; round: stage I for rounds < τ·R (default: the train table, else step).", show_default=False)] = None,
    total_rounds: Annotated[Optional[int], typer.Option("--total-rounds", help="R, for --stage-by round.", show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Optimizer steps (default: workspace [train] steps).", show_default=False)] = None,
    epochs: Annotated[Optional[float], typer.Option("--epochs", help="Instead of --steps: passes over the shard.", show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", show_default=False)] = None,
    grad_accum: Annotated[Optional[int], typer.Option("--grad-accum", help="Micro-batches per optimizer step (default: the train table, else 1).", show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", show_default=False)] = None,
    weight_decay: Annotated[Optional[float], typer.Option("--weight-decay", help="AdamW weight decay (default: the train table, else 0).", show_default=False)] = None,
    max_length: Annotated[Optional[int], typer.Option("--max-length", help="Token budget of one training sequence (prompt + answer), applied while tokenising; "
                          "default 512, or the LLM's max_position_embeddings if fewer. Too long: the answer's tail is cut (the question too, "
                          "if it would leave the answer under a quarter); the summary counts the cut examples.", show_default=False)] = None,
    seed: SeedOpt = None,
    dtype: DtypeOpt = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads for torch (>= 1).", show_default=False)] = None,
    method: Annotated[Optional[str], typer.Option("--method", help="Override the method recorded in the global (fedit, ffa, fedsa, fedex, fedA2, svd, flora).", show_default=False)] = None,
    round_: RoundOpt = None,
    global_dir: Annotated[Optional[Path], typer.Option("--global", help="Explicit mode: the global adapter to start from.", show_default=False)] = None,
    data_dir: Annotated[Optional[Path], typer.Option("--data", help="Explicit mode: the client's shard.", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Explicit mode: where to publish the client adapter.", show_default=False)] = None,
    preset: Annotated[Optional[str], typer.Option("--preset", help="The model preset (explicit mode: default is the one the global records).", show_default=False)] = None,
    state_dir: Annotated[Optional[Path], typer.Option("--state", help="Client-private state dir (FedSA's B; needed for fedsa in explicit mode). Default in a workspace: state/clients/<id>.", show_default=False)] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the global of the round after this client's last drop (shared storage).")] = False,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait with --wait.")] = 600.0,
    workspace: WorkspaceOpt = None,
    force: ForceOpt = False,
) -> None:
    """Train one client for one round from the published global; publish its adapter atomically."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from uniflow_cli.cli.console import err, out as stdout
    from uniflow_cli.cli.render import human_bytes
    from uniflow_cli.local_train import run_local_train

    set_threads(threads)
    # Flags not given stay None: the library puts them over the workspace's [train] table (explicit mode
    # without --workspace: over the built-in defaults), so every [train] value a flag leaves alone counts.
    overrides = {"tau": stage_tau, "steps": steps, "epochs": epochs, "batch_size": batch_size, "grad_accum": grad_accum, "lr": lr,
                 "weight_decay": weight_decay, "max_length": max_length, "seed": seed, "stages": stages, "stage_by": stage_by, "dtype": dtype}
    with Progress(TextColumn("[bold]local-train[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=True) as progress:
        task = progress.add_task(f"client {client or ''}", total=None, loss="-")
        outcome = run_local_train(
            overrides=overrides, client=client, workspace=workspace, global_dir=global_dir, data_dir=data_dir, out=out, method=method,
            round_=round_, total_rounds=total_rounds, preset=preset, state_dir=state_dir, force=force,
            wait=wait, timeout=timeout, on_wait=lambda message: progress.update(task, description=message),
            on_step=lambda done, total, loss, stage: progress.update(task, completed=done, total=total, loss=f"{loss:.4f} ({stage})"),
        )
    s = outcome.stats
    per_stage = ", ".join(f"{k} {v}" for k, v in s.steps_per_stage.items())
    stdout.print(
        f"[green]published[/green] {outcome.out}  round {outcome.round}, method {outcome.method}, {s.num_examples} examples, "
        f"{s.steps} steps ({per_stage}), loss {s.first_loss:.4f} → {s.last_loss:.4f}, {s.seconds:.1f} s, "
        f"upload {human_bytes(outcome.upload_bytes)}" + (f"; private B kept in {outcome.state_dir}" if outcome.state_dir else "")
        + (f"; folded rounds {outcome.folded_rounds} into the base" if outcome.folded_rounds else "")
        + (f"; {s.truncated} of {s.num_examples} examples cut to {s.max_length} tokens" if s.truncated else ""),
        soft_wrap=True,
    )
