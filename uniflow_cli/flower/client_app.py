"""The ``ClientApp`` Flower loads on every node (``clientapp = "uniflow_cli.flower.client_app:app"``).

An exception raised here becomes an error reply; the server's strategy logs it and fuses the others.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from uniflow_cli.flower.secagg import secagg_mod

app = ClientApp(mods=[secagg_mod])  # Flower's secaggplus_mod on SecAgg messages (secagg = true), a pass-through otherwise


@app.train()
def train(msg: Message, context: Context) -> Message:
    from uniflow_cli.flower.client import run_client_round

    if "fitins.config" in msg.content.config_records:  # a SecAgg exchange (secagg = true): the legacy FitIns layout
        from uniflow_cli.flower.secagg import secagg_client_round

        return Message(content=secagg_client_round(msg.content, context), reply_to=msg)
    return Message(content=run_client_round(msg.content, context.run_config, context.node_config), reply_to=msg)
