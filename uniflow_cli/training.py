"""One client's round: start from what the server published, train per the stage schedule, drop an adapter.

Two layers, like the rest of uniflow:

* in-memory cores (:func:`stage_plan`, :func:`prepare_start`, :func:`train_loop`, :func:`upload_tensors`)
  that take a model, a dataset and global tensors — the Flower app reuses them;
* :func:`run_local_train`, the thin I/O layer: workspace/round resolution, reading the global and the
  shard, client-private state, and publishing the drop atomically (a failure publishes nothing).

Round numbering: a client reads ``rounds/t/global`` (t = latest published) and drops into
``rounds/t+1/clients/<k>``; the server fuses those into ``rounds/t+1/global``.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from uniflow_cli.errors import ConfigError, IncompatibleAdaptersError, TrainingError, UsageError

STAGE_PLANS = ("two-stage", "joint", "reverse", "llm-only", "encoder-only")
STAGE_BY = ("step", "round")
METHODS_SHARING = {  # what a client uploads (section 5 of the local-train issue)
    "fedsa": "A and non-LoRA tensors (B stays on the client)",
    "ffa": "B and non-LoRA tensors (A is frozen)",
}


@dataclass
class LocalTrainConfig:
    """Local-training hyper-parameters (Eq. 7's ``tau`` is the share of stage-I steps)."""

    tau: float = 0.25
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    max_length: int | None = None
    seed: int = 0
    stages: str = "two-stage"
    stage_by: str = "step"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if not 0.0 <= self.tau <= 1.0:
            raise UsageError(f"--stage-tau {self.tau!r} must be in [0, 1]", fix="use --stage-tau 0.25 (the paper's best)")
        if self.steps is not None and self.epochs is not None:
            raise UsageError("--steps and --epochs were both given", fix="give one of them")
        if self.steps is not None and self.steps < 1:
            raise UsageError(f"--steps {self.steps!r} must be >= 1", fix="use --steps 20")
        if self.epochs is not None and not self.epochs > 0:
            raise UsageError(f"--epochs {self.epochs!r} must be > 0", fix="use --epochs 1")
        for name, value in (("batch-size", self.batch_size), ("grad-accum", self.grad_accum)):
            if value < 1:
                raise UsageError(f"--{name} {value!r} must be >= 1", fix=f"use --{name} 1 or more")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError(f"--lr {self.lr!r} must be a finite number > 0", fix="use --lr 2e-4")
        if self.weight_decay < 0:
            raise UsageError(f"--weight-decay {self.weight_decay!r} must be >= 0", fix="use --weight-decay 0")
        if not 0 <= self.warmup_ratio < 1:
            raise UsageError(f"warmup_ratio {self.warmup_ratio!r} must be in [0, 1)", fix="use 0.1")
        if self.max_length is not None and self.max_length < 8:
            raise UsageError(f"--max-length {self.max_length!r} is too small", fix="use --max-length 256")
        if self.stages not in STAGE_PLANS:
            raise UsageError(f"--stages {self.stages!r} is not one of {', '.join(STAGE_PLANS)}", fix="use --stages two-stage")
        if self.stage_by not in STAGE_BY:
            raise UsageError(f"--stage-by {self.stage_by!r} is not step|round", fix="use --stage-by step")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise UsageError(f"--dtype {self.dtype!r} is not float32|bfloat16|float16", fix="use --dtype float32")


def stage_plan(total_steps: int, cfg: LocalTrainConfig, *, round_: int = 1, total_rounds: int | None = None) -> list[str]:
    """Which parameters train at each local step (Eq. 7): ``"encoder"`` (encoder LoRA + projector),
    ``"llm"`` (LLM LoRA) or ``"both"``.

    two-stage by step: the first ⌈τ·steps⌉ steps are stage I, the rest stage II (τ = 0: LLM only;
    τ = 1: encoder only — the paper's sensitivity analysis). two-stage by round: the whole round is
    stage I while round − 1 < τ·R (Table 15's "T = 0.5 CR"), else stage II. reverse: the same split in
    the opposite order (LLM first). joint: both together. llm-only / encoder-only: one stage throughout.
    """
    if cfg.stages == "joint":
        return ["both"] * total_steps
    if cfg.stages == "llm-only":
        return ["llm"] * total_steps
    if cfg.stages == "encoder-only":
        return ["encoder"] * total_steps
    first, second = ("encoder", "llm") if cfg.stages == "two-stage" else ("llm", "encoder")
    if cfg.stage_by == "round":
        if total_rounds is None:
            raise UsageError("--stage-by round needs the total number of rounds", fix="pass --total-rounds R")
        return [first if (round_ - 1) < cfg.tau * total_rounds else second] * total_steps
    n_first = math.ceil(cfg.tau * total_steps) if cfg.stages == "two-stage" else total_steps - math.ceil(cfg.tau * total_steps)
    return [first] * n_first + [second] * (total_steps - n_first)


def mixed_seed(seed: int, round_: int, client: str) -> int:
    """A per-(seed, round, client) seed: data order differs across rounds and clients, reproducibly."""
    return (seed * 1_000_003 + round_ * 7_919 + zlib.crc32(str(client).encode())) % (2**31 - 1)


# --------------------------------------------------------------------------------------------------
# Starting point (per method) and what is uploaded
# --------------------------------------------------------------------------------------------------
def upload_tensors(method: str, tensors: Mapping[str, Any]) -> dict[str, Any]:
    """What the client shares: fedsa keeps B private, ffa never re-sends the frozen A."""
    if method == "fedsa":
        return {k: v for k, v in tensors.items() if not k.endswith(".lora_B.weight")}
    if method == "ffa":
        return {k: v for k, v in tensors.items() if not k.endswith(".lora_A.weight")}
    return dict(tensors)


def freeze_for_method(model: Any, method: str) -> None:
    """FFA-LoRA: A is never trained (requires_grad off), whatever the stage."""
    if method == "ffa":
        for name, param in model.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(False)


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------
@dataclass
class TrainStats:
    num_examples: int
    steps: int
    steps_per_stage: dict[str, int]
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0
    truncated: int = 0  # examples cut to max_length tokens (each counted once, however often drawn)
    max_length: int | None = None  # the token budget used (cfg.max_length, else the model's default)

    @property
    def first_loss(self) -> float | None:
        return self.losses[0] if self.losses else None

    @property
    def last_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None


def total_steps_for(cfg: LocalTrainConfig, num_examples: int) -> int:
    if cfg.steps is not None:
        return cfg.steps
    epochs = cfg.epochs if cfg.epochs is not None else 1.0
    return max(1, math.ceil(epochs * num_examples / (cfg.batch_size * cfg.grad_accum)))


def train_loop(
    model: Any,
    dataset: Any,
    cfg: LocalTrainConfig,
    *,
    method: str,
    seed: int,
    round_: int = 1,
    total_rounds: int | None = None,
    on_step: Callable[[int, int, float, str], None] | None = None,
) -> TrainStats:
    """Train ``model`` in place on ``dataset``: AdamW, linear warm-up/decay, clipping, seeded order.

    Sequences are cut to ``cfg.max_length`` tokens (None: the model's default) while they are tokenised,
    so one huge sample cannot blow up the batch; the examples cut are counted in ``TrainStats.truncated``."""
    import torch

    from uniflow_cli.models import collate, set_trainable_stage
    from uniflow_cli.models.lora import unwrap

    n = len(dataset)
    if n == 0:
        raise TrainingError("the client's shard is empty", fix="re-run 'uniflow partition' with more data per client")
    steps = total_steps_for(cfg, n)
    plan = stage_plan(steps, cfg, round_=round_, total_rounds=total_rounds)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)

    # One optimizer over everything that trains in any stage. Parameters frozen in the current stage
    # get no gradient (set_to_none), and AdamW skips them entirely — no decay, no moment updates — so a
    # stage-I step leaves the LLM LoRA bit-identical and vice versa.
    set_trainable_stage(model, "both")
    freeze_for_method(model, method)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup_ratio * steps)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (steps - step) / max(1, steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    order: list[int] = []
    stats = TrainStats(num_examples=n, steps=steps, steps_per_stage={s: plan.count(s) for s in sorted(set(plan))},
                       max_length=cfg.max_length if cfg.max_length is not None else unwrap(model).max_length)
    cut: set[int] = set()
    model.train()
    current = None
    started = time.perf_counter()
    for step in range(steps):
        if plan[step] != current:
            current = plan[step]
            set_trainable_stage(model, current)
            freeze_for_method(model, method)
        trainable = [p for p in params if p.requires_grad]
        step_loss = 0.0
        for _ in range(cfg.grad_accum):
            picks = []
            while len(picks) < cfg.batch_size:
                if not order:  # a fresh seeded permutation per epoch
                    order = torch.randperm(n, generator=generator).tolist()
                picks.append(order.pop())
            batch = collate([dataset[i] for i in picks], model, max_length=stats.max_length)
            cut.update(i for i, was_cut in zip(picks, batch["truncated"]) if was_cut)
            stats.truncated = len(cut)
            stats.tokens += int(batch["attention_mask"].sum())
            loss = model(batch).loss
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"non-finite loss {float(loss.detach())} at step {step + 1} ({current} stage)", fix="lower --lr; nothing was published"
                )
            if loss.requires_grad:
                (loss / cfg.grad_accum).backward()
            # else: nothing this stage trains is on the batch's path (e.g. a text-only batch in stage I,
            # which uses no encoder): the step leaves every parameter unchanged.
            step_loss += float(loss.detach()) / cfg.grad_accum
        if trainable:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        stats.losses.append(step_loss)
        if on_step is not None:
            on_step(step + 1, steps, step_loss, current)
    stats.seconds = time.perf_counter() - started
    model.eval()
    return stats


