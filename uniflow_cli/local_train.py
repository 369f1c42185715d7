"""``uniflow local-train``'s library function: resolve the target, build the inputs, train, publish.

:func:`run_local_train` is three steps, each a function:

* :func:`resolve_target` — which global, shard, output and client state, and which round. Workspace mode
  (a client id) reads the workspace layout; explicit mode (``global_dir``, ``data_dir``, ``out``) uses only
  what it is given: no workspace from the cwd or ``$UNIFLOW_WORKSPACE``, only an explicit ``workspace``.
* :func:`build_inputs` — the shard, the global, the method, the model and LoRA settings (the workspace's,
  else a given preset, else the settings the global records), the history FedEx/FLoRA fold, FedSA's B.
* :func:`publish` — the drop, atomically, then the client state (FedSA's B, FedDPA's local adapter; nothing is published on error).

Round numbering: a client reads ``rounds/t/global`` (t = latest published) and drops into
``rounds/t+1/clients/<k>``; the server fuses those into ``rounds/t+1/global``.

Errors are in library terms: a problem with one given value is :func:`~uniflow_cli.errors.worded` with a
placeholder for its parameter (``{round_}``, ``{state_dir}``...), which the CLI boundary words as that
parameter's flag.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uniflow_cli.client_round import ClientRound, method_may_keep_state, read_client_state, train_client_round, write_client_state
from uniflow_cli.errors import ConfigError, TrainingError, UsageError, worded
from uniflow_cli.settings import TrainSettings, resolve_train
from uniflow_cli.training import TrainStats

StepHook = Callable[[int, int, float, str], None]


@dataclass
class LocalTrainOutcome:
    out: Path
    round: int
    method: str
    stats: TrainStats
    upload_bytes: int
    state_dir: Path | None
    folded_rounds: list[int]


@dataclass
class Target:
    """Where one client's round reads and writes. ``ws`` is the workspace settings and history come from
    (None: explicit mode without a workspace); ``t`` the round of the starting global."""

    ws: Any
    client: str | None
    global_dir: Path
    data_dir: Path
    out: Path
    state_dir: Path | None
    t: int
    round: int
    explicit: bool  # paths given (global_dir, data_dir, out) rather than read from the workspace layout


@dataclass
class Inputs:
    cfg: TrainSettings
    dataset: Any
    start: Any  # LoadedAdapter of the global
    spec: Any  # MethodSpec
    model: Any  # ModelSettings
    lora: Any  # LoraSettings
    client_id: str | None
    history: list[tuple[int, Any]]
    private: dict[str, Any] | None  # the client state of its last round (FedSA's B, FedDPA's local adapter)


# --------------------------------------------------------------------------------------------------
# 1. The target
# --------------------------------------------------------------------------------------------------
def read_adapter_round(global_dir: Path) -> int:
    """The round a global adapter records (0 when it records none)."""
    from uniflow_cli.adapters import open_adapter

    meta = open_adapter(global_dir).meta
    return meta.round if meta is not None and meta.round is not None else 0


def resolve_target(*, client: str | None, workspace: Path | None, global_dir: Path | None, data_dir: Path | None, out: Path | None,
                   round_: int | None, state_dir: Path | None, wait: bool) -> Target:
    """The paths and rounds of this run (nothing is read but the workspace config and the global's round)."""
    from uniflow_cli.paths import check_id
    from uniflow_cli.workspace import find_workspace

    if client is not None:
        client = check_id(client)  # it names directories: never '../..' or a path
    if round_ is not None and round_ < 1:
        raise worded(UsageError, "{round_} {r}: round 0 is the initial global", fix="train for a round >= 1", r=round_)
    given = {"global_dir": global_dir, "data_dir": data_dir, "out": out}
    if any(v is not None for v in given.values()):
        missing = next((name for name, v in given.items() if v is None), None)
        if missing is not None:
            raise worded(UsageError, f"explicit mode needs {{{missing}}} too (a global to start from, the client's data and the output)",
                         fix=f"give {{{missing}}} as well, or train a workspace's client instead")
        # Only a workspace named explicitly: one found in the cwd or $UNIFLOW_WORKSPACE is not what was given.
        ws = find_workspace(workspace) if workspace is not None else None
        t = read_adapter_round(global_dir)  # type: ignore[arg-type]
        return Target(ws, client, Path(global_dir), Path(data_dir), Path(out), state_dir,  # type: ignore[arg-type]
                      t, t + 1 if round_ is None else round_, explicit=True)
    ws = find_workspace(workspace)
    if client is None:
        raise worded(UsageError, "which client? {client} is not given", fix="give {client} K (its shard is data/clients/K)")
    if round_ is not None:
        t = round_ - 1
    elif wait:
        # The round after this client's last drop: its global may not be published yet.
        dropped = [r for r in ws.rounds() if ws.client_drop(r, client).is_dir()]  # client_drop checks the id
        t = max(ws.latest_global_round(), dropped[-1] if dropped else 0)
    else:
        t = ws.latest_global_round()
    return Target(ws, client, ws.global_dir(t), ws.client_data(client), ws.client_drop(t + 1, client),
                  state_dir or ws.client_state(client), t, t + 1, explicit=False)


def await_global(target: Target, *, wait: bool, timeout: float, poll: float, on_wait: Callable[[str], None] | None = None) -> None:
    """Workspace mode: the starting global exists (after waiting for it with ``wait``), this round is open."""
    ws, t, global_dir = target.ws, target.t, target.global_dir
    if target.explicit:
        return  # the global was read already (its round numbers this one)
    if wait and not global_dir.is_dir():
        if on_wait is not None:
            on_wait(f"waiting for the round-{t} global ({global_dir})")
        deadline = time.monotonic() + timeout
        while not global_dir.is_dir():
            if time.monotonic() >= deadline:
                raise TrainingError(f"round {t}'s global was not published within {timeout:g} s ({global_dir})",
                                    fix="check the server, or wait longer (timeout)")
            time.sleep(poll)
    if not global_dir.is_dir():
        raise worded(UsageError, "round {t} has no published global ({path})", fix="wait for the server, or pick an earlier {round_}",
                              t=t, path=global_dir)
    if ws.global_dir(target.round).is_dir():
        raise worded(UsageError, "round {r} is already closed: its global is published ({path})", fix="train for the next round (omit {round_})",
                              r=target.round, path=ws.global_dir(target.round))


def check_apart(target: Target, method: str | None) -> None:
    """The drop never lands on or inside its inputs; client state never overlaps the dataset."""
    from uniflow_cli.paths import overlap

    for what, given in (("global adapter", target.global_dir), ("client's dataset", target.data_dir), ("client state", target.state_dir)):
        if given is not None and (relation := overlap(target.out, given)) is not None:
            raise worded(UsageError, "{out} {path} {relation} the {what} {given}", fix="publish the client adapter apart from its inputs",
                                  path=target.out, relation=relation, what=what, given=given)
    if target.state_dir is not None and method_may_keep_state(method) and (relation := overlap(target.state_dir, target.data_dir)) is not None:
        raise worded(UsageError, "{state_dir} {state} {relation} the client's dataset {data}", fix="keep client state apart from the dataset",
                              state=target.state_dir, relation=relation, data=target.data_dir)


# --------------------------------------------------------------------------------------------------
# 2. The inputs
# --------------------------------------------------------------------------------------------------
def model_settings_for(target: Target, start: Any, preset: str | None) -> tuple[Any, Any]:
    """(ModelSettings, LoraSettings): the workspace's (``preset`` overriding its base), else in explicit mode
    what the global records (``extra.settings``, written by ``uniflow init`` and carried every round), else
    ``preset`` with default LoRA settings. A preset the global records too keeps its other settings
    (modalities, pooling: the base's fingerprint depends on them). The LoRA rank is the client's own where
    ``[lora] client_ranks`` gives it one."""
    from uniflow_cli.global_info import recorded_settings
    from uniflow_cli.settings import LoraSettings, resolve, resolve_model

    if target.ws is not None:
        return resolve_model(target.ws, {"preset": preset}), resolve(LoraSettings, target.ws).for_client(target.client)
    recorded = recorded_settings(start.meta, str(target.global_dir))
    if recorded is not None and preset in (None, recorded[0].preset):
        return recorded[0], recorded[1].for_client(target.client)
    if preset is None:
        raise worded(UsageError, "{path} records no usable model settings, and {preset} is not given",
                              fix="give {preset} (smol, tiny-random or custom: the base the global was made for)", path=target.global_dir)
    return resolve_model(None, {"preset": preset}), resolve(LoraSettings, None)


def _own_rank(lora: Any, rank: Any, start: Any) -> Any:
    """``lora`` at the client's own ``rank``: a whole number in [1, the global's r] (a LoRA global)."""
    import dataclasses

    from uniflow_cli.peft_keys import adapter_family

    if adapter_family(start.peft_config) != "lora":
        raise ConfigError.invalid("rank", rank, "applies to LoRA globals only (a VeRA federation has one rank)", fix="train at the federation's rank (drop it)")
    top = int(start.peft_config.get("r", lora.r))
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= top:
        raise ConfigError.invalid("rank", rank, f"must be a whole number in [1, {top}] (the global's rank)", example=max(1, top // 2))
    return dataclasses.replace(lora, r=rank)


def _history(target: Target, spec: Any, start: Any) -> list[tuple[int, Any]]:
    """Earlier globals to fold (FedEx residuals, FLoRA merges): the workspace's rounds 1..t, else the given one."""
    from uniflow_cli.adapters import read_adapter

    if not spec.folds_history or (spec.merges_into_base and not (start.meta is not None and start.meta.round)):
        return []  # FLoRA's round 0 global is a fresh LoRA: nothing merged yet
    ws = target.ws
    if ws is None:
        return [(target.t, start)]
    return [(r, read_adapter(ws.global_dir(r))) for r in range(1, target.t + 1) if ws.global_dir(r).is_dir()]


def build_inputs(target: Target, cfg: TrainSettings, *, method: str | None, preset: str | None, rank: int | None = None) -> Inputs:
    """Read the shard and the global; decide the method, the model, the history and FedSA's B."""
    from uniflow_cli.adapters import read_adapter
    from uniflow_cli.aggregation.registry import DEFAULT_METHOD, method_spec
    from uniflow_cli.data.build import load_split
    from uniflow_cli.settings import AggregateSettings, load_section

    dataset = load_split(target.data_dir)
    start = read_adapter(target.global_dir)
    if start.meta is not None and start.meta.role != "global":
        raise UsageError(f"{target.global_dir} is a {start.meta.role} adapter", fix="start from the global adapter the server published")
    recorded = start.meta.method if start.meta and start.meta.method else None
    name = method or recorded or load_section(target.ws, AggregateSettings).get("method") or DEFAULT_METHOD
    try:
        spec = method_spec(name)
    except ConfigError as exc:
        if method is not None:
            raise  # the caller's value: its field names it (the CLI: --method)
        source = f"{target.global_dir}'s uniflow.json" if recorded else f"{target.ws.config_path} [aggregate]"
        raise ConfigError(f"{source}: {exc.problem}", fix=exc.fix) from None
    if spec.keeps_client_state and target.state_dir is None:
        # Without a place to keep it, the client's own B (local adapter) would be trained and then thrown away.
        kept = "B" if spec.private_B else "local adapter"
        raise worded(UsageError, "method {method} keeps each client's {kept} between rounds, but {state_dir} is not given",
                              fix="give {state_dir} DIR (this client's private directory)", method=spec.name, kept=kept)
    model, lora = model_settings_for(target, start, preset)
    if rank is not None:
        lora = _own_rank(lora, rank, start)
    client_id = target.client if target.client is not None else (start.meta.client_id if start.meta else None)
    return Inputs(cfg, dataset, start, spec, model, lora, client_id, _history(target, spec, start), read_client_state(target.state_dir, spec))


# --------------------------------------------------------------------------------------------------
# 3. Publish
# --------------------------------------------------------------------------------------------------
def publish(target: Target, inputs: Inputs, result: ClientRound, *, force: bool) -> LocalTrainOutcome:
    """The drop (atomically; read back as the server will), then the client state (FedSA's B, FedDPA's local adapter)."""
    from uniflow_cli.adapters import open_adapter, write_adapter

    written = write_adapter(target.out, peft_config=result.peft_config, tensors=result.shared, meta=result.meta, force=force)
    kept = write_client_state(target.state_dir, result) if target.state_dir is not None else None
    open_adapter(written)  # read back: what we published is what the server will verify
    return LocalTrainOutcome(written, target.round, inputs.spec.name, result.stats, result.upload_bytes,
                             Path(target.state_dir) if kept is not None else None, result.folded_rounds)


def _recorded_path(ws: Any, path: Path) -> str | None:
    """What a drop records of where it started: relative to the workspace, never the client's absolute
    layout (that would leak it to the server and make drops differ byte for byte across machines)."""
    if ws is None:
        return None
    try:
        return Path(path).resolve().relative_to(ws.root).as_posix()
    except ValueError:
        return None


def run_local_train(
    cfg: TrainSettings | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    client: str | None = None,
    workspace: Path | None = None,
    global_dir: Path | None = None,
    data_dir: Path | None = None,
    out: Path | None = None,
    method: str | None = None,
    round_: int | None = None,
    total_rounds: int | None = None,
    preset: str | None = None,
    state_dir: Path | None = None,
    rank: int | None = None,
    force: bool = False,
    wait: bool = False,
    timeout: float = 600.0,
    poll: float = 2.0,
    device: Any = "auto",
    gradient_checkpointing: bool = False,
    on_step: StepHook | None = None,
    on_wait: Callable[[str], None] | None = None,
    build: Callable[..., Any] | None = None,
) -> LocalTrainOutcome:
    """Resolve the target, train one client's round, publish the drop (and the client state: FedSA's B, FedDPA's local adapter).

    ``cfg`` is used as given; without it the training settings are ``overrides`` (field → value, None = not
    given) over the target workspace's ``[train]`` (explicit mode without ``workspace``: the built-in
    defaults). ``device`` (``auto | cpu | cuda[:N] | mps``) and ``gradient_checkpointing`` belong to this
    machine, not to the experiment's settings. ``build`` makes the starting model (default
    ``models.load_model``; ``uniflow simulate`` passes its pool of one loaded model). ``rank``: train at this LoRA
    rank (≤ the global's; heterogeneous ranks without a workspace's ``[lora] client_ranks``). Nothing is published on error."""
    from uniflow_cli.atomic import check_writable_target
    from uniflow_cli.adapters import is_adapter_of_role
    from uniflow_cli.compute import check_precision, resolve_device
    from uniflow_cli.federation import check_wait_options

    check_wait_options(timeout, poll)
    device = resolve_device(device)  # first: a machine without the device learns it before any reading or waiting
    target = resolve_target(client=client, workspace=workspace, global_dir=global_dir, data_dir=data_dir, out=out, round_=round_,
                            state_dir=state_dir, wait=wait)
    cfg = cfg if cfg is not None else resolve_train(target.ws, overrides)
    if cfg.stage_by == "round" and cfg.stages in ("two-stage", "reverse") and total_rounds is None:
        raise worded(UsageError, "staging by round needs {total_rounds} (the number of rounds R)", fix="give {total_rounds} R")
    check_precision(cfg.precision, device)
    await_global(target, wait=wait, timeout=timeout, poll=poll, on_wait=on_wait)
    check_apart(target, method)
    check_writable_target(target.out, force=force, replaces=lambda p: is_adapter_of_role(p, "client"), kind="uniflow client adapter")
    inputs = build_inputs(target, cfg, method=method, preset=preset, rank=rank)
    result = train_client_round(
        inputs.cfg, inputs.start, inputs.dataset, inputs.model, inputs.lora, method=inputs.spec, client_id=inputs.client_id,
        round_=target.round, history=inputs.history, private=inputs.private, private_where=str(target.state_dir or "client state"),
        total_rounds=total_rounds, started_from=_recorded_path(target.ws, target.global_dir), device=device,
        gradient_checkpointing=gradient_checkpointing, on_step=on_step, build=build,
    )
    return publish(target, inputs, result, force=force)

