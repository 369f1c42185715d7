"""``uniflow simulate``: many rounds of a file-drop federation in one process, the frozen base loaded once.

Round t is what ``examples/run_rounds.sh`` runs as separate commands — every selected client's
``uniflow local-train --round t`` (:func:`~uniflow_cli.local_train.run_local_train`), then the server's
``uniflow aggregate --round t`` (:func:`~uniflow_cli.server.run_round`) — through the same functions, so
it writes the same files: ``rounds/t/clients/<k>``, FedSA's ``state/clients/<k>``, ``rounds/t/global``
with its per-layer ``rounds/t/report.json``, and with ``eval_every`` the ``eval/round-t.json`` of
``uniflow evaluate``. What one process saves is a process start and a model build per command:
:class:`ModelPool` hands every client the model ``models.load_model`` would build, reset, not rebuilt.

Resuming: a round is complete when its global is published. A run continues after the latest published
round. The drops an interrupted round left are trained again rather than reused: a drop records neither
the thread count nor the shard's bytes, so reusing one could not be proved identical, and training again
costs at most one round. Private client state (FedSA's B) is copied aside before a client trains
(``state/simulate/<k>/round-<t>``) and put back before the round is trained again, so the retrained
client starts from the state it started from the first time; the copies go once the round is published.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from pathlib import Path
from typing import Any

from uniflow_cli.aggregation.registry import method_spec
from uniflow_cli.errors import (
    ConfigError,
    DataError,
    UsageError,
    WorkspaceError,
    worded,
)

BACKUP_DIR = ("state", "simulate")  # under the workspace: private state kept aside while a round runs
NO_STATE = ".none"  # suffix of the marker saying "this client had no private state before the round"


# --------------------------------------------------------------------------------------------------
# Which clients a round trains (pure)
# --------------------------------------------------------------------------------------------------
def sample_size(n: int, fraction: float) -> int:
    """How many of ``n`` clients a round trains at ``fraction``: ⌊f·n + ½⌋, at least one, at most n."""
    return max(1, min(n, math.floor(fraction * n + 0.5)))


def select_clients(clients: Sequence[str], fraction: float | None, seed: int, round_: int) -> list[str]:
    """The clients round ``round_`` trains, in ``clients`` order: all of them (``fraction`` None or 1),
    else the :func:`sample_size` whose sha256 of ``seed:round:id`` is smallest. A per-round sample that
    depends on its arguments only (no RNG state, the same on every platform and Python version), so a
    resumed run draws what the interrupted one drew."""
    if fraction is None or fraction >= 1:
        return list(clients)
    rank = sorted(clients, key=lambda c: hashlib.sha256(f"{seed}:{round_}:{c}".encode()).digest())
    chosen = set(rank[: sample_size(len(clients), fraction)])
    return [c for c in clients if c in chosen]


def due_for_evaluation(t: int, every: int | None, last: int) -> bool:
    """Round ``t`` is evaluated every ``every`` rounds and at the ``last`` one (never without ``every``)."""
    return every is not None and 1 <= t <= last and (t % every == 0 or t == last)


# --------------------------------------------------------------------------------------------------
# One loaded model for every client
# --------------------------------------------------------------------------------------------------
class ModelPool:
    """One loaded model, handed to each client round as ``models.load_model`` would build it.

    :meth:`load` has ``load_model``'s signature (it is the ``build`` seam of
    :func:`~uniflow_cli.client_round.starting_model`). Called with the arguments of the last build (model
    and LoRA settings, seed, dtype), it resets the model instead of building it: the trainable tensors
    (everything ``requires_grad`` after a build: LoRA and the projectors' copies) and the buffers are
    copied back from the build's snapshot, and so are the frozen base weights a FedEx residual or a FLoRA
    merge changed. Which ones changed is measured, not assumed: every frozen parameter's version counter
    (torch bumps it on each in-place write) is compared with the one it had when the model was handed out,
    and a changed one without a snapshot makes the next load build afresh and snapshot it from then on
    (one extra build, the first time history is folded). A build with other arguments (FLoRA's per-round
    seed, another rank) or a model whose parameters were replaced (``--quantize`` swaps the LLM's
    layers after the build) is built afresh too.

    Nothing else a fresh build starts from is model state: train_loop makes a new optimizer and scheduler,
    seeds the RNG (dropout's too), and sets train/eval mode and ``requires_grad`` itself.
    """

    def __init__(self, build: Callable[..., Any] | None = None) -> None:
        from uniflow_cli.models import load_model

        self._build = build or load_model
        self._model: Any = None
        self._key: str | None = None
        self._reset: list[tuple[str, Any]] = []  # (name, value after the build) of trainable parameters and buffers
        self._trainable: set[str] = set()  # what requires_grad after the build (train_loop narrows it per stage)
        self._frozen: dict[str, Any] = {}  # frozen parameter → its pristine value (it was seen to change)
        self._seen: list[tuple[str, Any, int]] = []  # (name, parameter, version) when the model was handed out
        self._learned: set[str] = set()  # frozen parameters seen to change: snapshot them on each build
        self.builds = 0
        self.build_seconds = 0.0

    def load(self, model_cfg: Any, lora_cfg: Any, seed: int = 0, *, progress: Any = None, dtype: Any = None, **options: Any) -> Any:
        key = _build_key(model_cfg, lora_cfg, seed, dtype, options)
        reusable = self._model is not None and key == self._key and self._same_parameters()
        changed = {name for name, p, version in self._seen if p._version != version} - self._trainable - set(self._frozen)
        if not reusable or changed:
            self._learned |= changed
            self._fresh(model_cfg, lora_cfg, seed, progress=progress, dtype=dtype, **options)
            self._key = key
        else:
            self._restore()
        self._seen = [(name, p, p._version) for name, p in self._model.named_parameters()]
        return self._model

    def release(self) -> None:
        """Drop the model (and its snapshots)."""
        self._model, self._key, self._reset, self._trainable, self._frozen, self._seen = None, None, [], set(), {}, []

    def _same_parameters(self) -> bool:
        """The model still holds the parameters it was handed out with (no layer was replaced)."""
        now = list(self._model.named_parameters())
        return len(now) == len(self._seen) and all(n == m and p is q for (n, p), (m, q, _) in zip(now, self._seen))

    def _fresh(self, *args: Any, **kwargs: Any) -> None:
        import gc

        self.release()
        gc.collect()  # the old model's memory back before the new one is built
        started = time.perf_counter()
        model = self._build(*args, **kwargs)
        self.build_seconds += time.perf_counter() - started
        self.builds += 1
        params = list(model.named_parameters())
        self._trainable = {n for n, p in params if p.requires_grad}
        self._reset = [(f"param:{n}", p.detach().clone()) for n, p in params if p.requires_grad]
        self._reset += [(f"buffer:{n}", b.detach().clone()) for n, b in model.named_buffers()]
        self._frozen = {n: p.detach().clone() for n, p in params if n in self._learned - self._trainable}
        self._model = model

    def _restore(self) -> None:
        import torch

        params, buffers = dict(self._model.named_parameters()), dict(self._model.named_buffers())
        with torch.no_grad():
            for name, value in self._reset:
                kind, _, key = name.partition(":")
                (params if kind == "param" else buffers)[key].copy_(value)  # a buffer may be a new object on the device
            for key, value in self._frozen.items():
                params[key].copy_(value)


class PoolSet:
    """Heterogeneous ranks (``[lora] client_ranks``): one :class:`ModelPool` per build (a rank-4 and a rank-8 client
    build different models), at most ``capacity`` loaded — the least recently used is released — so that clients
    of alternating ranks do not rebuild the model every time. The same ``load`` seam as a ModelPool."""

    def __init__(self, capacity: int, build: Callable[..., Any] | None = None) -> None:
        self.capacity = max(1, capacity)
        self._build = build
        self._pools: dict[str, ModelPool] = {}  # in order of use, the most recent last
        self._released = (0, 0.0)  # (builds, seconds) of the pools released so far

    def load(self, model_cfg: Any, lora_cfg: Any, seed: int = 0, *, progress: Any = None, dtype: Any = None, **options: Any) -> Any:
        key = _build_key(model_cfg, lora_cfg, seed, dtype, options)
        pool = self._pools.pop(key, None) or ModelPool(self._build)
        self._pools[key] = pool
        while len(self._pools) > self.capacity:
            self._drop(self._pools.pop(next(iter(self._pools))))
        return pool.load(model_cfg, lora_cfg, seed, progress=progress, dtype=dtype, **options)

    def _drop(self, pool: ModelPool) -> None:
        self._released = (self._released[0] + pool.builds, self._released[1] + pool.build_seconds)
        pool.release()

    def release(self) -> None:
        for pool in self._pools.values():
            self._drop(pool)
        self._pools.clear()

    @property
    def builds(self) -> int:
        return sum(p.builds for p in self._pools.values()) + self._released[0]

    @property
    def build_seconds(self) -> float:
        return sum(p.build_seconds for p in self._pools.values()) + self._released[1]


def pool_for(ws: Any) -> ModelPool | PoolSet:
    """A ModelPool, or a PoolSet holding one model per rank when the workspace's clients train at several."""
    from uniflow_cli.settings import LoraSettings, resolve

    lora = resolve(LoraSettings, ws)
    ranks = {lora.r, *lora.client_ranks.values()}
    return PoolSet(len(ranks)) if len(ranks) > 1 else ModelPool()


def _build_key(model_cfg: Any, lora_cfg: Any, seed: int, dtype: Any, options: dict[str, Any]) -> str:
    settings = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    lora = asdict(lora_cfg) if is_dataclass(lora_cfg) else repr(lora_cfg)  # LoraSettings, or another adapter family's settings
    payload = {"model": settings, "lora": lora, "seed": seed, "dtype": str(dtype), "options": {k: repr(v) for k, v in options.items()}}
    return json.dumps(payload, sort_keys=True, default=str)


# --------------------------------------------------------------------------------------------------
# The plan: every check before anything is written
# --------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    ws: Any  # Workspace
    rounds: int  # the last round to publish (R)
    method: str | None  # as given: None lets each command pick as it would (the global's, else [aggregate])
    aggregate: Any  # AggregateSettings
    precision: str | None  # an override of [train] precision
    seed: int  # [train] seed: the --fraction sample
    clients: list[str]  # the clients each round samples from
    fraction: float | None
    eval_every: int | None
    eval_options: Any  # EvalOptions
    device: Any  # torch.device
    gradient_checkpointing: bool
    start: int  # the latest published round when the run began
    fidelity: bool = False  # measure each round's function-space gap (uniflow_cli.fidelity) into rounds/t/fidelity.json

    def selected(self, t: int) -> list[str]:
        return select_clients(self.clients, self.fraction, self.seed, t)


def _check_numbers(rounds: Any, fraction: Any, eval_every: Any) -> None:
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError.invalid("rounds", rounds, "must be a whole number >= 1 (the last round to publish)", example=10)
    if fraction is not None and not (isinstance(fraction, (int, float)) and not isinstance(fraction, bool)
                                     and math.isfinite(fraction) and 0 < fraction <= 1):
        raise ConfigError.invalid("fraction", fraction, "must be in (0, 1] (the share of clients each round trains)", example=0.5)
    if eval_every is not None and (isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1):
        raise ConfigError.invalid("eval_every", eval_every, "must be a whole number >= 1 (evaluate every N rounds)", example=5)


def partition_clients(ws: Any) -> list[str]:
    """The clients ``uniflow partition`` made: ``data/partition.json``'s, else the shards in data/clients."""
    from uniflow_cli.federation import expected_clients
    from uniflow_cli.paths import is_valid_id

    found = expected_clients(ws)
    if not found and (ws.data_dir / "clients").is_dir():
        found = sorted((p.name for p in (ws.data_dir / "clients").iterdir() if is_valid_id(p.name) and p.is_dir()),
                       key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n))
    if not found:
        raise WorkspaceError(f"{ws.root} has no partitioned clients (data/partition.json lists none)", fix="run 'uniflow partition' first")
    return found


def choose_clients(ws: Any, given: Sequence[str] | None) -> list[str]:
    """``given`` client ids (None, or the single word ``all``: every partitioned client), each checked."""
    from uniflow_cli.paths import check_id

    known = partition_clients(ws)
    if given is None or list(given) == ["all"]:
        chosen = known
    else:
        chosen = []
        for raw in given:
            client = check_id(str(raw).strip())
            if client not in known:
                raise worded(UsageError, "{clients} names client {k!r}, which data/partition.json does not list",
                             "choose from {known} (or all)", k=client, known=", ".join(known))
            if client not in chosen:
                chosen.append(client)
        if not chosen:
            raise worded(UsageError, "{clients} names no client", "give ids such as 0,2 (or all)")
    for client in chosen:
        if not ws.client_data(client).is_dir():
            raise DataError(f"client {client} has no shard ({ws.client_data(client)})", fix="re-run 'uniflow partition'")
    return chosen


def plan_simulation(workspace: Any, rounds: int, *, method: str | None = None, clients: Sequence[str] | None = None,
                    fraction: float | None = None, eval_every: int | None = None, eval_options: Any = None, device: Any = "auto",
                    precision: str | None = None, gradient_checkpointing: bool = False, fidelity: bool = False) -> Plan:
    """Check everything a simulation needs (nothing is written): numbers, method, settings, device,
    clients, and what an interrupted earlier run left in the next round."""
    from uniflow_cli.compute import check_precision, resolve_device
    from uniflow_cli.evaluation import EvalOptions
    from uniflow_cli.settings import AggregateSettings, resolve, resolve_train
    from uniflow_cli.workspace import Workspace, find_workspace

    _check_numbers(rounds, fraction, eval_every)
    ws = workspace if isinstance(workspace, Workspace) else find_workspace(workspace)
    aggregate = resolve(AggregateSettings, ws, {"method": method})  # an unknown method fails here, naming the known ones
    cfg = resolve_train(ws, {"precision": precision})
    device = resolve_device(device)
    check_precision(cfg.precision, device)
    plan = Plan(ws, rounds, method, aggregate, precision, cfg.seed, choose_clients(ws, clients), fraction, eval_every,
                eval_options or EvalOptions(), device, gradient_checkpointing, ws.latest_global_round(), fidelity)
    if fidelity:
        from uniflow_cli.fidelity import check_fidelity_method

        check_fidelity_method(method_spec(aggregate.method))
    for t in range(plan.start + 1, rounds + 1):
        check_round_is_free(plan, t)
    if plan.start < rounds:
        for client in plan.selected(plan.start + 1):
            check_private_state(plan, client, plan.start + 1)
    if eval_every is not None:
        check_evaluation(plan)
    return plan


def check_round_is_free(plan: Plan, t: int) -> None:
    """A round still to run holds nothing but what an interrupted simulation of it left: drops of the
    clients it selects (they are trained again), no report, no evaluation."""
    ws = plan.ws
    selected = plan.selected(t)
    clients_dir = ws.clients_dir(t)
    if clients_dir.is_dir():
        for entry in sorted(clients_dir.iterdir()):
            if not entry.name.startswith(".") and entry.name not in selected:
                raise WorkspaceError(f"{entry} is not a client this simulation trains in round {t} (it selects {', '.join(selected)})",
                                     fix="move that drop away, or select its client (--clients / --fraction as before)")
    for path, what in ((ws.round_report(t), "an aggregation report"), (ws.eval_json(t), "an evaluation")):
        if os.path.lexists(path):
            raise WorkspaceError(f"{path} is {what} of round {t}, which is not published", fix="move it away (it belongs to no published global)")


def check_evaluation(plan: Plan) -> None:
    """``eval_every``: the test splits and metrics are there (resolved now, before the first round trains)."""
    import tempfile

    from uniflow_cli.eval_target import EvalRequest, resolve_target
    from uniflow_cli.metrics import resolve_bertscore_model

    resolve_bertscore_model(plan.eval_options.bertscore_model, plan.eval_options.bertscore_layers)
    with tempfile.TemporaryDirectory() as probe:  # the request is checked like a real one; nothing lands here
        resolve_target(EvalRequest(workspace=plan.ws, round=plan.start, out=Path(probe) / "probe.json"))


# --------------------------------------------------------------------------------------------------
# Private client state across an interrupted round
# --------------------------------------------------------------------------------------------------
def backup_path(ws: Any, client: str, t: int) -> Path:
    """Where the client's private state from before round ``t`` is kept while the round runs."""
    from uniflow_cli.paths import check_id, confined

    return confined(ws.root, *BACKUP_DIR, check_id(client), f"round-{t}")


def _state_round(state: Path) -> int | None:
    from uniflow_cli.local_train import read_adapter_round

    return read_adapter_round(state) if (state / "uniflow.json").is_file() else None


def _keeps_state(plan: Plan, t: int) -> bool:
    """Whether round ``t``'s clients keep private state: the method local-train would pick (given, else
    the starting global's, else the workspace's [aggregate] method)."""
    from uniflow_cli.adapters import open_adapter
    from uniflow_cli.client_round import method_may_keep_state

    if plan.method is not None:
        return method_may_keep_state(plan.method)
    meta = open_adapter(plan.ws.global_dir(t - 1), verify=False).meta  # its method only: training verifies it
    return method_may_keep_state(meta.method if meta is not None and meta.method else plan.aggregate.method)


def check_private_state(plan: Plan, client: str, t: int) -> None:
    """A client's private state is either from before round ``t`` or kept aside by an interrupted run."""
    backup = backup_path(plan.ws, client, t)
    if backup.is_dir() or os.path.lexists(f"{backup}{NO_STATE}"):
        return
    state = plan.ws.client_state(client)
    done = _state_round(state)
    if done is not None and done >= t:
        raise WorkspaceError(f"client {client}'s private state {state} is already at round {done}, but round {t} is not published "
                             "and this simulation kept no copy of the state before it",
                             fix=f"finish round {t} with 'uniflow aggregate --round {t}', then run simulate again")


def keep_private_state(plan: Plan, client: str, t: int) -> None:
    """Before a client trains round ``t``: put its state back from the copy an interrupted run kept,
    else keep a copy (or a marker that it had none) for a run that has to train it again."""
    from uniflow_cli.atomic import publish_dir, write_file_atomic
    from uniflow_cli.paths import is_real_dir

    backup, state = backup_path(plan.ws, client, t), plan.ws.client_state(client)
    marker = Path(f"{backup}{NO_STATE}")
    if backup.is_dir():
        with publish_dir(state, force=True, replaces=is_real_dir, kind="client state") as tmp:
            shutil.copytree(backup, tmp, dirs_exist_ok=True)
        return
    if marker.is_file():
        if is_real_dir(state):
            shutil.rmtree(state)  # written by the interrupted round; before it there was none
        return
    check_private_state(plan, client, t)
    if is_real_dir(state):
        with publish_dir(backup, kind="copy of client state") as tmp:
            shutil.copytree(state, tmp, dirs_exist_ok=True)
    elif _keeps_state(plan, t):
        write_file_atomic(marker, b"{}\n")


def drop_private_copies(ws: Any, upto: int) -> None:
    """Once round ``upto`` is published, the copies kept for it and earlier rounds are not needed."""
    root = Path(ws.root).joinpath(*BACKUP_DIR)
    if not root.is_dir() or root.is_symlink():
        return
    for client in list(root.iterdir()):
        if client.is_symlink() or not client.is_dir():
            continue
        for entry in list(client.iterdir()):
            name = entry.name.removesuffix(NO_STATE)
            if name.startswith("round-") and name[6:].isdigit() and int(name[6:]) <= upto:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        if not any(client.iterdir()):
            client.rmdir()
    if not any(root.iterdir()):
        root.rmdir()


# --------------------------------------------------------------------------------------------------
# Progress and outcome
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SimulationEvent:
    """What the simulation does now, for a progress bar. ``kind``: ``plan`` (``total`` client rounds to
    train), ``client`` (a client starts; ``done`` client rounds finished), ``step`` (a training step
    ``done``/``total``, its ``loss`` and ``stage``), ``aggregate`` (layer ``done``/``total``), ``published``,
    ``evaluate`` (batch ``done``/``total``, ``message`` the phase), ``notice`` (``message``)."""

    kind: str
    round: int = 0
    client: str | None = None
    done: int = 0
    total: int | None = None
    loss: float | None = None
    stage: str | None = None
    message: str | None = None


OnProgress = Callable[[SimulationEvent], None]


@dataclass
class RoundRecord:
    round: int
    clients: list[str]
    retrained: list[str]  # drops an interrupted run had left, trained again
    global_dir: Path
    report: Path | None
    rel_error_mean: float | None
    train_seconds: float
    aggregate_seconds: float
    published: bool  # False: another server published the round meanwhile (its global stands)
    fidelity: Path | None = None  # rounds/t/fidelity.json (with fidelity)


@dataclass
class SimulationOutcome:
    workspace: Path
    method: str
    rounds: int
    resumed_from: int  # the latest published round found at the start (0: a fresh run)
    records: list[RoundRecord] = field(default_factory=list)
    evaluations: list[Path] = field(default_factory=list)
    model_builds: int = 0
    build_seconds: float = 0.0
    seconds: float = 0.0
    notices: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------
def train_round(plan: Plan, pool: ModelPool, t: int, *, done: int, emit: OnProgress) -> tuple[list[str], list[str]]:
    """Every selected client's local-train of round ``t`` (what ``uniflow local-train --client k --round t``
    does, with the pool's model); returns (the clients, those whose earlier drop was trained again)."""
    from uniflow_cli.local_train import run_local_train

    selected, retrained = plan.selected(t), []
    check_round_is_free(plan, t)
    for i, client in enumerate(selected):
        emit(SimulationEvent("client", t, client, done=done + i))
        keep_private_state(plan, client, t)
        again = plan.ws.client_drop(t, client).is_dir()
        if again:
            retrained.append(client)

        def on_step(step: int, steps: int, loss: float, stage: str, client: str = client) -> None:
            emit(SimulationEvent("step", t, client, done=step, total=steps, loss=loss, stage=stage))

        run_local_train(overrides={"precision": plan.precision}, client=client, workspace=plan.ws.root, method=plan.method, round_=t,
                        total_rounds=plan.rounds, force=again, device=plan.device, gradient_checkpointing=plan.gradient_checkpointing,
                        on_step=on_step, build=pool.load)
    return selected, retrained


def aggregate_round(plan: Plan, t: int, *, emit: OnProgress, notices: list[str]) -> tuple[Any, bool]:
    """The server's round (``uniflow aggregate --round t --min-clients 1``); (the outcome or None, published by us)."""
    from uniflow_cli.server import OutputOptions, WaitOptions, run_round

    def log(message: str) -> None:
        notices.append(message)
        emit(SimulationEvent("notice", t, message=message))

    done = run_round(plan.ws, t, plan.aggregate, output=OutputOptions(), waiting=WaitOptions(min_clients=1), log=log,
                     on_layer=lambda n, total: emit(SimulationEvent("aggregate", t, done=n, total=total)))
    return done.outcome, done.outcome is not None


def evaluate_round(plan: Plan, t: int, *, emit: OnProgress) -> Path:
    """``uniflow evaluate --round t`` into ``eval/round-t.json``."""
    from uniflow_cli.eval_target import EvalRequest
    from uniflow_cli.evaluation import run_evaluate

    options = replace(plan.eval_options, device=str(plan.device), precision=plan.precision)
    result = run_evaluate(EvalRequest(workspace=plan.ws, round=t), options,
                          on_batch=lambda n, total, phase: emit(SimulationEvent("evaluate", t, done=n, total=total, message=phase)),
                          on_status=lambda message: emit(SimulationEvent("evaluate", t, message=message)))
    return Path(result.path)


def evaluate_clients(plan: Plan, t: int, clients: Sequence[str], *, emit: OnProgress) -> list[Path]:
    """A method that keeps client state (FedSA's B, FedDPA's local adapter) has one model per client: each of
    ``clients`` (those that trained round ``t``) is evaluated as ``uniflow evaluate --round t --client k`` does,
    into ``eval/clients/<k>/round-t.json``. Right after the round, while each state is still round ``t``'s; an
    evaluation an interrupted run already wrote stands."""
    from uniflow_cli.eval_target import EvalRequest
    from uniflow_cli.evaluation import run_evaluate

    options = replace(plan.eval_options, device=str(plan.device), precision=plan.precision)
    written = []
    for client in clients:
        if os.path.lexists(plan.ws.client_eval_json(client, t)):
            continue
        result = run_evaluate(EvalRequest(workspace=plan.ws, round=t, client=client), options,
                              on_batch=lambda n, total, phase: emit(SimulationEvent("evaluate", t, client, done=n, total=total, message=phase)),
                              on_status=lambda message: emit(SimulationEvent("evaluate", t, client, message=message)))
        written.append(Path(result.path))
    return written


def run_simulation(workspace: Any, rounds: int, *, method: str | None = None, clients: Sequence[str] | None = None,
                   fraction: float | None = None, eval_every: int | None = None, eval_options: Any = None, device: Any = "auto",
                   precision: str | None = None, gradient_checkpointing: bool = False, on_progress: OnProgress | None = None,
                   pool: ModelPool | None = None, fidelity: bool = False) -> SimulationOutcome:
    """Publish rounds up to ``rounds`` (continuing after the latest published one), each as local-train
    per selected client then the server's aggregate, in this process with one loaded model; evaluate every
    ``eval_every`` rounds and the last (and any such round an interrupted run left unevaluated).

    ``clients``: ids (None or ``["all"]``: every partitioned client); ``fraction``: each round trains a
    deterministic sample of them (:func:`select_clients`, seeded by ``[train] seed``). ``method``, ``device``,
    ``precision`` and ``gradient_checkpointing`` mean what they mean to local-train and aggregate. A method
    whose clients keep state (FedSA, FedDPA) also evaluates each trained client's personalised model
    (:func:`evaluate_clients`) whenever the global is evaluated. ``fidelity``: after each round, its
    function-space gap against the exact global (:mod:`uniflow_cli.fidelity`) into ``rounds/t/fidelity.json``.
    Everything is checked before the first round trains; every output is published atomically."""
    started = time.perf_counter()
    emit = on_progress or (lambda _event: None)
    plan = plan_simulation(workspace, rounds, method=method, clients=clients, fraction=fraction, eval_every=eval_every,
                           eval_options=eval_options, device=device, precision=precision, gradient_checkpointing=gradient_checkpointing,
                           fidelity=fidelity)
    pool = pool or pool_for(plan.ws)
    outcome = SimulationOutcome(plan.ws.root, plan.aggregate.method, rounds, plan.start)
    drop_private_copies(plan.ws, plan.start)  # left by a run killed after publishing
    for t in range(1, min(plan.start, rounds) + 1):  # rounds an interrupted run published but did not evaluate
        if due_for_evaluation(t, eval_every, rounds) and not os.path.lexists(plan.ws.eval_json(t)):
            outcome.evaluations.append(evaluate_round(plan, t, emit=emit))
    todo = list(range(plan.start + 1, rounds + 1))
    emit(SimulationEvent("plan", todo[0] if todo else plan.start, total=sum(len(plan.selected(t)) for t in todo)))
    done = 0
    for t in todo:
        began = time.perf_counter()
        selected, retrained = train_round(plan, pool, t, done=done, emit=emit)
        done += len(selected)
        trained = time.perf_counter()
        result, published = aggregate_round(plan, t, emit=emit, notices=outcome.notices)
        drop_private_copies(plan.ws, t)
        report = plan.ws.round_report(t)
        outcome.records.append(RoundRecord(
            t, selected, retrained, plan.ws.global_dir(t), report if report.is_file() else None,
            result.result.summary()["rel_error_mean"] if result is not None else None,
            trained - began, time.perf_counter() - trained, published))
        emit(SimulationEvent("published", t, done=done, message=str(plan.ws.global_dir(t))))
        if plan.fidelity and published:
            from uniflow_cli.fidelity import measure_round, write_fidelity

            emit(SimulationEvent("notice", t, message="measuring the function-space gap against the exact global"))
            outcome.records[-1].fidelity = write_fidelity(plan.ws, measure_round(plan.ws, t, device=plan.device))
        if due_for_evaluation(t, eval_every, rounds):
            outcome.evaluations.append(evaluate_round(plan, t, emit=emit))
            if method_spec(plan.aggregate.method).keeps_client_state:
                outcome.evaluations += evaluate_clients(plan, t, selected, emit=emit)
    pool.release()
    outcome.model_builds, outcome.build_seconds = pool.builds, pool.build_seconds
    outcome.seconds = time.perf_counter() - started
    return outcome


__all__ = ["ModelPool", "Plan", "RoundRecord", "SimulationEvent", "SimulationOutcome", "due_for_evaluation", "plan_simulation",
           "run_simulation", "sample_size", "select_clients"]
