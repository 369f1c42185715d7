"""The rich consoles of the CLI: results on stdout, notices and errors on stderr."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def notice(message: str) -> None:
    """A yellow one-line notice on stderr (never mixed into machine-readable stdout)."""
    err.print(f"[yellow]notice:[/yellow] {message}", soft_wrap=True)


def _strict(value: Any) -> Any:
    """NaN/inf become null: Python would write ``NaN``, which jq and JSON.parse reject."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def print_json(payload: dict[str, Any]) -> None:
    """A command's ``--json`` result: one JSON object and nothing else on stdout (paths as strings)."""
    import json

    import click

    click.echo(json.dumps(_strict(payload), indent=2, ensure_ascii=False, default=str))