# --------------------------------------------------------------------------------------------------
# The command's library function
# --------------------------------------------------------------------------------------------------
@dataclass
class LocalTrainOutcome:
    out: Path
    round: int
    method: str
    stats: TrainStats
    upload_bytes: int
    state_dir: Path | None
    folded_rounds: list[int]


def _model_settings(ws: Any, preset: str | None) -> Any:
    from uniflow_cli.models import ModelSettings

    if ws is not None:
        return ModelSettings.from_dict(ws.config().get("model", {}))
    if preset is None:
        raise UsageError("no model configured", fix="run inside a workspace (uniflow init) or pass --preset")
    return ModelSettings(preset=preset)


def _lora_settings(ws: Any) -> Any:
    from uniflow_cli.workspace import LoraSettings

    table = dict(ws.config().get("lora", {})) if ws is not None else {}
    known = {k: v for k, v in table.items() if k in LoraSettings.__dataclass_fields__}
    try:
        return LoraSettings(**known)
    except ConfigError as exc:
        raise ConfigError(f"uniflow.toml [lora]: {exc.problem}", fix=exc.fix) from None


def run_local_train(
    cfg: LocalTrainConfig,
    *,
    client: str | None,
    workspace: Path | None = None,
    global_dir: Path | None = None,
    data_dir: Path | None = None,
    out: Path | None = None,
    method: str | None = None,
    round_: int | None = None,
    total_rounds: int | None = None,
    preset: str | None = None,
    state_dir: Path | None = None,
    force: bool = False,
    wait: bool = False,
    timeout: float = 600.0,
    poll: float = 2.0,
    on_step: Callable[[int, int, float, str], None] | None = None,
    on_wait: Callable[[str], None] | None = None,
) -> LocalTrainOutcome:
    """Resolve inputs, train, publish the drop (and FedSA's private B). Nothing is published on error."""
    from uniflow_cli.adapters import AdapterMeta, is_adapter_of_role, open_adapter, read_adapter, write_adapter
    from uniflow_cli.aggregation import METHODS
    from uniflow_cli.atomic import check_writable_target
    from uniflow_cli.data.build import load_split
    from uniflow_cli.federation import check_wait_options
    from uniflow_cli.paths import check_id, overlap
    from uniflow_cli.workspace import find_workspace

    check_wait_options(timeout, poll)
    if client is not None:
        client = check_id(client)  # it names directories: never '../..' or a path
    if round_ is not None and round_ < 1:
        raise UsageError(f"--round {round_}: round 0 is the initial global", fix="train for a round >= 1")
    explicit = global_dir is not None or data_dir is not None or out is not None
    ws = find_workspace(workspace, required=not explicit)
    if explicit:
        missing = [flag for flag, v in (("--global", global_dir), ("--data", data_dir), ("--out", out)) if v is None]
        if missing:
            raise UsageError(f"explicit mode needs {', '.join(missing)} too", fix="give --global DIR --data DIR --out DIR, or use a workspace with --client K")
        t = read_adapter_round(global_dir)
        target_round = t + 1 if round_ is None else round_
    else:
        if client is None:
            raise UsageError("which client? --client is missing", fix="pass --client K (its shard is data/clients/K)")
        if round_ is not None:
            t = round_ - 1
        elif wait:
            # The round after this client's last drop: its global may not be published yet.
            dropped = [r for r in ws.rounds() if ws.client_drop(r, client).is_dir()]  # client_drop checks the id
            t = max(ws.latest_global_round(), dropped[-1] if dropped else 0)
        else:
            t = ws.latest_global_round()
        target_round = t + 1
        global_dir = ws.global_dir(t)
        if wait and not global_dir.is_dir():
            if on_wait is not None:
                on_wait(f"waiting for the round-{t} global ({global_dir})")
            deadline = time.monotonic() + timeout
            while not global_dir.is_dir():
                if time.monotonic() >= deadline:
                    raise TrainingError(f"round {t}'s global was not published within {timeout:g} s ({global_dir})", fix="check the server, or raise --timeout")
                time.sleep(poll)
        if not global_dir.is_dir():
            raise UsageError(f"round {t} has no published global ({global_dir})", fix="wait for the server (--wait), or pick an earlier --round")
        if ws.global_dir(target_round).is_dir():
            raise UsageError(
                f"round {target_round} is already closed: its global is published ({ws.global_dir(target_round)})",
                fix="train for the next round (omit --round)",
            )
        data_dir = ws.client_data(client)
        out = ws.client_drop(target_round, client)
        state_dir = state_dir or ws.client_state(client)
    for flag, given in (("--global", global_dir), ("--data", data_dir), ("--state", state_dir)):
        if given is not None and (relation := overlap(out, given)) is not None:
            raise UsageError(f"--out {out} {relation} {flag} {given}", fix="publish the client adapter apart from its inputs")
    if state_dir is not None and method_may_keep_state(method) and (relation := overlap(state_dir, data_dir)) is not None:
        raise UsageError(f"--state {state_dir} {relation} --data {data_dir}", fix="keep client state apart from the dataset")
    check_writable_target(out, force=force, replaces=lambda p: is_adapter_of_role(p, "client"), kind="uniflow client adapter")
    dataset = load_split(data_dir)
    settings = _model_settings(ws, preset)
    lora = _lora_settings(ws)
    start = read_adapter(global_dir)
    if start.meta is not None and start.meta.role != "global":
        raise UsageError(f"{global_dir} is a {start.meta.role} adapter", fix="pass the global adapter the server published")
    method = method or (start.meta.method if start.meta and start.meta.method else None)
    if method is None and ws is not None:
        method = str(ws.config().get("aggregate", {}).get("method", "fedA2"))
    method = method or "fedA2"
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}", fix=f"use one of {', '.join(METHODS)}")
    client_id = str(client) if client is not None else (start.meta.client_id if start.meta else None)
    # fedex folds every published residual, flora every published global (after round 0) into the base.
    needs_history = method == "fedex" or (method == "flora" and start.meta is not None and bool(start.meta.round))
    private_B = None
    if method == "fedsa" and state_dir is not None and (Path(state_dir) / "adapter_model.safetensors").exists():
        private_B = read_adapter(state_dir).tensors
    result = train_client_round(
        cfg, start, dataset, settings, lora, method=method, client_id=client_id, round_=target_round,
        history=_history(ws, global_dir, t) if needs_history else (), private_B=private_B, private_where=str(state_dir),
        total_rounds=total_rounds, started_from=_recorded_path(ws, global_dir), on_step=on_step,
    )
    written = write_adapter(out, peft_config=result.peft_config, tensors=result.shared, meta=result.meta, force=force)
    if result.private is not None and state_dir is not None:
        # The client's own B never leaves the client: kept for its next round, replaced atomically.
        private_meta = AdapterMeta(role="client", client_id=client_id, round=target_round, method=method, base_fingerprint=result.meta.base_fingerprint)
        write_adapter(Path(state_dir), peft_config=result.peft_config, tensors=result.private, meta=private_meta, force=True)
    open_adapter(written)  # read back: what we published is what the server will verify
    return LocalTrainOutcome(written, target_round, method, result.stats, result.upload_bytes,
                             Path(state_dir) if state_dir and method == "fedsa" else None, result.folded_rounds)



