"""``uniflow local-train``: one client's round — two-stage LoRA training on its shard, adapter out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from uniflow_cli.cli.examples import epilog
from uniflow_cli.cli.options import (
    BATCH_SIZE_FLAGS, DATA_FLAGS, OUT_FLAGS, ClientOpt, DeviceOpt, DtypeOpt, ForceOpt, GradientCheckpointingOpt, JsonOpt, PrecisionOpt, QuantizeOpt,
    RoundOpt, SeedOpt, TauOpt, ThreadsOpt, WorkspaceOpt, method_option, preset_option,
)

EXAMPLES = [
    ("inside a workspace: client 3 trains from the latest global and drops rounds/t+1/clients/3", "uniflow local-train --client 3"),
    ("the paper's τ (share of stage-I steps) and a longer round", "uniflow local-train --client 3 --stage-tau 0.25 --steps 40"),
    ("explicit paths (the model comes from what the global records)",
     "uniflow local-train --global fed/rounds/2/global --data fed/data/clients/3 --out drop/ --steps 40"),
    ("the paper's ablations", "uniflow local-train --client 0 --stages joint"),
    ("", "uniflow local-train --client 0 --stage-by round --total-rounds 10 --stage-tau 0.5"),
    ("a client on shared storage: wait for each round's global", "uniflow local-train --client 3 --wait --timeout 3600"),
    ("a GPU (or the CPU) in bf16, with less memory for the activations",
     "uniflow local-train --client 3 --device cuda --precision bf16 --gradient-checkpointing"),
]
EPILOG = epilog(EXAMPLES, ["Flags not given fall back to the workspace's [train] table, then to the built-in defaults."])


# Long only by its signature: one Typer parameter per option; the body is parse → one library call → print.
def local_train(
    client: ClientOpt = None,
    stage_tau: TauOpt = None,
    stages: Annotated[Optional[str], typer.Option("--stages", help="two-stage | joint | reverse | llm-only | encoder-only (default: the train table, else two-stage).", show_default=False)] = None,
    stage_by: Annotated[Optional[str], typer.Option("--stage-by", help="step: split each round's steps; round: stage I for rounds < τ·R (default: the train table, else step).", show_default=False)] = None,
    total_rounds: Annotated[Optional[int], typer.Option("--total-rounds", help="R, for --stage-by round.", show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Optimizer steps (default: the workspace's \\[train] steps, else 20).", show_default=False)] = None,
    epochs: Annotated[Optional[float], typer.Option("--epochs", help="Instead of --steps: passes over the shard.", show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option(*BATCH_SIZE_FLAGS, help="Samples per micro-batch (default: the train table, else 4).", show_default=False)] = None,
    grad_accum: Annotated[Optional[int], typer.Option("--grad-accum", help="Micro-batches per optimizer step (default: the train table, else 1).", show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak AdamW learning rate (default: the train table, else 2e-4).", show_default=False)] = None,
    weight_decay: Annotated[Optional[float], typer.Option("--weight-decay", help="AdamW weight decay (default: the train table, else 0).", show_default=False)] = None,
    max_length: Annotated[Optional[int], typer.Option("--max-length", help="Token budget of one training sequence (prompt + answer), applied while tokenising; "
                          "default 512, or the LLM's max_position_embeddings if fewer. Too long: the answer's tail is cut (the question too, "
                          "if it would leave the answer under a quarter); the summary counts the cut examples.", show_default=False)] = None,
    seed: SeedOpt = None,
    dtype: DtypeOpt = None,
    precision: PrecisionOpt = None,
    quantize: QuantizeOpt = None,
    device: DeviceOpt = "auto",
    gradient_checkpointing: GradientCheckpointingOpt = False,
    threads: ThreadsOpt = None,
    method: Annotated[Optional[str], method_option("Override the method recorded in the global:", show_default=False)] = None,
    round_: RoundOpt = None,
    global_dir: Annotated[Optional[Path], typer.Option("--global", help="Explicit mode: the global adapter to start from.", show_default=False)] = None,
    data_dir: Annotated[Optional[Path], typer.Option(*DATA_FLAGS, help="Explicit mode: the client's shard.", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option(*OUT_FLAGS, help="Explicit mode: where to publish the client adapter.", show_default=False)] = None,
    preset: Annotated[Optional[str], preset_option("Explicit mode: default is the one the global records.", show_default=False)] = None,
    rank: Annotated[Optional[int], typer.Option("--rank", help="Train at this LoRA rank (<= the global's; heterogeneous ranks: "
                                                "the client starts from the global's first components). Default: the workspace's "
                                                "\\[lora] client_ranks, else the global's r.", show_default=False)] = None,
    state_dir: Annotated[Optional[Path], typer.Option("--state", help="Client-private state dir (FedSA's B; needed for fedsa in explicit mode). Default in a workspace: state/clients/<id>.", show_default=False)] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the global of the round after this client's last drop (shared storage).")] = False,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait with --wait.")] = 600.0,
    workspace: WorkspaceOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Train one client for one round from the published global; publish its adapter atomically."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from uniflow_cli.cli.console import err, print_json
    from uniflow_cli.cli.console import out as stdout
    from uniflow_cli.cli.render import human_bytes
    from uniflow_cli.compute import set_threads
    from uniflow_cli.local_train import run_local_train

    set_threads(threads)  # None: $UNIFLOW_THREADS, else $OMP_NUM_THREADS, else this process's physical cores
    # Flags not given stay None: the library puts them over the workspace's [train] table (explicit mode
    # without --workspace: over the built-in defaults), so every [train] value a flag leaves alone counts.
    overrides = {"tau": stage_tau, "steps": steps, "epochs": epochs, "batch_size": batch_size, "grad_accum": grad_accum, "lr": lr,
                 "weight_decay": weight_decay, "max_length": max_length, "seed": seed, "stages": stages, "stage_by": stage_by, "dtype": dtype,
                 "precision": precision, "quantize": quantize}
    with Progress(TextColumn("[bold]local-train[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=True) as progress:
        task = progress.add_task(f"client {client or ''}", total=None, loss="-")
        outcome = run_local_train(
            overrides=overrides, client=client, workspace=workspace, global_dir=global_dir, data_dir=data_dir, out=out, method=method,
            round_=round_, total_rounds=total_rounds, preset=preset, state_dir=state_dir, rank=rank, force=force, device=device,
            gradient_checkpointing=gradient_checkpointing, wait=wait, timeout=timeout, on_wait=lambda message: progress.update(task, description=message),
            on_step=lambda done, total, loss, stage: progress.update(task, completed=done, total=total, loss=f"{loss:.4f} ({stage})"),
        )
    if as_json:
        print_json(local_train_json(outcome))
        return
    s = outcome.stats
    per_stage = ", ".join(f"{k} {v}" for k, v in s.steps_per_stage.items())
    stdout.print(
        f"[green]published[/green] {outcome.out}  round {outcome.round}, method {outcome.method}, {s.num_examples} examples, "
        f"{s.steps} steps ({per_stage}), loss {s.first_loss:.4f} → {s.last_loss:.4f}, {s.seconds:.1f} s, "
        f"upload {human_bytes(outcome.upload_bytes)}" + (f"; client state kept in {outcome.state_dir}" if outcome.state_dir else "")
        + (f"; folded rounds {outcome.folded_rounds} into the base" if outcome.folded_rounds else "")
        + (f"; {s.truncated} of {s.num_examples} examples cut to {s.max_length} tokens" if s.truncated else ""),
        soft_wrap=True,
    )


def local_train_json(outcome: Any) -> dict[str, Any]:
    """``--json``: where the drop went and what the round did (the same facts as the summary line)."""
    s = outcome.stats
    return {"out": outcome.out, "round": outcome.round, "method": outcome.method, "num_examples": s.num_examples, "steps": s.steps,
            "steps_per_stage": s.steps_per_stage, "first_loss": s.first_loss, "last_loss": s.last_loss, "seconds": s.seconds,
            "tokens": s.tokens, "truncated": s.truncated, "max_length": s.max_length, "upload_bytes": outcome.upload_bytes,
            "state_dir": outcome.state_dir, "folded_rounds": outcome.folded_rounds}
