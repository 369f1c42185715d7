"""``uniflow evaluate``: score a global adapter (or the untrained base) on the test split, per modality."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from uniflow_cli.cli.examples import Example, epilog
from uniflow_cli.cli.options import (
    BATCH_SIZE_FLAGS,
    DeviceOpt,
    JsonOpt,
    PrecisionOpt,
    QuantizeOpt,
    DATA_FLAGS,
    LIMIT_FLAGS,
    OUT_FLAGS,
    ForceOpt,
    RoundOpt,
    ThreadsOpt,
    WorkspaceOpt,
    client_option,
    preset_option,
)

if TYPE_CHECKING:  # pragma: no cover  (the library imports stay lazy: --help must be fast)
    from uniflow_cli.eval_target import EvalRequest
    from uniflow_cli.evaluation import EvalOptions, EvalResult

EXAMPLES: list[Example] = [
    ("inside a workspace: score the latest published round on every test split", "uniflow evaluate"),
    ("round 3, and the untrained base (the paper's \"–\" row)", "uniflow evaluate --round 3"),
    ("", "uniflow evaluate --base"),
    ("explicit paths: an adapter on one or more splits (model settings: the ones the adapter records)",
     "uniflow evaluate --adapter rounds/5/global --data data/test/image --data data/test/audio --out eval.json"),
    ("... or from a preset (an adapter that records none; a workspace is read only with --workspace)",
     "uniflow evaluate --adapter other/global --data data/test/text --preset smol --out eval.json"),
    ("FedSA: client 0's personalised model of round 3 (writes eval/clients/0/round-3.json)", "uniflow evaluate --round 3 --client 0"),
    ("only some test splits, on purpose (otherwise every split data/partition.json lists must be there)",
     "uniflow evaluate --round 3 --modalities image,text"),
    ("quick look: 20 samples per modality, short answers", "uniflow evaluate --round 2 --limit 20 --max-new-tokens 8 --out /tmp/r2.json"),
    ("on a GPU in bf16 (default: the device auto-detected, the workspace's [train] precision)", "uniflow evaluate --round 2 --device cuda --precision bf16"),
]
EPILOG = epilog(EXAMPLES, [
    "Writes eval/round-<T>.json (workspace) or --out FILE: Acc (teacher-forced token accuracy), EM, BLEU, ROUGE-L and BERTScore "
    "P/R/F1 per modality and overall (metrics.overall.modalities says which it pools), the config, and a few predictions. Prompts "
    "are cut to the model's max length (512 tokens, or fewer positions). See docs/evaluation.md.",
])


def evaluate(
    round: RoundOpt = None,
    base: Annotated[bool, typer.Option("--base", help="Evaluate the untrained model (round 0: B = 0).")] = False,
    adapter: Annotated[
        Optional[Path], typer.Option("--adapter", "-a", help="Explicit adapter directory (needs --data).", show_default=False)
    ] = None,
    data: Annotated[
        Optional[list[Path]],
        typer.Option(*DATA_FLAGS, help="Explicit split directory (repeatable); rows are grouped by their modality.", show_default=False),
    ] = None,
    preset: Annotated[
        Optional[str],
        preset_option("Explicit mode: the base model (default: the adapter's recorded settings, else --workspace's uniflow.toml).",
                      show_default=False),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Greedy generation length.")] = 16,
    limit: Annotated[
        Optional[int], typer.Option(*LIMIT_FLAGS, min=1, help="First N samples per modality (default: all).", show_default=False)
    ] = None,
    batch_size: Annotated[int, typer.Option(*BATCH_SIZE_FLAGS, min=1, help="Samples per forward/generate batch.")] = 8,
    bertscore_model: Annotated[
        Optional[Path],
        typer.Option("--bertscore-model", help="Local HF encoder dir for BERTScore (default: embedded all-MiniLM-L6-v2).", show_default=False),
    ] = None,
    bertscore_layers: Annotated[
        Optional[int], typer.Option("--bertscore-layers", min=1, help="BERTScore layer (default: 6 for the embedded model, else the last).", show_default=False)
    ] = None,
    client: Annotated[
        Optional[str], client_option("FedSA/FedDPA: client K's personalised model (FedSA: the global A + its private B; FedDPA: the global + its local adapter).")
    ] = None,
    modalities: Annotated[
        Optional[str],
        typer.Option("--modalities", help="Evaluate only these modalities, comma-separated (default: every test split; "
                     "a split data/partition.json lists must then be present).", show_default=False),
    ] = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = None,
    quantize: QuantizeOpt = None,
    threads: ThreadsOpt = None,
    out: Annotated[
        Optional[Path], typer.Option(*OUT_FLAGS, help="Eval JSON to write (default in a workspace: eval/round-<T>.json).", show_default=False)
    ] = None,
    force: ForceOpt = False,
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Evaluate a global adapter: token accuracy, EM, BLEU, ROUGE-L and BERTScore per modality."""
    from uniflow_cli.compute import set_threads
    from uniflow_cli.eval_target import EvalRequest
    from uniflow_cli.evaluation import EvalOptions

    set_threads(threads)
    request = EvalRequest(workspace=workspace, round=round, base=base, adapter=adapter, data=tuple(data or ()), preset=preset, out=out,
                          force=force, client=client, modalities=None if modalities is None else modalities.split(","))
    options = EvalOptions(max_new_tokens=max_new_tokens, batch_size=batch_size, limit=limit, bertscore_model=bertscore_model,
                          bertscore_layers=bertscore_layers, device=device, precision=precision,
                          quantize=quantize)
    result = _run(request, options)
    if as_json:
        from uniflow_cli.cli.console import notice, print_json

        for message in result.notices:
            notice(message)
        print_json({"path": result.path, "round": result.round, "notices": result.notices, **result.payload})
        return
    _print(result, client)


def _run(request: EvalRequest, options: EvalOptions) -> EvalResult:
    """run_evaluate under a progress bar (the boundary tells its messages about the request with this command's flags)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from uniflow_cli.cli.console import err
    from uniflow_cli.evaluation import run_evaluate

    columns = (TextColumn("[bold]evaluate[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task("checking inputs", total=None)
        return run_evaluate(
            request,
            options,
            on_batch=lambda done, total, phase: progress.update(task, description=phase, completed=done, total=total),
            on_status=lambda message: progress.update(task, description=message),
        )


def _print(result: EvalResult, client: Optional[str]) -> None:
    from rich.table import Table

    from uniflow_cli.cli.console import notice
    from uniflow_cli.cli.console import out as console
    from uniflow_cli.metrics import METRIC_TITLES, OVERALL, metric_keys_of

    for message in result.notices:  
        notice(message)
    metrics = result.payload["metrics"]  
    what = result.payload["adapter"]["path"] or "untrained base"  
    if client is not None:
        what = f"{what} + client {client}'s private state"
    for modality, values in metrics.items():
        name = f"{OVERALL} ({', '.join(values.get('modalities', []))})" if modality == OVERALL else modality
        table = Table(title=f"{name} · round {result.round} (%)", title_justify="left")  
        keys = metric_keys_of(result.payload)  # a classify eval: acc, macro_f1
        for key in keys:
            table.add_column(METRIC_TITLES[key], justify="right")
        table.add_column("n", justify="right")
        table.add_row(*("n/a" if values[key] is None else f"{values[key]:.2f}" for key in keys), str(values["n"]))
        console.print(table)
    console.print(f"evaluated {what}; wrote {result.path}", soft_wrap=True)  