# --------------------------------------------------------------------------------------------------
# One client's round in memory (shared by `uniflow local-train` and the Flower ClientApp)
# --------------------------------------------------------------------------------------------------
@dataclass
class ClientRound:
    """What one client's round produced, before anything is written or sent."""

    shared: dict[str, Any]  # what the method uploads, in cfg.dtype
    private: dict[str, Any] | None  # FedSA's B: never leaves the client
    peft_config: dict[str, Any]
    meta: Any  # AdapterMeta(role="client", ...)
    stats: TrainStats
    upload_bytes: int
    folded_rounds: list[int]


def train_client_round(
    cfg: LocalTrainConfig,
    start: Any,
    dataset: Any,
    settings: Any,
    lora: Any,
    *,
    method: str,
    client_id: str | None,
    round_: int,
    history: Any = (),
    private_B: Mapping[str, Any] | None = None,
    private_where: str = "client state",
    total_rounds: int | None = None,
    started_from: str | None = None,
    on_step: Callable[[int, int, float, str], None] | None = None,
) -> ClientRound:
    """Build the starting model from the global ``start`` (a LoadedAdapter), train, return the upload.

    ``history`` is ``[(round, LoadedAdapter), ...]`` of the globals published in rounds 1..t (fedex folds
    their residuals, flora their merged LoRA into the base); ``private_B`` is FedSA's own B from the last
    round. Both callers (the file-drop path and the Flower ClientApp) go through here, so the same inputs
    give the same bytes on both paths.
    """
    import torch

    from uniflow_cli.adapters import AdapterMeta
    from uniflow_cli.models import adapter_tensors, load_model, model_from_adapter, peft_config_dict
    from uniflow_cli.models.lora import add_to_base, load_adapter_tensors, lora_deltas, unwrap

    seed = mixed_seed(cfg.seed, round_, client_id or "0")
    folded: list[int] = []
    if method == "flora" and start.meta is not None and start.meta.round:
        # FLoRA: every published global so far is merged into the base; training starts from a fresh LoRA
        # whose init is the same on every client (seeded by the round only).
        model = load_model(settings, lora, seed=round_)
        fp = start.meta.base_fingerprint
        if fp is not None and fp != unwrap(model).fingerprint:
            raise IncompatibleAdaptersError(f"{started_from or 'the global'} was made for base {fp}, this model is {unwrap(model).fingerprint}", fix="use this workspace's [model]")
        for r, adapter in history:
            add_to_base(model, lora_deltas(adapter.peft_config, adapter.tensors), where=f"round {r} global")
            folded.append(r)
    else:
        model = model_from_adapter(settings, start, lora)
        if method == "fedex":
            for r, adapter in history:
                if adapter.residual:
                    add_to_base(model, adapter.residual, where=f"round {r} residual")
                    folded.append(r)
        if method == "fedsa" and private_B:
            load_adapter_tensors(model, {k: v for k, v in private_B.items() if k.endswith(".lora_B.weight")}, strict=False, where=private_where)

    stats = train_loop(model, dataset, cfg, method=method, seed=seed, round_=round_, total_rounds=total_rounds, on_step=on_step)
    tensors = adapter_tensors(model)
    dtype = getattr(torch, cfg.dtype)
    shared = {k: v.to(dtype) for k, v in upload_tensors(method, tensors).items()}
    upload_bytes = sum(v.numel() * v.element_size() for v in shared.values())
    meta = AdapterMeta(
        role="client",
        client_id=client_id,
        round=round_,
        num_examples=stats.num_examples,
        modalities=sorted(set(dataset["modality"])),
        stage=cfg.stages if cfg.stages != "two-stage" else f"two-stage(tau={cfg.tau:g},by={cfg.stage_by})",
        method=method,
        base_fingerprint=unwrap(model).fingerprint,
        extra={
            "train": {
                "steps": stats.steps,
                "steps_per_stage": stats.steps_per_stage,
                "first_loss": stats.first_loss,
                "last_loss": stats.last_loss,
                "seconds": round(stats.seconds, 3),
                "tokens": stats.tokens,
                "truncated": stats.truncated,
                "upload_bytes": upload_bytes,
                "started_from": started_from,
                "folded_rounds": folded,
                "config": asdict(cfg),
            }
        },
    )
    private = {k: v for k, v in tensors.items() if k.endswith(".lora_B.weight")} if method == "fedsa" else None
    return ClientRound(shared, private, peft_config_dict(model), meta, stats, upload_bytes, folded)


