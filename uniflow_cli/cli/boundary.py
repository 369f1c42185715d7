"""The CLI's one error boundary: a UniflowError becomes one red line and its exit code.

``UNIFLOW_DEBUG=1`` adds the traceback. A :class:`~uniflow_cli.errors.ConfigError` raised in library terms
(a setting's field, e.g. ``tau``) is told in the running command's flag (``--stage-tau``).
"""

from __future__ import annotations

import os
from typing import Any

import click
import typer
from typer.core import TyperGroup

from uniflow_cli.errors import ConfigError, UniflowError, UsageError, reword


def _debug() -> bool:
    return os.environ.get("UNIFLOW_DEBUG", "") not in ("", "0", "false", "no")


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def flag_for(command: click.Command | None, field: str) -> str | None:
    """The flag of ``command`` that sets the library setting ``field`` (``tau`` → ``--stage-tau``)."""
    if command is None:
        return None
    wanted = {field, field.rstrip("_")}
    for param in command.params:
        if not isinstance(param, click.Option):
            continue
        names = {param.name or ""} | {opt.lstrip("-").replace("-", "_") for opt in param.opts}
        if names & wanted:
            return next((o for o in param.opts if o.startswith("--")), param.opts[0])
    return None


def in_cli_terms(exc: UniflowError, command: click.Command | None) -> UniflowError:
    """A ConfigError in library terms (a field) names the command's flag for that field, when it has one."""
    if getattr(exc, "wording", None) is not None:  # errors.worded: every setting its template names
        return reword(exc, lambda f: flag_for(command, f))
    field = getattr(exc, "field", None)
    if isinstance(exc, ConfigError) and field is not None and (flag := flag_for(command, field)) is not None:
        renamed = exc.renamed(flag, style="flag")
        return UsageError(renamed.problem, fix=renamed.fix)  # a bad flag value is a usage error: exit 2
    return exc


class UniflowGroup(TyperGroup):
    """The single error boundary: everything a subcommand raises passes through here.

    Sub-apps (``flower``, ``data``, ``models``) use this class too; the innermost one formats the error and
    exits, the outer ones let the exit pass. ``resolve_command`` remembers the leaf command so a library
    error naming a setting can be told in the flag's name."""

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        name, cmd, rest = super().resolve_command(ctx, args)
        if cmd is not None and not isinstance(cmd, click.Group):
            ctx.meta["uniflow.command"] = cmd
        return name, cmd, rest

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UniflowError as exc:
            exc = in_cli_terms(exc, ctx.meta.get("uniflow.command"))
            from uniflow_cli.cli.console import err

            if _debug():
                err.print_exception()
            err.print(f"[bold red]error:[/bold red] {_escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort, typer.Exit):
            raise
        except KeyboardInterrupt:
            raise
        except OSError as exc:  # disk full, permission denied, ...: the user can act on these
            from uniflow_cli.cli.console import err

            if _debug():
                err.print_exception()
            where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
            err.print(f"[bold red]error:[/bold red] {_escape(exc.strerror or str(exc))}{_escape(where)}", soft_wrap=True)
            raise typer.Exit(1) from None
