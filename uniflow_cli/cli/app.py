"""The ``uniflow`` command: registers one module per subcommand and formats errors at one boundary.

Every :class:`~uniflow_cli.errors.UniflowError` raised below becomes one red line on stderr and the
error's exit code (1, or 2 for usage errors). ``UNIFLOW_DEBUG=1`` adds the traceback. Command modules
import torch and the heavy libraries inside their function bodies, so ``uniflow --help`` stays fast.
"""

from __future__ import annotations

import sys

import typer

from uniflow_cli import __version__
from uniflow_cli.cli.boundary import UniflowGroup


EPILOG = """[bold]Examples[/bold]

  uniflow aggregate --method fedA2 --lambda 1 clients/* --out global/

  uniflow aggregate --round 3 --method fedA2 --report report.json   (inside a workspace)

  uniflow inspect global/

Set UNIFLOW_DEBUG=1 to see tracebacks."""

app = typer.Typer(
    name="uniflow",
    cls=UniflowGroup,
    help="UniFLoW: multimodal federated LoRA fine-tuning with analytical aggregation (FedA²-LoRA), "
    "as independent commands that exchange LoRA adapter directories.",
    epilog=EPILOG,
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"uniflow {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """UniFLoW command-line suite."""


def _register() -> None:
    # Each module defines one command function; importing them must not import torch.
    from uniflow_cli.cli import aggregate, inspect

    app.command("aggregate", epilog=aggregate.EPILOG)(aggregate.aggregate)
    app.command("inspect", epilog=inspect.EPILOG)(inspect.inspect)

    from uniflow_cli.cli import report

    app.command("report", epilog=report.EPILOG)(report.report)

    from uniflow_cli.cli import data, partition

    app.command("partition", epilog=partition.EPILOG)(partition.partition)
    app.add_typer(data.app, name="data")

    from uniflow_cli.cli import init, models

    app.command("init", epilog=init.EPILOG)(init.init)
    app.add_typer(models.models_app, name="models")

    from uniflow_cli.cli import local_train

    app.command("local-train", epilog=local_train.EPILOG)(local_train.local_train)

    from uniflow_cli.cli import status

    app.command("status", epilog=status.EPILOG)(status.status)

    from uniflow_cli.cli import evaluate

    app.command("evaluate", epilog=evaluate.EPILOG)(evaluate.evaluate)

    from uniflow_cli.cli import flower

    app.add_typer(flower.flower_app, name="flower")


_register()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    app(args=argv if argv is not None else sys.argv[1:], prog_name="uniflow")


if __name__ == "__main__":  # pragma: no cover
    main()
