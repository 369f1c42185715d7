"""uniflow as a Flower app: the same local-train and aggregation cores behind Flower's transport.

Optional extra (``pip install 'uniflow-cli[flower]'``). Pieces:

* :mod:`.settings` — the run config (``[tool.flwr.app.config]``: method, rounds, tau, lambda, workspace,
  preset, ...) as a validated dataclass, resolved over the workspace tables by ``uniflow_cli.settings``;
* :mod:`.records` — adapters ↔ Flower ``ArrayRecord`` (float32 arrays, PEFT key names);
* :mod:`.strategy` — :class:`UniflowFedAvg`, a ``FedAvg`` whose ``aggregate_train`` calls uniflow's
  aggregation core and publishes each round's global into the workspace;
* :mod:`.client` — one client's round on a node (the shared core ``client_round.train_client_round``);
* :mod:`.server_app` / :mod:`.client_app` — the ``ServerApp`` / ``ClientApp`` objects Flower loads;
* :mod:`.project` — writes a ready Flower app project (``uniflow flower new``).

Only :mod:`.project` and :mod:`.settings` import without flwr installed.
"""

from __future__ import annotations

from uniflow_cli.errors import MissingDependencyError

FLWR_RANGE = ">=1.42,<1.43"


def require_flwr() -> None:
    """Fail with the install command when the optional extra is missing."""
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise MissingDependencyError("the Flower engine (flwr) is not installed", fix=f"pip install 'uniflow-cli[flower]' (flwr{FLWR_RANGE})") from None
