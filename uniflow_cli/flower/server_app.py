"""The ``ServerApp`` Flower loads on the SuperLink side (``serverapp = "uniflow_cli.flower.server_app:app"``)."""

from __future__ import annotations

from logging import ERROR

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from uniflow_cli.errors import UniflowError
    from uniflow_cli.flower.server import run_server

    try:
        if context.run_config.get("secagg") is True:  # FedA²/FedIT/FFA over Flower's SecAgg+ (uniflow_cli.flower.secagg)
            from uniflow_cli.flower.secagg import run_secagg_server

            run_secagg_server(grid, context)
        else:
            run_server(grid, context.run_config)
    except UniflowError as exc:
        # Flower prints the traceback and marks the run finished:failed; this is the line to read.
        log(ERROR, "uniflow: %s", exc)
        raise
