"""The ``ClientApp`` Flower loads on every node (``clientapp = "uniflow_cli.flower.client_app:app"``).

An exception raised here becomes an error reply; the server's strategy logs it and fuses the others.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    from uniflow_cli.flower.client import run_client_round

    return Message(content=run_client_round(msg.content, context.run_config, context.node_config), reply_to=msg)
