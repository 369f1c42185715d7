"""``uniflow partition``: split datasets into federated client shards and per-modality test sets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from uniflow_cli.cli.examples import Example, epilog
from uniflow_cli.cli.options import DatasetOpt, ForceOpt, JsonOpt, OutDirOpt, SeedOpt, WorkspaceOpt

EXAMPLES: list[Example] = [
    ("the paper's setting: 5 image + 5 audio clients, Dirichlet label skew, into the workspace fed/",
     "uniflow partition --dataset easy-vqa --dataset spoken-qa --clients image:5,audio:5 --scheme dirichlet --alpha 0.5 "
     "--train-per-client 2000 --test-per-modality 200 --seed 0 --workspace fed"),
    ("every built-in dataset, mixed clients too, and a heat map of label shares",
     "uniflow partition -d easy-vqa -d spoken-qa -d text-qa --clients image:2,audio:2,mixed:3 --out data/ --plot"),
    ("your own file, its columns named, with quantity skew",
     "uniflow partition -d my_qa.jsonl --question-column prompt --answer-column reply --clients mixed:4 --scheme quantity --alpha 1 --out data/"),
    ("the per-client summary as JSON", "uniflow partition -d text-qa --clients text:3 --out data/ --json | jq '.partition.clients[].count'"),
]
EPILOG = epilog(EXAMPLES, [
    "Built-in datasets: easy-vqa (image), spoken-qa (audio, spoken by espeak-ng), text-qa (text); for classification snli "
    "(premise/hypothesis, 3 labels) and rotten-tomatoes (2 labels), text too, whose answer is the class (label skew: --scheme dirichlet). A path may be a .jsonl/.json/.csv/.parquet "
    "file (media paths relative to it), a save_to_disk directory, or an image/audio folder with metadata.jsonl (file_name, question, answer). "
    "Media paths must stay inside the dataset's directory (symlinks followed) unless --allow-media-outside DIR names another trusted directory.",
    "Writes DATA/clients/<k>/, DATA/test/<modality>/ and DATA/partition.json (DATA = WORKSPACE/data or --out).",
])


# Long only by its signature: one Typer parameter per option; the body is parse → one library call → print.
def partition(
    dataset: DatasetOpt,
    # No -c: that is --client (one client id) in local-train and evaluate.
    clients: Annotated[
        str, typer.Option("--clients", help="Clients per kind, KIND:COUNT with KIND image|audio|text|mixed, e.g. image:5,audio:5.", show_default=False)
    ],
    scheme: Annotated[str, typer.Option("--scheme", help="iid | dirichlet (label skew) | quantity (size skew).")] = "iid",
    alpha: Annotated[float, typer.Option("--alpha", help="Dirichlet concentration for dirichlet/quantity; smaller = more skew.")] = 0.5,
    train_per_client: Annotated[
        Optional[int], typer.Option("--train-per-client", help="Training rows per client (default: all rows, split evenly).", show_default=False)
    ] = None,
    test_per_modality: Annotated[int, typer.Option("--test-per-modality", help="Held-out test rows per modality.")] = 200,
    label_column: Annotated[
        Optional[str], typer.Option("--label-column", help="Column whose values drive label skew (default: the answer).", show_default=False)
    ] = None,
    question_column: Annotated[str, typer.Option("--question-column", help="Question column of user datasets.")] = "question",
    answer_column: Annotated[str, typer.Option("--answer-column", help="Answer column of user datasets.")] = "answer",
    media_column: Annotated[
        Optional[str],
        typer.Option("--media-column", help="Image/audio column of user datasets (default: image, else audio, else file_name in folders).", show_default=False),
    ] = None,
    allow_media_outside: Annotated[
        Optional[list[Path]],
        typer.Option(
            "--allow-media-outside", help="Also accept user-dataset media files under DIR (repeatable); by default only files inside the dataset's directory are read.",
            metavar="DIR", show_default=False,
        ),
    ] = None,
    plot: Annotated[bool, typer.Option("--plot", help="Also write DATA/partition.png, a heat map of label share per client.")] = False,
    seed: SeedOpt = 0,
    workspace: WorkspaceOpt = None,
    out: OutDirOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Partition datasets into client shards (IID, Dirichlet label skew, quantity skew) and test sets."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from uniflow_cli.cli.console import err
    from uniflow_cli.data.build import PartitionRequest
    from uniflow_cli.data.build import partition as run_partition
    from uniflow_cli.data.partition import parse_clients
    from uniflow_cli.data.userdata import Columns
    from uniflow_cli.errors import UsageError
    from uniflow_cli.workspace import find_workspace

    if out is not None and workspace is not None:
        raise UsageError("both --out and --workspace given", fix="use --workspace (writes WORKSPACE/data) or --out DIR, not both")
    labels = None
    if out is None:
        ws = find_workspace(workspace, required=False)
        if ws is None:
            raise UsageError("no output: no --out and no workspace found", fix="pass --workspace DIR or --out DIR")
        out = ws.data_dir
        labels = _classify_labels(ws)
    request = PartitionRequest(
        datasets=list(dataset),
        clients=parse_clients(clients),
        scheme=scheme,
        alpha=alpha,
        train_per_client=train_per_client,
        test_per_modality=test_per_modality,
        seed=seed,
        label_column=label_column,
        columns=Columns(question=question_column, answer=answer_column, media=media_column),
        allow_media_outside=list(allow_media_outside or []),
        labels=labels,
    )
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err, transient=True
    ) as bar:

        def progress_factory(total: int):
            task = bar.add_task("writing shards (reading images, synthesising speech)", total=total)
            return lambda n: bar.advance(task, n)

        info = run_partition(request, Path(out), force=force, plot=plot, progress_factory=progress_factory)
    if as_json:
        from uniflow_cli.cli.console import print_json

        print_json(_as_json(info, Path(out), plot))
    else:
        _print(info, Path(out), plot)


def _classify_labels(ws: Any) -> list[str] | None:
    """A classify workspace's labels (its shards must carry them), else None; a QA workspace's [model] is not read."""
    model = ws.config().get("model")
    if not isinstance(model, dict) or model.get("task") != "classify":
        return None
    from uniflow_cli.settings import resolve_model

    return list(resolve_model(ws).labels)


def _as_json(info: dict, out: Path, plot: bool) -> dict:
    """What was written and the partition summary itself (the content of partition.json)."""
    written = {"partition_json": str(out / "partition.json"), "plot": str(out / "partition.png") if plot else None}
    return {"out": str(out), **written, "partition": info}


def _print(info: dict, out: Path, plot: bool) -> None:
    from rich.table import Table

    from uniflow_cli.cli.console import out as console

    alpha = f", alpha {info['alpha']}" if info["alpha"] is not None else ""
    table = Table(title=f"partition: {info['scheme']}{alpha}, seed {info['seed']}, label = {info['label_column']}")
    table.add_column("client", justify="right")
    table.add_column("modalities")
    table.add_column("rows", justify="right")
    table.add_column("labels", justify="right")
    table.add_column("entropy (bits)", justify="right")
    table.add_column("top labels")
    for c in info["clients"]:
        hist = c["label_histogram"]
        top = ", ".join(f"{k} {100 * v / c['count']:.0f}%" for k, v in list(hist.items())[:3])
        mods = " + ".join(f"{m} {n}" for m, n in c["counts"].items()) if len(c["counts"]) > 1 else c["modalities"][0]
        table.add_row(str(c["id"]), mods, str(c["count"]), str(len(hist)), f"{c['label_entropy_bits']:.2f}", top)
    console.print(table)
    for m, d in info["modalities"].items():
        console.print(f"test/{m}: {d['test_rows']} rows from {', '.join(d['datasets'])} (never in a training shard)")
    console.print(f"wrote {out}/partition.json" + (f" and {out}/partition.png" if plot else ""))
