"""One client's round on a Flower node: decode the global, run the shared local-train core, encode the reply.

The node's data is the shard ``data/clients/<client id>`` of its workspace; the client id is the node's
``partition-id`` (simulation sets it; a SuperNode gets it with ``--node-config "partition-id=0"``), or an
explicit ``client-id``. FedSA's private B is kept in the node's ``state/clients/<id>`` and never sent.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from flwr.app import ConfigRecord, MetricRecord, RecordDict

from uniflow_cli.errors import AdapterError, ConfigError, UsageError
from uniflow_cli.flower.records import HISTORY_KEY, REPLY_KEY, ReceivedGlobal, decode_global, tensors_to_record
from uniflow_cli.flower.settings import FlowerRunSettings


def client_id_of(node_config: Mapping[str, Any]) -> str:
    for key in ("client-id", "partition-id"):
        if key in node_config and str(node_config[key]) != "":
            return str(node_config[key])
    raise ConfigError("this node has no partition-id", fix="start the SuperNode with --node-config \"partition-id=0 num-partitions=3\"")


# The training values a run config may set (FlowerRunSettings fields named as in TrainSettings).


def train_config_for(settings: FlowerRunSettings, workspace: Any) -> Any:
    """The TrainSettings ``uniflow local-train`` would resolve from the same values: run-config values over
    the workspace's ``[train]`` (the same resolver as the CLI), in float32 (what travels in an ArrayRecord).

    Unset run-config values (None, or "" for the string ones) leave the table's value. A bad run-config
    value is named by its run-config key, a bad table value by its key in uniflow.toml."""
    from uniflow_cli.flower.settings import in_run_config_terms
    from uniflow_cli.settings import resolve_train

    return in_run_config_terms(lambda: resolve_train(workspace, settings.train_overrides()))


def node_history(ws: Any, client: str, received: ReceivedGlobal) -> list[tuple[int, Any]]:
    """Every earlier global the header names, from the message or from this node's cache.

    fedex folds every published residual into the base, flora every published global, so a node needs
    all of them each round. The server sends each one to a node only until the node has confirmed it
    (``history-rounds`` in the reply); the node keeps them in ``state/flower/<k>/globals/<t>`` (uniflow's
    adapter format, sha256-checked on read) and checks the server's identity of each before use.
    """
    from uniflow_cli.adapters import AdapterMeta, read_adapter, write_adapter

    cache = ws.flower_globals(client)
    history = []
    for r, (peft_config, ident) in sorted(received.history.items()):
        where = cache / str(r)
        if r in received.sent:
            adapter = received.sent[r]
            meta = AdapterMeta(role="global", round=r, method=received.method, base_fingerprint=received.start.meta.base_fingerprint if received.start.meta else None,
                               extra={"flower": {"id": ident}})
            write_adapter(where, peft_config=peft_config, tensors=adapter.tensors, meta=meta, residual=adapter.residual, force=True)
        else:
            if not (where / "uniflow.json").is_file():
                raise AdapterError(
                    f"the global of round {r} came neither with the message nor is it in this node's cache {where}",
                    fix="none needed on this node: the server sends that global again in the next round",
                )
            adapter = read_adapter(where)
            cached = (adapter.meta.extra.get("flower") or {}).get("id") if adapter.meta is not None else None
            if cached != ident:
                raise AdapterError(
                    f"{where} holds another global of round {r} than the server's (sha256 {str(cached)[:12]}… vs {ident[:12]}…)",
                    fix="none needed on this node: the server sends that global again in the next round",
                )
        history.append((r, adapter))
    return history


def node_device(settings: FlowerRunSettings, node_config: Mapping[str, Any]) -> Any:
    """The torch device this node trains on (:meth:`FlowerRunSettings.device_name`); a bad or absent device
    is one line naming the node-config or run-config key it came from."""
    from uniflow_cli.compute import resolve_device

    try:
        return resolve_device(settings.device_name(node_config))
    except ConfigError as exc:
        raise exc.renamed("node-config device" if node_config.get("device") else "run-config device", style="key") from None


def run_client_round(content: RecordDict, run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> RecordDict:
    """Train this node's shard from the global in ``content``; return the reply's RecordDict."""
    from uniflow_cli.client_round import read_client_state, train_client_round, write_client_state
    from uniflow_cli.compute import check_precision
    from uniflow_cli.data.build import load_split
    from uniflow_cli.flower.settings import in_run_config_terms
    from uniflow_cli.settings import LoraSettings, resolve, resolve_model
    from uniflow_cli.workspace import find_workspace

    settings = FlowerRunSettings.from_run_config(run_config)
    client = client_id_of(node_config)
    ws = find_workspace(settings.workspace_path(node_config))
    assert ws is not None
    config = content.config_records.get("config", ConfigRecord())
    if "arrays" not in content.array_records:
        raise UsageError("the train message carries no 'arrays' record", fix="run uniflow's ServerApp")
    received = decode_global(config, content.array_records["arrays"], content.array_records.get(HISTORY_KEY))
    start, t, method = received.start, received.round, received.method
    history = node_history(ws, client, received)
    model_settings = resolve_model(ws)
    if settings.preset and model_settings.preset != settings.preset:
        raise ConfigError(f"run-config preset={settings.preset!r} but {ws.config_path} uses {model_settings.preset!r}", fix="make them agree (or set preset = '')")
    cfg = train_config_for(settings, ws)
    device = node_device(settings, node_config)
    in_run_config_terms(lambda: check_precision(cfg.precision, device))  # before the model build
    dataset = load_split(ws.client_data(client))
    state = ws.client_state(client)
    result = train_client_round(
        cfg, start, dataset, model_settings, resolve(LoraSettings, ws).for_client(client), method=method, client_id=client, round_=t + 1,
        history=history, private=read_client_state(state, method), private_where=str(state), total_rounds=settings.num_server_rounds,
        started_from=f"flower global of round {t}", device=device, gradient_checkpointing=bool(settings.gradient_checkpointing),
    )
    write_client_state(state, result)  # FedSA's B, FedDPA's local adapter: stays on this node for its next round
    stats = result.stats
    metrics = MetricRecord(
        {
            "num-examples": stats.num_examples,
            "train-loss-first": float(stats.first_loss or 0.0),
            "train-loss-last": float(stats.last_loss or 0.0),
            "train-seconds": float(stats.seconds),
            "upload-bytes": result.upload_bytes,
        }
    )
    reply = ConfigRecord(
        {
            "client-id": client,
            "round": t + 1,
            "base-fingerprint": result.meta.base_fingerprint or "",
            "peft-config": json.dumps(result.peft_config, sort_keys=True),
            "modalities": json.dumps(result.meta.modalities),
            "steps": stats.steps,
            "history-rounds": json.dumps(sorted(received.history)),  # now in this node's cache: not sent again
        }
    )
    return RecordDict({"arrays": tensors_to_record(result.shared), "metrics": metrics, REPLY_KEY: reply})
