"""The rich consoles of the CLI: results on stdout, notices and errors on stderr."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console

from uniflow_cli.json_text import strict

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def notice(message: str) -> None:
    """A yellow one-line notice on stderr (never mixed into machine-readable stdout)."""
    err.print(f"[yellow]notice:[/yellow] {message}", soft_wrap=True)


def print_json(payload: dict[str, Any]) -> None:
    """A command's ``--json`` result: one JSON object and nothing else on stdout (paths as strings)."""
    import json

    import click

    click.echo(json.dumps(strict(payload), indent=2, ensure_ascii=False, default=str))


@contextmanager
def two_bars(console: Console, command: str, overall: str) -> Iterator[tuple[Any, Any, Any]]:
    """A transient rich progress: one bar over the whole run (``overall``) and one for the step, layer or batch
    at hand; yields (the Progress, the overall task, the detail task). ``command`` leads every line."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn(f"[bold]{command}[/bold] {{task.description}}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True) as progress:
        yield progress, progress.add_task(overall, total=None, info=""), progress.add_task("", total=None, info="")
