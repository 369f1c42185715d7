"""A Flower ``FedAvg`` whose fusion is uniflow's aggregation core (every method, λ/ridge from the run config).

``aggregate_train`` replaces FedAvg's element-wise average: it drops error replies and replies made on
another base model (one log line each), orders the rest by client id (the order ``uniflow aggregate``
reads a round's drops in), fuses them with :func:`uniflow_cli.aggregation.aggregate` and publishes the
result as ``rounds/<t>/global`` of the server's workspace — the same adapter format as the file-drop path.

``configure_train`` only adds what the arrays alone cannot say: the global's metadata (round, method,
base fingerprint, PEFT config) and, for fedex/flora, the earlier globals that clients fold into their base
(to each node only those it has not confirmed holding in an earlier reply).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg
from flwr.supercore import log

from uniflow_cli.adapters import MAX_EXAMPLES, MODALITY_NAMES, AdapterMeta, LoadedAdapter, check_peft_config, open_adapter, read_adapter, write_adapter
from uniflow_cli.aggregation import AggregationOptions, AggregationResult, ClientUpdate, aggregate
from uniflow_cli.aggregation.registry import method_spec
from uniflow_cli.errors import UniflowError
from uniflow_cli.flower.records import HEADER_KEY, HISTORY_KEY, REPLY_KEY, global_header, history_record, record_to_tensors, tensors_to_record
from uniflow_cli.global_info import GlobalInfo, global_meta
from uniflow_cli.paths import ID_RULE, is_valid_id


def header_only(path: Path) -> LoadedAdapter:
    """A published global's config and metadata (with its sha256s) without its tensors: a history entry.

    FedEx's residual is dense (432 MiB a round for smol); the strategy reads an earlier global's tensors only
    while it builds a message for a node that lacks it, instead of holding every round in memory.
    """
    reader = open_adapter(path, verify=False)
    return LoadedAdapter(reader.path, reader.peft_config, {}, reader.meta)


class UniflowFedAvg(FedAvg):
    """FedAvg sampling/transport + uniflow fusion + publishing into a workspace.

    ``start`` is the global the first Flower round starts from (``rounds/<round_offset>/global``);
    Flower's round r publishes ``rounds/<round_offset + r>/global``. ``history`` holds the published
    globals of rounds 1..round_offset (fedex/flora clients fold them into their base) as :func:`header_only`
    entries; their tensors are read from the workspace when a node needs them.
    """

    def __init__(
        self,
        *,
        workspace: Any,
        options: AggregationOptions,
        start: LoadedAdapter,
        round_offset: int = 0,
        history: Sequence[tuple[int, LoadedAdapter]] = (),
        weighting: str = "examples",
        publish: bool = True,
        **fedavg: Any,
    ) -> None:
        fedavg.setdefault("fraction_evaluate", 0.0)  # uniflow evaluates on the server (evaluate_fn)
        super().__init__(**fedavg)
        self.workspace = workspace
        self.options = options
        self.current = start
        self.round_offset = round_offset
        self.history = list(history)
        self.weighting = weighting
        self.publish_on_aggregate = publish  # False when a DP wrapper adds noise after aggregate_train
        self.base_fingerprint = start.meta.base_fingerprint if start.meta is not None else None
        self.pending: tuple[int, AggregationResult, AdapterMeta] | None = None
        self.published: list[int] = []
        self.rejected: dict[int, list[str]] = {}
        self.node_history: dict[int, set[int]] = {}  # node id → earlier globals (rounds) it confirmed holding

    def summary(self) -> None:
        log(INFO, "\t├──> uniflow: method %s, lambda %s, ridge %s, weighting %s", self.options.method, self.options.lambda_, self.options.ridge, self.weighting)
        log(INFO, "\t├──> workspace %s, starting from round %d", self.workspace.root, self.round_offset)
        super().summary()

    # ------------------------------------------------------------------------------------------ sending
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        t = self.round_offset + server_round - 1
        history = self.history if method_spec(self.options.method).folds_history else []
        config = ConfigRecord(dict(config))  # per round: the caller's record is reused every round
        config[HEADER_KEY] = global_header(self.current, round_=t, method=self.options.method, history=history)
        # What the clients actually receive is the start of this round (a DP wrapper may have noised it).
        self.current = LoadedAdapter(self.current.path, self.current.peft_config, record_to_tensors(arrays, where="global"), self.current.meta, self.current.residual)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        # Each node gets the arrays of only the earlier globals it has not confirmed holding: a fedex
        # residual (dense, d_out × d_in per layer) crosses the wire once per node, not once per round.
        # FedAvg's messages share one RecordDict: a node's own part needs a content of its own.
        records: dict[tuple[int, ...], ArrayRecord | None] = {}
        out = []
        for message in messages:
            node = message.metadata.dst_node_id
            missing = tuple(r for r, _ in history if r not in self.node_history.get(node, set()))
            if missing not in records:
                records[missing] = history_record([(r, read_adapter(h.path)) for r, h in history if r in missing])
            if records[missing] is not None:
                content = RecordDict(dict(message.content.items()))
                content[HISTORY_KEY] = records[missing]
                message = Message(content=content, message_type=message.metadata.message_type, dst_node_id=node)
            out.append(message)
        return out

    # ------------------------------------------------------------------------------------------ fusing
    def _reject_reason(self, msg: Message) -> str | None:
        content = msg.content
        if REPLY_KEY not in content.config_records or "arrays" not in content.array_records or not content.metric_records:
            return "not a uniflow reply (missing arrays/metrics/uniflow records)"
        info = content.config_records[REPLY_KEY]
        fingerprint = str(info.get("base-fingerprint", ""))
        if self.base_fingerprint and fingerprint != self.base_fingerprint:
            return f"trained on base {fingerprint[:16] or '?'}…, the global's base is {self.base_fingerprint[:16]}…"
        num = next(iter(content.metric_records.values())).get(self.weighted_by_key)
        if isinstance(num, bool) or not isinstance(num, int) or not 0 < num <= MAX_EXAMPLES:
            return f"{self.weighted_by_key}={str(num)[:40]!r} is not a positive integer <= 2^53"
        client = info.get("client-id")
        if not is_valid_id(str(client)):
            return f"client-id {str(client)[:40]!r} is not a plain name ({ID_RULE})"
        try:  # everything a node says is untrusted: the same checks as a file drop's adapter_config.json
            check_peft_config(json.loads(str(info.get("peft-config"))), f"client {client} peft-config")
            modalities = json.loads(str(info.get("modalities", "[]")))
        except (UniflowError, ValueError, RecursionError) as exc:
            return str(exc)[:200]
        if not isinstance(modalities, list) or any(m not in MODALITY_NAMES for m in modalities):
            return f"modalities {str(modalities)[:60]} is not a list of {', '.join(MODALITY_NAMES)}"
        return None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        t = self.round_offset + server_round
        valid, errors = self._check_and_log_replies(list(replies), is_train=True, validate=False)
        for msg in errors:  # whatever the node held may be gone (a restart, a wiped disk): resend it all
            self.node_history.pop(msg.metadata.src_node_id, None)
        accepted: dict[str, Message] = {}
        rejected = []
        for msg in valid:
            node = msg.metadata.src_node_id
            reason = self._reject_reason(msg)
            client = str(msg.content.config_records[REPLY_KEY].get("client-id")) if reason is None else "?"
            if reason is None and client in accepted:
                reason = f"client id {client!r} already replied (two nodes share a partition-id)"
            if reason is not None:
                self.node_history.pop(node, None)
                log(WARNING, "round %d: rejected the reply of node %d (client %s): %s", t, node, client, reason)
                rejected.append(f"node {node}: {reason}")
                continue
            accepted[client] = msg
            self.node_history[node] = set(json.loads(str(msg.content.config_records[REPLY_KEY].get("history-rounds", "[]"))))
        self.rejected[t] = rejected
        if len(accepted) < self.min_train_nodes:
            log(WARNING, "round %d: %d usable replies, fewer than min-train-nodes=%d: the global is not updated", t, len(accepted), self.min_train_nodes)
            return None, None
        order = sorted(accepted)  # uniflow aggregate reads rounds/<t>/clients/* sorted by name: the same order here
        contents = [accepted[c].content for c in order]
        clients, raw_weights = [], []
        # VeRA: the global carries the projections and records the layers' shapes (the replies carry neither).
        start = ClientUpdate(f"global of round {t - 1}", self.current.tensors, self.current.peft_config, vera=GlobalInfo.of(self.current.meta).vera)
        try:
            for client, content in zip(order, contents):
                info = content.config_records[REPLY_KEY]
                tensors = record_to_tensors(content.array_records["arrays"], where=f"client {client}")
                clients.append(ClientUpdate(f"client {client}", tensors, json.loads(str(info["peft-config"]))))
                raw_weights.append(float(next(iter(content.metric_records.values()))[self.weighted_by_key]) if self.weighting == "examples" else 1.0)
            result = aggregate(clients, raw_weights, self.options, start=start)
        except UniflowError as exc:
            log(WARNING, "round %d: aggregation failed: %s; the global is not updated", t, exc)
            return None, None
        meta = self._meta(t, order, contents, result)
        self.pending = (t, result, meta)
        arrays = tensors_to_record(result.tensors)
        if self.publish_on_aggregate:
            self.publish(server_round, arrays)
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        log(INFO, "round %d: fused %d clients (%s) with %s", t, len(order), ", ".join(order), result.method)
        return arrays, metrics

    def _meta(self, t: int, order: list[str], contents: list[Any], result: AggregationResult) -> AdapterMeta:
        counts = [int(next(iter(c.metric_records.values()))[self.weighted_by_key]) for c in contents]
        modalities = [m for c in contents for m in json.loads(str(c.config_records[REPLY_KEY].get("modalities", "[]")))]
        return global_meta(
            result, round_=t, base_fingerprint=self.base_fingerprint, num_examples=sum(counts) or None, modalities=modalities,
            options={"lambda": self.options.lambda_, "ridge": self.options.ridge, "rcond": self.options.rcond, "weighting": self.weighting, "dtype": "float32",
                     **{k: v for k, v in (("clip_update_norm", self.options.clip_update_norm), ("robust", self.options.robust)) if v is not None}},
            clients=[{"client_id": c, "num_examples": n, "weight": w} for c, n, w in zip(order, counts, result.weights)],
            engine={"name": "flower", "rejected": self.rejected.get(t, [])},
            settings=GlobalInfo.of(self.current.meta).settings,  # the model the run started from
        )

    def publish(self, server_round: int, arrays: ArrayRecord) -> None:
        """Write the round's global (``arrays``: what the clients will receive next) into the workspace."""
        assert self.pending is not None and self.pending[0] == self.round_offset + server_round
        t, result, meta = self.pending
        tensors = record_to_tensors(arrays, where="global")
        out = write_adapter(self.workspace.global_dir(t), peft_config=result.peft_config, tensors=tensors, meta=meta, residual=result.residual)
        entry = header_only(out)  # with the sha256s: the global's identity for the nodes' copies
        self.current = LoadedAdapter(out, result.peft_config, tensors, entry.meta, result.residual)
        self.history.append((t, entry))
        self.published.append(t)
        self.pending = None
        log(INFO, "round %d: published %s", t, out)


class UniflowServerSideDP(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed-clipping DP around :class:`UniflowFedAvg`: the published global is the noised one."""

    def __init__(self, strategy: UniflowFedAvg, noise_multiplier: float, clipping_norm: float, num_sampled_clients: int) -> None:
        strategy.publish_on_aggregate = False
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sampled_clients)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            self.strategy.publish(server_round, arrays)  # type: ignore[attr-defined]
        return arrays, metrics
