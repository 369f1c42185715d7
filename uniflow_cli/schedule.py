"""The pure local-training schedule: what trains at each step (Eq. 7), the learning-rate factor, the step
count and the per-(round, client) seed. No torch: :mod:`uniflow_cli.training` runs the loop these describe.

Every function takes a :class:`~uniflow_cli.settings.TrainSettings` (or plain numbers) and returns plain
values, so the schedule is tested by hand-computed cases (``tests/test_schedule.py``) without a model.
"""

from __future__ import annotations

import math
import zlib

from uniflow_cli.errors import UsageError
from uniflow_cli.settings import STAGE_BY, STAGE_PLANS, TrainSettings

__all__ = ["STAGE_BY", "STAGE_PLANS", "lr_factor", "mixed_seed", "stage_plan", "total_steps_for", "warmup_steps"]


def stage_plan(total_steps: int, cfg: TrainSettings, *, round_: int = 1, total_rounds: int | None = None) -> list[str]:
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
            raise UsageError("stage_by='round' needs the total number of rounds R (total_rounds)", fix="give total_rounds, the rounds of the whole run")
        return [first if (round_ - 1) < cfg.tau * total_rounds else second] * total_steps
    n_first = math.ceil(cfg.tau * total_steps) if cfg.stages == "two-stage" else total_steps - math.ceil(cfg.tau * total_steps)
    return [first] * n_first + [second] * (total_steps - n_first)


def total_steps_for(cfg: TrainSettings, num_examples: int) -> int:
    """Optimizer steps of one round: ``steps``, else ⌈epochs · n / (batch_size · grad_accum)⌉ (at least 1).

    One optimizer step consumes ``batch_size × grad_accum`` examples, so an epoch over ``n`` examples is
    that many fewer steps with gradient accumulation."""
    if cfg.steps is not None:
        return cfg.steps
    epochs = cfg.epochs if cfg.epochs is not None else 1.0
    return max(1, math.ceil(epochs * num_examples / (cfg.batch_size * cfg.grad_accum)))


def warmup_steps(cfg: TrainSettings, steps: int) -> int:
    """Linear warm-up length: ⌊warmup_ratio · steps⌋ steps."""
    return int(cfg.warmup_ratio * steps)


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """The learning-rate multiplier of optimizer step ``step`` (0-based) of ``steps``.

    Linear warm-up over the first ``warmup`` steps — (step + 1) / (warmup + 1), never 0, so the first
    step already learns — then linear decay from 1 to 1 / (steps − warmup) on the last step."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (steps - step) / max(1, steps - warmup))


def mixed_seed(seed: int, round_: int, client: str) -> int:
    """A per-(seed, round, client) seed: data order differs across rounds and clients, reproducibly."""
    return (seed * 1_000_003 + round_ * 7_919 + zlib.crc32(str(client).encode())) % (2**31 - 1)
