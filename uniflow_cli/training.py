"""The local-training loop: AdamW over a model's LoRA, stage by stage, on one client's shard.

Local training is three layers, each its own module:

* :mod:`uniflow_cli.schedule` — the pure schedule (stage plan, LR factor, step count, seeds);
* this module — the one straight loop (:func:`train_loop`) that follows it;
* :mod:`uniflow_cli.client_round` — one client's round in memory (start model per method, train, what is
  uploaded and what stays private), shared by ``uniflow local-train`` and the Flower ClientApp;
* :mod:`uniflow_cli.local_train` — the command's library function (resolve the target, build the inputs,
  publish the drop).

Names other modules import from here (``run_local_train``, ``train_client_round``, ``stage_plan``, ...)
are re-exported lazily, so importing this module stays torch-free and cycle-free.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from uniflow_cli.aggregation.registry import as_spec
from uniflow_cli.errors import TrainingError
from uniflow_cli.schedule import STAGE_BY, STAGE_PLANS, lr_factor, mixed_seed, stage_plan, total_steps_for, warmup_steps
from uniflow_cli.settings import TrainSettings

__all__ = [
    "STAGE_BY", "STAGE_PLANS", "TrainStats", "freeze_for_method", "lr_factor", "mixed_seed",
    "stage_plan", "total_steps_for", "train_loop", "warmup_steps",
]


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
    device: str = "cpu"  # where it trained (recorded: the device is part of "same inputs, same bytes")
    math: str = "native"  # compute.math_mode: bf16 kernels, or bf16 storage with float32 math ("upcast")

    @property
    def first_loss(self) -> float | None:
        return self.losses[0] if self.losses else None

    @property
    def last_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None


def freeze_for_method(model: Any, method: Any) -> None:
    """A method whose A is frozen (FFA-LoRA, RoLoRA's B rounds) never trains it, whatever the stage
    (requires_grad off); on VeRA that is d (``vera_lambda_d``), the input side, as A is on LoRA
    (docs/aggregation.md, "VeRA"). A frozen B (RoLoRA's A rounds) likewise: ``lora_B`` / ``vera_lambda_b``."""
    spec = as_spec(method)
    if not (spec.frozen_A or spec.frozen_B):
        return
    for name, param in model.named_parameters():
        own = spec.for_key(name) or spec  # a per-module spec: the method of the parameter's module
        frozen = ((".lora_A.", ".vera_lambda_d.") if own.frozen_A else ()) + ((".lora_B.", ".vera_lambda_b.") if own.frozen_B else ())
        if any(part in f"{name}." for part in frozen):
            param.requires_grad_(False)


def _draws(n: int, batch_size: int, generator: Any) -> Iterator[list[int]]:
    """Batches of example indices: a fresh seeded permutation per epoch, a batch may span two epochs."""
    import torch

    order: list[int] = []
    while True:
        picks = []
        while len(picks) < batch_size:
            if not order:
                order = torch.randperm(n, generator=generator).tolist()
            picks.append(order.pop())
        yield picks


def _accumulated_loss(model: Any, dataset: Any, draws: Iterator[list[int]], cfg: TrainSettings, stats: TrainStats, cut: set[int],
                      step: int, stage: str, *, device: Any, scaler: Any) -> float:
    """Forward/backward ``cfg.grad_accum`` micro-batches (gradients summed, scaled by 1/grad_accum); their mean loss.

    The forward runs under ``cfg.precision``'s autocast and computes the LM head on answer positions only
    (``full_logits=False``: the loss of Eq. 6 is the same, the 49k-vocabulary head costs a fraction); the
    backward runs outside autocast, as torch recommends, through fp16's grad scaler when there is one."""
    import torch

    from uniflow_cli.compute import autocast, to_device
    from uniflow_cli.models import collate

    step_loss = 0.0
    for _ in range(cfg.grad_accum):
        picks = next(draws)
        batch = collate([dataset[i] for i in picks], model, max_length=stats.max_length)
        cut.update(i for i, was_cut in zip(picks, batch["truncated"]) if was_cut)
        stats.truncated = len(cut)
        stats.tokens += int(batch["attention_mask"].sum())
        with autocast(device, cfg.precision):
            loss = model(to_device(batch, device), full_logits=False).loss
        if not torch.isfinite(loss):
            raise TrainingError(
                f"non-finite loss {float(loss.detach())} at step {step + 1} ({stage} stage)", fix="lower the learning rate (lr); nothing was published"
            )
        if loss.requires_grad:
            scaled = loss.float() / cfg.grad_accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        # else: nothing this stage trains is on the batch's path (e.g. a text-only batch in stage I,
        # which uses no encoder): the step leaves every parameter unchanged.
        step_loss += float(loss.detach()) / cfg.grad_accum
    return step_loss


# Long on purpose: the one straight training loop, read top to bottom (like nanochat); splitting it would hide the order of things.
def train_loop(
    model: Any,
    dataset: Any,
    cfg: TrainSettings,
    *,
    method: Any,
    seed: int,
    round_: int = 1,
    total_rounds: int | None = None,
    device: Any = None,
    on_step: Callable[[int, int, float, str], None] | None = None,
) -> TrainStats:
    """Train ``model`` in place on ``dataset``: AdamW, :func:`~uniflow_cli.schedule.lr_factor`, clipping, seeded order.

    ``method`` is a method name or its :class:`~uniflow_cli.aggregation.registry.MethodSpec`. Sequences are
    cut to ``cfg.max_length`` tokens (None: the model's default) while they are tokenised, so one huge
    sample cannot blow up the batch; the examples cut are counted in ``TrainStats.truncated``. The model is
    moved to ``device`` (a ``torch.device`` or a name for :func:`~uniflow_cli.compute.resolve_device`; None:
    where it is) and trained under ``cfg.precision``'s autocast (fp16: with a grad scaler, CUDA only)."""
    import torch

    from uniflow_cli.compute import check_precision, grad_scaler, module_device, place, resolve_device
    from uniflow_cli.models import set_trainable_stage
    from uniflow_cli.models.lora import unwrap

    spec = as_spec(method)
    n = len(dataset)
    if n == 0:
        raise TrainingError("the client's shard is empty", fix="re-run 'uniflow partition' with more data per client")
    device = module_device(model) if device is None else resolve_device(device)
    check_precision(cfg.precision, device)
    math = place(model, device, cfg.precision)
    scaler = grad_scaler(device, cfg.precision)
    steps = total_steps_for(cfg, n)
    plan = stage_plan(steps, cfg, round_=round_, total_rounds=total_rounds)
    torch.manual_seed(seed)
    draws = _draws(n, cfg.batch_size, torch.Generator().manual_seed(seed))

    # One optimizer over everything that trains in any stage. Parameters frozen in the current stage
    # get no gradient (set_to_none), and AdamW skips them entirely — no decay, no moment updates — so a
    # stage-I step leaves the LLM LoRA bit-identical and vice versa.
    set_trainable_stage(model, "both")
    freeze_for_method(model, spec)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = warmup_steps(cfg, steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps, warmup))
    stats = TrainStats(num_examples=n, steps=steps, steps_per_stage={s: plan.count(s) for s in sorted(set(plan))},
                       max_length=cfg.max_length if cfg.max_length is not None else unwrap(model).max_length, device=str(device),
                       math=math)
    cut: set[int] = set()
    model.train()
    current = None
    started = time.perf_counter()
    for step in range(steps):
        if plan[step] != current:
            current = plan[step]
            set_trainable_stage(model, current)
            freeze_for_method(model, spec)
        trainable = [p for p in params if p.requires_grad]
        step_loss = _accumulated_loss(model, dataset, draws, cfg, stats, cut, step, current, device=device, scaler=scaler)
        # fp16's scaler refuses a step without gradients (it has no inf checks then): such a step goes the
        # plain way, where AdamW leaves every parameter without a gradient untouched.
        if scaler is not None and any(p.grad is not None for p in trainable):
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            scaler.step(optimizer)  # skipped when a gradient overflowed; the scale then shrinks
            scaler.update()
        else:
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


# Names that moved to client_round / local_train, re-exported on first use (a module-level import would be
# a cycle: both import this module for the loop).
_MOVED = {
    "ClientRound": "client_round", "train_client_round": "client_round", "upload_tensors": "client_round",
    "private_tensors": "client_round", "method_may_keep_state": "client_round", "write_client_state": "client_round",
    "read_client_state": "client_round",
    "run_local_train": "local_train", "LocalTrainOutcome": "local_train", "read_adapter_round": "local_train",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(f"uniflow_cli.{_MOVED[name]}"), name)
    raise AttributeError(f"module 'uniflow_cli.training' has no attribute {name!r}")
