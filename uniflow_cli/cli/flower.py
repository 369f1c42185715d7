"""``uniflow flower new DIR``: write a ready Flower app project for a uniflow workspace."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Optional

import typer

from uniflow_cli.cli.boundary import UniflowGroup
from uniflow_cli.cli.examples import Example, epilog
from uniflow_cli.cli.options import WORKSPACE_FLAGS, ForceOpt, JsonOpt, method_option, preset_option, tau_option

EXAMPLES: list[Example] = [
    ("a project for an existing workspace", "uniflow flower new flower-app --workspace fed --method fedA2 --rounds 3"),
    ("then a local simulation of 3 clients", "cd flower-app && cat flower-config.toml >> ~/.flwr/config.toml"),
    ("", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 flwr run . local --stream"),
    ("what was written, as JSON", "uniflow flower new flower-app --stage-tau 0.5 --json | jq .files"),
]
EPILOG = epilog(EXAMPLES, ["Needs the optional extra: pip install 'uniflow-cli[flower]'. See docs/flower.md."])

flower_app = typer.Typer(
    cls=UniflowGroup, help="Run a uniflow federation on the Flower engine.", epilog=EPILOG, rich_markup_mode="rich", no_args_is_help=True
)


@flower_app.command("new", epilog=EPILOG)
def new(
    out: Annotated[Path, typer.Argument(help="Directory to create (must not exist unless --force).")],
    workspace: Annotated[Optional[Path], typer.Option(*WORKSPACE_FLAGS, help="The server's workspace (stored as an absolute path).", show_default=False)] = None,
    method: Annotated[str, method_option()] = "fedA2",
    rounds: Annotated[int, typer.Option("--rounds", help="num-server-rounds.")] = 2,
    tau: Annotated[float, tau_option()] = 0.25,
    lambda_: Annotated[float, typer.Option("--lambda", help="Tikhonov λ of Eq. 13.")] = 1.0,
    steps: Annotated[int, typer.Option("--steps", help="Local optimizer steps per round.")] = 4,
    preset: Annotated[Optional[str], preset_option("The run must use it (default: the workspace's).", show_default=False)] = None,
    supernodes: Annotated[int, typer.Option("--supernodes", help="Simulated clients of the 'local' connection.")] = 3,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    r"""Write a Flower app project (pyproject.toml with \[tool.flwr.app], connection examples)."""
    from uniflow_cli.cli.console import out as stdout
    from uniflow_cli.cli.console import print_json
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
    if as_json:
        files = sorted(str(p) for p in Path(written).iterdir())
        print_json({"out": str(written), "files": files, "settings": dataclasses.asdict(settings)})
        return
    stdout.print(f"[green]wrote[/green] {written}/pyproject.toml and flower-config.toml (method {method}, {rounds} rounds"
                 + (f", workspace {ws_path})" if ws_path else "; set workspace in pyproject.toml or with --run-config)"), soft_wrap=True)
