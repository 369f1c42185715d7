"""FedA²-LoRA, FedIT and FFA under Flower's secure aggregation (SecAgg+): the server only ever holds sums.

FedA² needs only weighted sums: phase 1 ``Σ w_k A_k`` (→ Ā, broadcast), phase 2 ``Σ w_k B_k (A_k Āᵀ)`` (each
client forms its d_out × r product locally), then the server solves ``B = M (ĀĀᵀ + λI)⁻¹`` with the same
Eq. 13 / ridge rules as :func:`uniflow_cli.aggregation.linalg.fedA2_B`. FedIT (``Σ w_k A_k``, ``Σ w_k B_k``)
and FFA (``Σ w_k B_k``, A frozen) need one exchange. Non-LoRA tensors are averaged in the phase-1 sum.

Each exchange is one run of Flower's own :class:`flwr.server.workflow.SecAggPlusWorkflow` (setup, share keys,
masked vectors, unmask: four round trips) with the client side in Flower's ``secaggplus_mod``; no cryptography
here. The weights w_k = n_k / Σn come from SecAgg+ itself: a client's vector is scaled by n_k / max_weight and the
quantised factor n_k / max_weight travels in the same masked vector, so the server divides by the masked Σn and
never learns n_k (:func:`secagg_mod` also blanks the plaintext count Flower's FitRes carries).

Precision: SecAgg+ clips to [-C, C] and stochastically rounds to Q levels, so each client's entry carries an
unbiased error below one step 2C/Q; the weighted mean is off by at most K·(2C/Q)·max_weight/Σn per entry (2C/Q
with uniform weights). Clients refuse to send a value that would be clipped. Masks and rounding are random:
a SecAgg global is not byte-reproducible, only within that tolerance of plain fedA2.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore import log

from uniflow_cli.errors import ConfigError, UsageError

from uniflow_cli.aggregation.registry import SPECS, method_spec

SECAGG_METHODS = tuple(name for name, spec in SPECS.items() if spec.secagg_exchanges)  # globals that are functions of weighted sums
PHASE_KEY, KEYS_KEY, WEIGHT_KEY = "uniflow.phase", "uniflow.keys", "uniflow.max-weight"
PENDING_KEY = "uniflow-secagg-pending"  # node state between FedA²'s two exchanges: this client's A_k, B_k
MOD_RANGE = 2**32  # Flower's default modulus: K·Q must stay below it


# ------------------------------------------------------------------------------------------ client side
def secagg_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``secaggplus_mod`` for the SecAgg stages, a pass-through for plain train messages."""
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, ctxt)
    out = secaggplus_mod(msg, ctxt, call_next)
    if not out.has_error() and "fitres.num_examples" in out.content.metric_records:
        out.content.metric_records["fitres.num_examples"] = MetricRecord({"num_examples": 0})  # n_k is inside the mask
    return out


def _arrays(keys: Sequence[str], params: Any) -> dict[str, Any]:
    import torch
    from flwr.common import parameters_to_ndarrays

    return {k: torch.from_numpy(np.array(a, dtype=np.float32)) for k, a in zip(keys, parameters_to_ndarrays(params))}


def _fitres(tensors: Mapping[str, Any], n: int, metrics: dict[str, Any]) -> RecordDict:
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    keys = sorted(tensors)
    params = ndarrays_to_parameters([tensors[k].detach().to("cpu").double().numpy() for k in keys])
    return compat.fitres_to_recorddict(FitRes(Status(Code.OK, ""), params, n, {**metrics, KEYS_KEY: json.dumps(keys)}), True)


