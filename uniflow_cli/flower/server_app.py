"""The ``ServerApp`` Flower loads on the SuperLink side (``serverapp = "uniflow_cli.flower.server_app:app"``)."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from uniflow_cli.flower.server import run_server

    run_server(grid, context.run_config)
