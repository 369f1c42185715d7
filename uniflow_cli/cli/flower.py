"""``uniflow flower new DIR``: write a ready Flower app project for a uniflow workspace."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from uniflow_cli.cli.boundary import UniflowGroup

from uniflow_cli.cli.options import ForceOpt

EPILOG = """[bold]Examples[/bold]

  [dim]# a project for an existing workspace, then a local simulation of 3 clients[/dim]
  uniflow flower new flower-app --workspace fed --method fedA2 --rounds 3
  cd flower-app && cat flower-config.toml >> ~/.flwr/config.toml
  FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 flwr run . local --stream

Needs the optional extra: pip install 'uniflow-cli[flower]'. See docs/flower.md."""

flower_app = typer.Typer(cls=UniflowGroup, help="Run a uniflow federation on the Flower engine.", no_args_is_help=True)


@flower_app.command("new", epilog=EPILOG)
def new(
    out: Annotated[Path, typer.Argument(help="Directory to create (must not exist unless --force).")],
    workspace: Annotated[Optional[Path], typer.Option("--workspace", "-w", help="The server's workspace (stored as an absolute path).", show_default=False)] = None,
    method: Annotated[str, typer.Option("--method", "-m", help="fedit | ffa | fedsa | fedex | fedA2 | svd | flora.")] = "fedA2",
    rounds: Annotated[int, typer.Option("--rounds", help="num-server-rounds.")] = 2,
    tau: Annotated[float, typer.Option("--tau", help="τ of Eq. 7 (share of local steps in stage I).")] = 0.25,
    lambda_: Annotated[float, typer.Option("--lambda", help="Tikhonov λ of Eq. 13.")] = 1.0,
    steps: Annotated[int, typer.Option("--steps", help="Local optimizer steps per round.")] = 4,
    preset: Annotated[Optional[str], typer.Option("--preset", help="Model preset the run must use (default: the workspace's).", show_default=False)] = None,
    supernodes: Annotated[int, typer.Option("--supernodes", help="Simulated clients of the 'local' connection.")] = 3,
    force: ForceOpt = False,
) -> None:
    """Write a Flower app project (pyproject.toml with [tool.flwr.app], connection examples)."""
    from uniflow_cli.cli.console import out as stdout
    from uniflow_cli.flower.project import ProjectSettings, write_project
    from uniflow_cli.workspace import find_workspace

    ws_path, ws_preset = "", "tiny-random"
    if workspace is not None:
        ws = find_workspace(workspace)
        ws_path = str(ws.root)  # type: ignore[union-attr]
        ws_preset = str(ws.config().get("model", {}).get("preset", ""))  # type: ignore[union-attr]
    settings = ProjectSettings(workspace=ws_path, preset=preset if preset is not None else ws_preset, method=method, rounds=rounds,
                               tau=tau, lambda_=lambda_, steps=steps, supernodes=supernodes)
    written = write_project(out, settings, force=force)
    stdout.print(f"[green]wrote[/green] {written}/pyproject.toml and flower-config.toml (method {method}, {rounds} rounds"
                 + (f", workspace {ws_path})" if ws_path else "; set workspace in pyproject.toml or with --run-config)"), soft_wrap=True)
