"""The CLI in-process for tests: ``run`` returns the typer Result, ``ok`` also asserts exit code 0."""

from __future__ import annotations

from typing import Any

from typer.testing import CliRunner

from uniflow_cli.cli.app import app

runner = CliRunner()


def run(*args: Any) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def ok(*args: Any) -> Any:
    result = run(*args)
    assert result.exit_code == 0, result.output
    return result