def method_may_keep_state(method: str | None) -> bool:
    """Methods whose client keeps private state between rounds (FedSA's B), or an unknown method yet."""
    return method in (None, "fedsa")


def _recorded_path(ws: Any, path: Path) -> str | None:
    """What a drop records of where it started: relative to the workspace, never the client's absolute
    layout (that would leak it to the server and make drops differ byte for byte across machines)."""
    if ws is None:
        return None
    try:
        return Path(path).resolve().relative_to(ws.root).as_posix()
    except ValueError:
        return None


def read_adapter_round(global_dir: Path) -> int:
    from uniflow_cli.adapters import open_adapter

    meta = open_adapter(global_dir).meta
    return meta.round if meta is not None and meta.round is not None else 0


def _history(ws: Any, global_dir: Path, t: int) -> list[tuple[int, Any]]:
    """The published globals of rounds 1..t (workspace), or just the given one (explicit mode)."""
    from uniflow_cli.adapters import read_adapter

    if ws is None:
        return [(t, read_adapter(global_dir))]
    return [(r, read_adapter(ws.global_dir(r))) for r in range(1, t + 1) if ws.global_dir(r).is_dir()]


def train_defaults(workspace: Path | None) -> Any:
    """The workspace's ``[train]`` table (validated) or the built-in defaults."""
    from uniflow_cli.workspace import TrainSettings, find_workspace

    ws = find_workspace(workspace, required=False)
    table = dict(ws.config().get("train", {})) if ws is not None else {}
    known = {k: v for k, v in table.items() if k in TrainSettings.__dataclass_fields__}
    try:
        return TrainSettings(**known)
    except ConfigError as exc:
        raise ConfigError(f"uniflow.toml [train]: {exc.problem}", fix=exc.fix) from None
