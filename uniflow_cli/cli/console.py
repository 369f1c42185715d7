"""The rich consoles of the CLI: results on stdout, notices and errors on stderr."""

from __future__ import annotations

from rich.console import Console

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def notice(message: str) -> None:
    """A yellow one-line notice on stderr (never mixed into machine-readable stdout)."""
    err.print(f"[yellow]notice:[/yellow] {message}", soft_wrap=True)
