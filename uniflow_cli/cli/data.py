"""``uniflow data show``: print a few samples of a shard or test split and save media previews."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from uniflow_cli.cli.boundary import UniflowGroup
from uniflow_cli.cli.examples import Example, epilog
from uniflow_cli.cli.options import LIMIT_FLAGS, JsonOpt

EXAMPLES: list[Example] = [
    ("a few rows of client 3's shard (media previews saved)", "uniflow data show fed/data/clients/3"),
    ("five samples, their media saved to previews/", "uniflow data show fed/data/test/audio --limit 5 --preview previews/"),
    ("the samples as JSON, no previews", "uniflow data show fed/data/test/text -n 2 --no-preview --json | jq '.samples[].answer'"),
]
EPILOG = epilog(EXAMPLES, ["Previews (PNG images, 16 kHz WAV audio) go to --preview DIR (must not exist), else to a new temporary directory."])

app = typer.Typer(
    cls=UniflowGroup,
    name="data",
    help="Look at partitioned data (client shards and test splits).",
    no_args_is_help=True,
    rich_markup_mode="rich",
    epilog=EPILOG,
)


@app.command("show", epilog=EPILOG)
def show(
    path: Annotated[Path, typer.Argument(help="A shard directory: DATA/clients/<k> or DATA/test/<modality>.", show_default=False)],
    # --limit/-n as in evaluate; --n is the spelling this command had first. No min=1: show_samples says it.
    n: Annotated[int, typer.Option(*LIMIT_FLAGS, "--n", help="How many samples to print.")] = 3,
    preview: Annotated[
        Optional[Path], typer.Option("--preview", help="Directory for media previews (default: a new temporary directory).", show_default=False)
    ] = None,
    no_preview: Annotated[bool, typer.Option("--no-preview", help="Do not save media previews.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Print a few samples of a shard (id, modality, question, answer, label, media) and save previews."""
    import tempfile

    from rich.table import Table

    from uniflow_cli.cli.console import out
    from uniflow_cli.data.show import show_samples

    if preview is None and not no_preview:
        preview = Path(tempfile.mkdtemp(prefix="uniflow-preview-")) / "samples"
    total, samples = show_samples(path, n=n, preview_dir=None if no_preview else preview)
    if as_json:
        from uniflow_cli.cli.console import print_json

        saved = any("preview" in sample for sample in samples)  # text-only shards save nothing
        print_json({"path": str(path), "rows": total, "preview_dir": str(preview) if saved else None, "samples": samples})
        return
    table = Table(title=f"{path}: {total} rows (first {len(samples)})")
    pair = ["text_pair"] if any(s["text_pair"] for s in samples) else []  # sentence pairs (NLI) only
    cols = ["id", "modality", "question", *pair, "answer", "label", "media"]
    for col in cols:
        table.add_column(col, overflow="fold")
    for s in samples:
        table.add_row(*(s[c] or "" for c in cols))
    out.print(table)
    previews = [s["preview"] for s in samples if "preview" in s]
    if previews:
        out.print("previews: " + "  ".join(previews), soft_wrap=True)
