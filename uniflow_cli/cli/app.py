"""The ``uniflow`` command: registers one module per subcommand and formats errors at one boundary.

Every :class:`~uniflow_cli.errors.UniflowError` raised below becomes one red line on stderr and the
error's exit code (1, or 2 for usage errors). ``UNIFLOW_DEBUG=1`` adds the traceback. Command modules
import torch and the heavy libraries inside their function bodies, so ``uniflow --help`` stays fast.

The root help lists the commands in the order a federation uses them (``WORKFLOW``) and shows the first
example of each command's ``EXAMPLES`` list, so the root and the commands' own help never disagree.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

import click
import typer

from uniflow_cli import __version__
from uniflow_cli.cli import aggregate, ask, data, evaluate, export, flower, init, inspect, local_train, models, partition, report, simulate, status, sweep
from uniflow_cli.cli.boundary import UniflowGroup
from uniflow_cli.cli.examples import Example, epilog

# name → (module, its command function or sub-app); the order is the help's order.
COMMANDS: dict[str, tuple[ModuleType, Any]] = {
    "init": (init, init.init),
    "partition": (partition, partition.partition),
    "local-train": (local_train, local_train.local_train),
    "aggregate": (aggregate, aggregate.aggregate),
    "simulate": (simulate, simulate.simulate),
    "evaluate": (evaluate, evaluate.evaluate),
    "ask": (ask, ask.ask),
    "export": (export, export.export),
    "report": (report, report.report),
    "sweep": (sweep, sweep.app),
    "status": (status, status.status),
    "inspect": (inspect, inspect.inspect),
    "data": (data, data.app),
    "models": (models, models.models_app),
    "flower": (flower, flower.flower_app),
}
WORKFLOW = tuple(COMMANDS)

# The root's example for modules that keep a hand-written EPILOG string (no EXAMPLES list yet); a module
# that defines EXAMPLES is always preferred, so converting it needs no change here.
def first_example(name: str, module: ModuleType) -> Example:
    return module.EXAMPLES[0]  # every command module lists its examples, the workspace-mode one first


ROOT_EPILOG = epilog(
    (first_example(name, module) for name, (module, _) in COMMANDS.items()),
    ["uniflow COMMAND --help shows more examples. Set UNIFLOW_DEBUG=1 to see tracebacks."],
)


class WorkflowGroup(UniflowGroup):
    """The root group: commands listed in workflow order (Typer lists sub-apps after plain commands)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        rank = {name: i for i, name in enumerate(WORKFLOW)}
        return sorted(super().list_commands(ctx), key=lambda name: rank.get(name, len(rank)))


app = typer.Typer(
    name="uniflow",
    cls=WorkflowGroup,
    help="UniFLoW: multimodal federated LoRA fine-tuning with analytical aggregation (FedA²-LoRA), "
    "as independent commands that exchange LoRA adapter directories.",
    epilog=ROOT_EPILOG,
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
    for name, (module, target) in COMMANDS.items():
        if isinstance(target, typer.Typer):
            app.add_typer(target, name=name)
        else:
            app.command(name, epilog=module.EPILOG)(target)


_register()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    app(args=argv if argv is not None else sys.argv[1:], prog_name="uniflow")


if __name__ == "__main__":  # pragma: no cover
    main()