def upload_factors(shared: Mapping[str, Any], peft_config: Mapping[str, Any], global_config: Mapping[str, Any],
                   global_tensors: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(A_k, B_k, others) in float64 as the server core sees them: B_k with s_k / s_out folded in (core._layer_factors;
    into A_k where B is frozen and not sent, RoLoRA's A rounds), both padded to the global's rank."""
    import torch

    from uniflow_cli.aggregation.linalg import pad_rank
    from uniflow_cli.peft_keys import lora_key, lora_modules, lora_scaling

    modules, other = lora_modules(list(shared))
    As, Bs = {}, {}
    for module, (a_key, b_key) in modules.items():
        g_key = lora_key(module, "A") if lora_key(module, "A") in global_tensors else lora_key(module, "B")
        g = global_tensors[g_key]
        out_rank = g.shape[0] if g_key.endswith("lora_A.weight") else g.shape[1]
        A = shared[a_key].double() if a_key else None
        B = shared[b_key].double() if b_key else None
        rank = A.shape[0] if A is not None else B.shape[1]
        if rank > out_rank:
            raise UsageError(f"{module}: this client's rank {rank} exceeds the global's {out_rank}", fix="use the global's rank under secagg")
        factor = lora_scaling(peft_config, module, rank) / lora_scaling(global_config, module, out_rank)
        if B is not None:
            B = B * factor
        elif A is not None:
            A = A * factor
        A_pad, B_pad = pad_rank(A if A is not None else torch.zeros((rank, 1), dtype=torch.float64),
                                B if B is not None else torch.zeros((1, rank), dtype=torch.float64), out_rank)
        if A is not None:
            As[module] = A_pad
        if B is not None:
            Bs[module] = B_pad
    return As, Bs, {k: shared[k].double() for k in other}


def _check_range(tensors: Mapping[str, Any], scale: float, clip: float) -> None:
    for key, t in tensors.items():
        peak = float(t.abs().max()) * scale if t.numel() else 0.0
        if not peak <= clip:  # SecAgg+ would clip it silently: a wrong sum
            raise ConfigError(f"{key}: |value|·n/max-weight = {peak:.3g} exceeds run-config secagg-clipping-range={clip}",
                              fix=f"set secagg-clipping-range = {2 ** np.ceil(np.log2(max(peak, 1e-30))):g}")


def secagg_client_round(content: RecordDict, context: Context) -> RecordDict:
    """One SecAgg exchange on a node: ``train`` (phase 1: train, send the sums' terms) or ``solve`` (FedA²'s phase 2)."""
    import torch
    from flwr.compat.common import recorddict_compat as compat

    from uniflow_cli.flower.client import run_client_round
    from uniflow_cli.flower.records import (
        HEADER_KEY,
        REPLY_KEY,
        record_to_tensors,
        tensors_to_record,
    )
    from uniflow_cli.flower.settings import FlowerRunSettings
    from uniflow_cli.peft_keys import lora_key

    settings = FlowerRunSettings.from_run_config(context.run_config)
    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    config = fitins.config
    received = _arrays(json.loads(str(config[KEYS_KEY])), fitins.parameters)
    max_weight = float(config[WEIGHT_KEY])
    if config[PHASE_KEY] == "solve":  # FedA² phase 2: B_k (A_k Āᵀ), from this node's phase-1 factors
        pending = context.state.array_records.get(PENDING_KEY)
        if pending is None:
            raise UsageError("a FedA² solve message reached a node that did not train this round", fix="none: the server skips the round")
        mine = record_to_tensors(pending, where="pending")
        n = int(mine.pop("uniflow.n").item())
        M = {lora_key(m, "B"): mine[lora_key(m, "B")].double() @ (mine[lora_key(m, "A")].double() @ received[lora_key(m, "A")].double().T)
             for m in {k.rsplit(".lora_", 1)[0] for k in mine}}
        del context.state.array_records[PENDING_KEY]
        _check_range(M, n / max_weight, settings.secagg_clipping_range)
        return _fitres(M, n, {"phase": "solve"})
    header = json.loads(str(config[HEADER_KEY]))
    plain = RecordDict({"arrays": tensors_to_record(received), "config": ConfigRecord({HEADER_KEY: str(config[HEADER_KEY])})})
    reply = run_client_round(plain, context.run_config, context.node_config)
    info = dict(reply.config_records[REPLY_KEY])
    shared = record_to_tensors(reply.array_records["arrays"], where="reply")
    n = int(reply.metric_records["metrics"]["num-examples"]) if config.get("uniflow.weighting") == "examples" else 1
    if n > max_weight:
        raise ConfigError(f"{n} examples exceed run-config secagg-max-weight={max_weight:g}", fix=f"set secagg-max-weight = {2 ** int(np.ceil(np.log2(n)))}")
    As, Bs, other = upload_factors(shared, json.loads(str(info["peft-config"])), header["peft_config"], received)
    spec = method_spec(header["method"]).at_round(int(header["round"]) + 1)  # RoLoRA: this round's phase
    send = dict(other)
    send.update({lora_key(m, "A"): A for m, A in As.items()} if spec.needs_A else {})
    send.update({lora_key(m, "B"): B for m, B in Bs.items()} if spec.needs_B and not spec.solves_under_secagg else {})
    if spec.solves_under_secagg:  # kept on the node for phase 2 (never sent: only B_k (A_k Āᵀ) leaves it, masked)
        keep = {lora_key(m, "A"): A for m, A in As.items()} | {lora_key(m, "B"): B for m, B in Bs.items()}
        context.state.array_records[PENDING_KEY] = tensors_to_record({**keep, "uniflow.n": torch.tensor([float(n)])})
    _check_range(send, n / max_weight, settings.secagg_clipping_range)
    return _fitres(send, n, {k: str(v) for k, v in info.items()})


# ------------------------------------------------------------------------------------------ server side
class _Exchange:
    """The legacy ``Strategy`` face SecAggPlusWorkflow drives for one exchange: it names the nodes and their FitIns,
    and receives only the unmasked *sum* (SecAgg+ puts the aggregate into every FitRes before calling it)."""

    def __init__(self, nodes: Sequence[int], grid: Any, tensors: Mapping[str, Any], config: dict[str, Any]) -> None:
        self.nodes, self.grid, self.tensors, self.config = list(nodes), grid, tensors, config
        self.total: dict[str, Any] | None = None
        self.replies: dict[int, dict[str, Any]] = {}  # node → its plaintext reply metadata (no tensors)

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list[tuple[Any, Any]]:
        from flwr.common import FitIns, ndarrays_to_parameters
        from flwr.server.compat.grid_client_proxy import GridClientProxy

        keys = sorted(self.tensors)
        params = ndarrays_to_parameters([self.tensors[k].detach().to("cpu").float().numpy() for k in keys])
        ins = FitIns(params, {**self.config, KEYS_KEY: json.dumps(keys)})
        return [(GridClientProxy(nid, self.grid, 0), ins) for nid in self.nodes]

    def aggregate_fit(self, server_round: int, results: list[tuple[Any, Any]], failures: list[Any]) -> tuple[Any, dict[str, Any]]:
        if results:
            summed = results[0][1]  # every result carries the same aggregate: the only tensors the server sees
            self.total = _arrays(json.loads(str(summed.metrics[KEYS_KEY])), summed.parameters)
            self.replies = {proxy.node_id: dict(res.metrics) for proxy, res in results}
        return None, {}


def quantization_range(settings: Any, nodes: int) -> int:
    """Q: the run config's, or (0) the largest power of two ≤ 2^30 with nodes · Q < 2^32 (no overflow of the masked sum)."""
    if settings.secagg_quantization_range:
        return int(settings.secagg_quantization_range)
    q = 2**30
    while nodes * q >= MOD_RANGE:
        q //= 2
    return q


def run_exchange(grid: Any, context: Context, settings: Any, server_round: int, exchange: _Exchange, max_weight: float) -> _Exchange:
    """One SecAgg+ sum over ``exchange.nodes`` (Flower's workflow: setup, share keys, masked vectors, unmask)."""
    from flwr.server import ServerConfig
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD

    legacy = LegacyContext(Context(context.run_id, context.node_id, context.node_config, RecordDict(), context.run_config),
                           config=ServerConfig(num_rounds=1), strategy=exchange)  # type: ignore[arg-type]
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({"current_round": server_round})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    shares = settings.secagg_num_shares or 1.0  # 0: every sampled node holds a share of every key (Flower's 1.0)
    workflow = SecAggPlusWorkflow(shares, settings.secagg_reconstruction_threshold, max_weight=max_weight,
                                  clipping_range=settings.secagg_clipping_range, quantization_range=quantization_range(settings, len(exchange.nodes)),
                                  timeout=settings.round_timeout)
    workflow(grid, legacy)
    return exchange


def secagg_round(grid: Any, context: Context, settings: Any, inner: Any, server_round: int, nodes: Sequence[int]) -> bool:
    """One FedA² (two exchanges) / FedIT / FFA (one) round over masked sums; publishes the global. False: skipped."""
    from uniflow_cli.flower.records import HEADER_KEY, global_header

    opts, t = inner.options, inner.round_offset + server_round
    max_weight = settings.secagg_max_weight if inner.weighting == "examples" else 1.0
    base = {HEADER_KEY: global_header(inner.current, round_=t - 1, method=opts.method), WEIGHT_KEY: max_weight, "uniflow.weighting": inner.weighting}
    first = run_exchange(grid, context, settings, server_round, _Exchange(nodes, grid, inner.current.tensors, {**base, PHASE_KEY: "train"}), max_weight)
    reason = _refuse(inner, first, nodes)
    second = None
    if reason is None and method_spec(opts.method).solves_under_secagg:
        A_bar = {k: v for k, v in first.total.items() if k.endswith("lora_A.weight")}  # type: ignore[union-attr]
        second = run_exchange(grid, context, settings, server_round, _Exchange(sorted(first.replies), grid, A_bar, {**base, PHASE_KEY: "solve"}), max_weight)
        if second.total is None or set(second.replies) != set(first.replies):  # a phase-2 dropout changes the weights: M ≠ Σ_{phase 1}
            reason = "the nodes of the two exchanges differ (a node dropped between them)"
    if reason is not None:
        log(WARNING, "round %d: secagg: %s; the global is not updated", t, reason)
        return False
    _publish(inner, server_round, first, second, settings)
    return True


def _refuse(inner: Any, first: _Exchange, nodes: Sequence[int]) -> str | None:
    if first.total is None:
        return "SecAgg+ halted (too few nodes replied for its reconstruction threshold)"
    if len(first.replies) < inner.min_train_nodes:
        return f"{len(first.replies)} nodes contributed, fewer than min-train-nodes={inner.min_train_nodes}"
    clients = [str(info.get("client-id")) for info in first.replies.values()]
    if len(set(clients)) != len(clients):  # two nodes with one partition-id: that shard counted twice in the sum
        return f"client ids {sorted(clients)} repeat (two nodes share a partition-id)"
    for node, info in first.replies.items():  # a bad reply cannot be taken out of a sum: the round is dropped
        fingerprint = str(info.get("base-fingerprint", ""))
        if inner.base_fingerprint and fingerprint != inner.base_fingerprint:
            return f"node {node} trained on base {fingerprint[:16]}…, the global's base is {inner.base_fingerprint[:16]}…"
    return None


def fused_tensors(method: str, start: Mapping[str, Any], first: Mapping[str, Any], second: Mapping[str, Any] | None,
                  lambda_: float, ridge: str, rcond: float, round_: int = 1) -> tuple[dict[str, Any], list[Any]]:
    """The global of round ``round_`` from the sums: fedA2 solves B from M = Σ w_k B_k (A_k Āᵀ) (linalg's Eq. 13
    rules), fedit takes the averages, ffa (and RoLoRA's B rounds) keeps the start's frozen A, RoLoRA's A rounds its
    frozen B. Returns (tensors in float32, per-layer (module, branch, cond))."""
    import torch

    from uniflow_cli.aggregation.linalg import choose_ridge_branch, solve_right_spd
    from uniflow_cli.peft_keys import lora_key, lora_modules

    spec = method_spec(method).at_round(round_)
    modules, other = lora_modules(list(start))
    out = {k: first[k].float() for k in other}
    layers = []
    for module in sorted(modules):
        a_key, b_key = lora_key(module, "A"), lora_key(module, "B")
        A = start[a_key].float().clone() if spec.frozen_A else first[a_key].float()
        if spec.solves_under_secagg:
            A64 = A.double()
            G = A64 @ A64.T
            decision = choose_ridge_branch(G, lambda_, ridge, rcond)
            B, branch = solve_right_spd(second[b_key], G, decision.branch, lambda_, rcond)  # type: ignore[index]
            layers.append((module, branch, decision.cond))
        else:
            B = start[b_key].float().clone() if spec.frozen_B else first[b_key]
            layers.append((module, "-", None))
        out[a_key], out[b_key] = A.contiguous(), B.to(torch.float32).contiguous()
    return out, layers


def _publish(inner: Any, server_round: int, first: _Exchange, second: _Exchange | None, settings: Any) -> None:
    from uniflow_cli.aggregation.core import (
        AggregationResult,
        LayerReport,
        check_output,
    )
    from uniflow_cli.flower.records import tensors_to_record
    from uniflow_cli.global_info import GlobalInfo, global_meta

    opts, t = inner.options, inner.round_offset + server_round
    tensors, layers = fused_tensors(opts.method, inner.current.tensors, first.total, second.total if second else None, opts.lambda_, opts.ridge,
                                    opts.rcond, round_=t)
    check_output(tensors, {})
    result = AggregationResult(tensors, dict(inner.current.peft_config), opts.method, [], [LayerReport(m, 0, b, c, None) for m, b, c in layers],
                               notes=["secure aggregation (SecAgg+): the server saw only the sums; per-client weights are not known"])
    infos = sorted(first.replies.values(), key=lambda i: str(i.get("client-id")))
    secagg = {"protocol": "SecAgg+ (flwr)", "exchanges": 2 if second else 1, "num_shares": settings.secagg_num_shares or "all",
              "reconstruction_threshold": settings.secagg_reconstruction_threshold, "clipping_range": settings.secagg_clipping_range,
              "quantization_range": quantization_range(settings, len(infos)), "max_weight": settings.secagg_max_weight if inner.weighting == "examples" else 1.0}
    meta = global_meta(
        result, round_=t, base_fingerprint=inner.base_fingerprint, num_examples=None,
        modalities=[m for i in infos for m in json.loads(str(i.get("modalities", "[]")))],
        options={"lambda": opts.lambda_, "ridge": opts.ridge, "rcond": opts.rcond, "weighting": inner.weighting, "dtype": "float32"},
        clients=[{"client_id": str(i.get("client-id"))} for i in infos], engine={"name": "flower", "rejected": [], "secagg": secagg},
        settings=GlobalInfo.of(inner.current.meta).settings,
    )
    inner.pending = (t, result, meta)
    inner.publish(server_round, tensors_to_record(tensors))
    log(INFO, "round %d: fused %d clients under secure aggregation with %s", t, len(infos), opts.method)


def run_secagg_server(grid: Any, context: Context) -> None:
    """The ServerApp's rounds with ``secagg = true``: sample, exchange(s), publish — as many rounds as configured."""
    from flwr.serverapp.strategy.strategy_utils import sample_nodes

    from uniflow_cli.flower.records import tensors_to_record
    from uniflow_cli.flower.server import build_strategy, evaluation_hook
    from uniflow_cli.flower.settings import FlowerRunSettings
    from uniflow_cli.workspace import find_workspace

    settings = FlowerRunSettings.from_run_config(context.run_config)
    workspace = find_workspace(settings.workspace_path())
    _, inner = build_strategy(settings, workspace)
    check_secagg_settings(settings, inner.options.method)  # the workspace's method, when the run config names none
    evaluate = evaluation_hook(settings, workspace, inner)
    if evaluate is not None:  # a missing test split stops the run now, as in the plain path
        from uniflow_cli.evaluation import check_workspace_evaluation

        check_workspace_evaluation(workspace.root, [inner.round_offset + r for r in settings.eval_round_set(settings.num_server_rounds)])
    for server_round in range(1, settings.num_server_rounds + 1):
        _, available = sample_nodes(grid, settings.min_available_nodes, 0)
        nodes = sorted(available)[: max(settings.min_train_nodes, int(len(available) * settings.fraction_train))]
        if len(nodes) * quantization_range(settings, len(nodes)) >= MOD_RANGE:
            raise ConfigError(f"{len(nodes)} nodes × secagg-quantization-range={settings.secagg_quantization_range} overflow SecAgg+'s 2^32 modulus",
                              fix=f"set secagg-quantization-range <= {2 ** (31 - int(np.ceil(np.log2(len(nodes)))))}")
        if secagg_round(grid, context, settings, inner, server_round, nodes) and evaluate is not None:
            evaluate(server_round, tensors_to_record(inner.current.tensors))
    missing = [inner.round_offset + r for r in range(1, settings.num_server_rounds + 1) if inner.round_offset + r not in inner.published]
    if missing:
        log(WARNING, "rounds %s published no global", missing)


def check_secagg_settings(settings: Any, method: str | None = None) -> None:
    """``secagg = true`` is refused in one line where it cannot hold: a method that needs individual adapters, a
    defense or DP that needs individual updates, fewer nodes than SecAgg+'s threshold, ranges that overflow."""
    method = method or settings.method
    if method and method not in SECAGG_METHODS:
        raise ConfigError(f"secagg=true with method {method!r}: it needs the individual client adapters, secure aggregation yields only their sum",
                          fix=f"use secagg with {', '.join(SECAGG_METHODS)}")
    if settings.dp or settings.robust or settings.clip_update_norm is not None:
        raise ConfigError("secagg=true with dp / robust / clip-update-norm: those need each client's update, secure aggregation hides it",
                          fix="drop dp, robust and clip-update-norm, or secagg")
    threshold = settings.secagg_reconstruction_threshold
    if threshold < 2 or settings.min_train_nodes < threshold:
        raise ConfigError(f"secagg with min-train-nodes={settings.min_train_nodes} but secagg-reconstruction-threshold={threshold}: "
                          "SecAgg+ needs at least 2 nodes and at least its threshold", fix=f"set min-train-nodes >= {max(threshold, 2)} (and threshold >= 2)")
    shares = settings.secagg_num_shares
    if shares != 0 and not threshold < shares:
        raise ConfigError(f"secagg-num-shares={shares} must exceed secagg-reconstruction-threshold={threshold}", fix="set secagg-num-shares = 0 (every node)")
    q = settings.secagg_quantization_range
    if not (q == 0 or (q >= 2 and q & (q - 1) == 0 and q <= 2**30)) or not settings.secagg_clipping_range > 0 or not settings.secagg_max_weight >= 1:
        raise ConfigError(f"secagg-quantization-range={q}, secagg-clipping-range={settings.secagg_clipping_range}, secagg-max-weight={settings.secagg_max_weight}",
                          fix="use 0 (automatic) or a power of two <= 2^30, a clipping range > 0 and a max weight >= 1 (defaults: 0, 1.0, 1024)")
