"""The server's side of a Flower run: workspace → strategy → rounds (→ evaluation after chosen rounds)."""

from __future__ import annotations

from collections.abc import Mapping
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.supercore import log

from uniflow_cli.errors import ConfigError, UsageError
from uniflow_cli.flower.records import tensors_to_record
from uniflow_cli.flower.settings import DP_METHODS, FlowerRunSettings, in_run_config_terms
from uniflow_cli.flower.strategy import UniflowFedAvg, UniflowServerSideDP, header_only


def build_strategy(settings: FlowerRunSettings, workspace: Any) -> tuple[Any, UniflowFedAvg]:
    """(the strategy to run — maybe DP-wrapped —, the uniflow strategy inside it)."""
    from uniflow_cli.adapters import read_adapter
    from uniflow_cli.aggregation.registry import check_family, method_spec
    from uniflow_cli.peft_keys import adapter_family
    from uniflow_cli.server import core_options
    from uniflow_cli.settings import AggregateSettings, resolve, resolve_model

    model = resolve_model(workspace)
    if settings.preset and model.preset != settings.preset:
        raise ConfigError(f"run-config preset={settings.preset!r} but {workspace.config_path} uses {model.preset!r}", fix="make them agree (or set preset = '')")
    chosen = in_run_config_terms(lambda: resolve(AggregateSettings, workspace, settings.aggregate_overrides()))
    options = core_options(chosen)
    spec = method_spec(options.method)
    if options.robust is not None:  # from the run config or the workspace's [aggregate]: a round needs enough replies
        from uniflow_cli.aggregation.robust import check_robust_clients

        in_run_config_terms(lambda: check_robust_clients(options.robust_spec, settings.min_train_nodes, field="robust"))
    if settings.dp and not spec.line_up:
        raise ConfigError(f"dp=true with method {options.method!r}: its replies do not line up with the global array by array", fix=f"use dp with {', '.join(DP_METHODS)}")
    t0 = workspace.latest_global_round()
    start = read_adapter(workspace.global_dir(t0))
    if start.meta is not None and start.meta.role != "global":
        raise UsageError(f"{workspace.global_dir(t0)} is a {start.meta.role} adapter", fix="re-publish the global")
    family = adapter_family(start.peft_config)
    in_run_config_terms(lambda: check_family(spec, family))  # e.g. svd on a VeRA workspace: one line, before any round
    if settings.dp and family == "vera":  # the global carries the shared projections, which no reply holds
        raise ConfigError("dp=true with a VeRA workspace: its replies do not line up with the global (which alone carries the projections)",
                          fix="run VeRA without dp")
    history = [(r, header_only(workspace.global_dir(r))) for r in workspace.published_rounds() if 1 <= r <= t0] if spec.folds_history else []
    inner = UniflowFedAvg(
        workspace=workspace, options=options, start=start, round_offset=t0, history=history, weighting=chosen.weighting,
        fraction_train=settings.fraction_train, min_train_nodes=settings.min_train_nodes, min_available_nodes=settings.min_available_nodes,
    )
    if not settings.dp:
        return inner, inner
    return UniflowServerSideDP(inner, settings.dp_noise_multiplier, settings.dp_clipping_norm, settings.min_train_nodes), inner


def evaluation_hook(settings: FlowerRunSettings, workspace: Any, inner: UniflowFedAvg) -> Any:
    """Server-side evaluation (uniflow's evaluate core) after the rounds named by ``eval-rounds``."""
    wanted = settings.eval_round_set(settings.num_server_rounds)
    if not wanted:
        return None

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        t = inner.round_offset + server_round
        if server_round not in wanted or t not in inner.published:
            return None
        from uniflow_cli.evaluation import EvalOptions, EvalRequest, run_evaluate

        result = run_evaluate(EvalRequest(workspace=workspace, round=t), EvalOptions(limit=settings.eval_limit or None, device=settings.device_name(), precision=settings.precision or None))
        flat: dict[str, float] = {}
        for modality, values in result.payload["metrics"].items():
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    flat[f"{modality}/{name}"] = float(value)
        log(INFO, "round %d: evaluation written to %s", t, result.path)
        return MetricRecord(flat)

    return evaluate


def run_server(grid: Any, run_config: Mapping[str, Any]) -> Any:
    """Everything the ServerApp does; returns Flower's ``Result``."""
    from uniflow_cli.workspace import find_workspace

    settings = FlowerRunSettings.from_run_config(run_config)
    workspace = find_workspace(settings.workspace_path())
    strategy, inner = build_strategy(settings, workspace)
    wanted = settings.eval_round_set(settings.num_server_rounds)
    if wanted:  # a missing test split must stop the run now, not after the first round's training
        from uniflow_cli.evaluation import check_workspace_evaluation

        check_workspace_evaluation(workspace.root, [inner.round_offset + r for r in wanted])
    result = strategy.start(
        grid=grid,
        initial_arrays=tensors_to_record(inner.current.tensors),
        num_rounds=settings.num_server_rounds,
        timeout=settings.round_timeout,
        train_config=ConfigRecord(),
        evaluate_fn=evaluation_hook(settings, workspace, inner),
    )
    missing = [inner.round_offset + r for r in range(1, settings.num_server_rounds + 1) if inner.round_offset + r not in inner.published]
    if missing:
        log(WARNING, "rounds %s published no global (too few usable replies)", missing)
    return result
