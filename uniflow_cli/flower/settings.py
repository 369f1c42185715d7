"""The Flower run config (``[tool.flwr.app.config]`` + ``--run-config`` overrides) as validated settings.

Keys use Flower's hyphenated style. Unset training/aggregation values fall back to the workspace's
``uniflow.toml`` tables exactly like ``uniflow local-train`` / ``uniflow aggregate`` do, so that a run
config and the equivalent command lines train and fuse the same bytes. No flwr import here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from uniflow_cli.aggregation.registry import SPECS
from uniflow_cli.errors import ConfigError
from uniflow_cli.settings import STAGE_BY, STAGE_PLANS

T = TypeVar("T")

# run-config key → dataclass field
RUN_CONFIG_KEYS = {
    "workspace": "workspace",
    "preset": "preset",
    "method": "method",
    "num-server-rounds": "num_server_rounds",
    "tau": "tau",
    "lambda": "lambda_",
    "ridge": "ridge",
    "weighting": "weighting",
    "clip-update-norm": "clip_update_norm",
    "robust": "robust",
    "steps": "steps",
    "batch-size": "batch_size",
    "lr": "lr",
    "seed": "seed",
    "stages": "stages",
    "stage-by": "stage_by",
    "precision": "precision",
    "quantize": "quantize",
    "device": "device",
    "gradient-checkpointing": "gradient_checkpointing",
    "fraction-train": "fraction_train",
    "min-train-nodes": "min_train_nodes",
    "min-available-nodes": "min_available_nodes",
    "round-timeout": "round_timeout",
    "dp": "dp",
    "dp-noise-multiplier": "dp_noise_multiplier",
    "dp-clipping-norm": "dp_clipping_norm",
    "secagg": "secagg",
    "secagg-num-shares": "secagg_num_shares",
    "secagg-reconstruction-threshold": "secagg_reconstruction_threshold",
    "secagg-clipping-range": "secagg_clipping_range",
    "secagg-quantization-range": "secagg_quantization_range",
    "secagg-max-weight": "secagg_max_weight",
    "eval-rounds": "eval_rounds",
    "eval-limit": "eval_limit",
}
FIELD_KEYS = {field: key for key, field in RUN_CONFIG_KEYS.items()}
# Methods whose reply arrays have exactly the global's keys and shapes in every round (MethodSpec.line_up):
# the precondition of Flower's server-side fixed clipping (it subtracts the global from every reply array
# by position). Not ffa (uploads B only), fedsa (the round-0 global still has B), fedex (residual), flora
# (rank grows).
DP_METHODS = tuple(name for name, spec in SPECS.items() if spec.line_up)


def in_run_config_terms(build: Callable[[], T]) -> T:
    """``build()``, with a library ConfigError about a setting told as its run-config key (``stage-tau``…)."""
    try:
        return build()
    except ConfigError as exc:
        if exc.field is None:
            raise
        key = FIELD_KEYS.get(exc.field, exc.field.rstrip("_").replace("_", "-"))
        raise exc.renamed(f"run-config {key}", style="key") from None


@dataclass
class FlowerRunSettings:
    """One Flower run of a uniflow federation (the paper's names where it has them)."""

    workspace: str = ""
    preset: str = ""  # "" = whatever the workspace uses; otherwise must match its [model] preset
    method: str = ""  # "" = the workspace's [aggregate] method
    num_server_rounds: int = 2
    tau: float | None = None
    lambda_: float | None = None
    ridge: str | None = None
    weighting: str | None = None
    clip_update_norm: float | None = None  # the update defenses ([aggregate] clip_update_norm / robust; None = the table's)
    robust: str | None = None
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    seed: int | None = None
    stages: str = ""  # "" = the workspace's [train] stages (default two-stage)
    stage_by: str = ""  # "" = the workspace's [train] stage_by (default step)
    # Compute (uniflow_cli.compute). None = not given, like a flag left out: precision then comes from
    # [train], the device is "auto" (each node picks its own: a node's --node-config "device='cuda:1'" wins),
    # gradient checkpointing is off.
    precision: str | None = None
    quantize: str | None = None
    device: str | None = None
    gradient_checkpointing: bool | None = None
    fraction_train: float = 1.0
    min_train_nodes: int = 2
    min_available_nodes: int = 2
    round_timeout: float = 3600.0
    dp: bool = False
    dp_noise_multiplier: float = 0.1
    dp_clipping_norm: float = 10.0
    # Secure aggregation (Flower's SecAgg+, uniflow_cli.flower.secagg): fedA2 / fedit / ffa over masked sums.
    secagg: bool = False
    secagg_num_shares: int = 0  # 0 = every sampled node holds a share of every key
    secagg_reconstruction_threshold: int = 2
    secagg_clipping_range: float = 1.0  # |n_k/max-weight · value| bound; a client refuses to send more
    secagg_quantization_range: int = 0  # levels; 0 = the largest power of two <= 2^30 with nodes · Q < 2^32
    secagg_max_weight: float = 1024.0  # n_k <= this; a power of two keeps the weights exact
    eval_rounds: str = ""  # "", "last", "all" or "1,3,5"
    eval_limit: int = 0  # 0 = every test sample

    def __post_init__(self) -> None:
        if self.num_server_rounds < 1:
            raise ConfigError(f"num-server-rounds={self.num_server_rounds!r} must be >= 1", fix="set num-server-rounds = 2")
        if self.stages not in ("", *STAGE_PLANS) or self.stage_by not in ("", *STAGE_BY):
            raise ConfigError(
                f"stages={self.stages!r}, stage-by={self.stage_by!r}",
                fix=f"use stages = one of {', '.join(STAGE_PLANS)} and stage-by = {' or '.join(STAGE_BY)}",
            )
        if not 0.0 < self.fraction_train <= 1.0:
            raise ConfigError(f"fraction-train={self.fraction_train!r} must be in (0, 1]", fix="set fraction-train = 1.0")
        if self.min_train_nodes < 1 or self.min_available_nodes < self.min_train_nodes:
            raise ConfigError(
                f"min-train-nodes={self.min_train_nodes!r}, min-available-nodes={self.min_available_nodes!r}",
                fix="use 1 <= min-train-nodes <= min-available-nodes",
            )
        if not (self.round_timeout > 0 and math.isfinite(self.round_timeout)):
            raise ConfigError(f"round-timeout={self.round_timeout!r} must be > 0 seconds", fix="set round-timeout = 3600")
        if self.dp:
            if self.dp_noise_multiplier < 0 or not self.dp_clipping_norm > 0:
                raise ConfigError(
                    f"dp-noise-multiplier={self.dp_noise_multiplier!r} / dp-clipping-norm={self.dp_clipping_norm!r}",
                    fix="use a noise multiplier >= 0 and a clipping norm > 0",
                )
        if self.eval_limit < 0:
            raise ConfigError(f"eval-limit={self.eval_limit!r} must be >= 0", fix="set eval-limit = 0 (every sample)")
        self._check_robust()
        if self.secagg:
            from uniflow_cli.flower.secagg import check_secagg_settings

            check_secagg_settings(self)
        self.eval_round_set(self.num_server_rounds)  # validates the syntax now, not after the first round

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FlowerRunSettings:
        unknown = sorted(set(run_config) - set(RUN_CONFIG_KEYS))
        if unknown:
            raise ConfigError(f"unknown run-config key(s) {unknown}", fix=f"use only: {', '.join(sorted(RUN_CONFIG_KEYS))}")
        types = {f.name: f.type for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            name = RUN_CONFIG_KEYS[key]
            kind = str(types[name])
            if isinstance(value, bool) and "bool" not in kind:
                raise ConfigError(f"run-config {key}={value!r} is not a {kind.split(' |')[0]}", fix=f"set {key} to a number/string")
            if "int" in kind and "float" not in kind and not isinstance(value, int):
                raise ConfigError(f"run-config {key}={value!r} must be an integer", fix=f"e.g. {key}=2")
            if "float" in kind and not isinstance(value, (int, float)):
                raise ConfigError(f"run-config {key}={value!r} must be a number", fix=f"e.g. {key}=0.25")
            if kind.startswith("str") and not isinstance(value, str):
                raise ConfigError(f"run-config {key}={value!r} must be a string", fix=f"quote it: {key}='...'")
            if kind.split(" |")[0] == "bool" and not isinstance(value, bool):
                raise ConfigError(f"run-config {key}={value!r} must be true or false", fix=f"{key}=true")
            values[name] = float(value) if "float" in kind and not isinstance(value, bool) else value
        return cls(**values)

    def _check_robust(self) -> None:
        """A robust sum needs enough replies every round: min-train-nodes must guarantee them (a round with fewer
        would fail to aggregate and keep the old global)."""
        from uniflow_cli.aggregation.robust import parse_robust

        spec = in_run_config_terms(lambda: parse_robust(self.robust or None))
        if spec is not None and self.min_train_nodes < spec.min_clients:
            raise ConfigError(f"run-config robust={str(spec)!r} needs at least {spec.min_clients} replies a round, but min-train-nodes="
                              f"{self.min_train_nodes} lets a round fuse fewer", fix=f"set min-train-nodes = {spec.min_clients}")

    def aggregate_overrides(self) -> dict[str, Any]:
        """What the run config sets of ``[aggregate]`` (None = the workspace's table decides)."""
        return {"method": self.method or None, "lambda_": self.lambda_, "ridge": self.ridge, "weighting": self.weighting,
                "clip_update_norm": self.clip_update_norm, "robust": self.robust or None}

    def train_overrides(self) -> dict[str, Any]:
        """What the run config sets of ``[train]`` (None = the workspace's table decides). Uploads travel in
        float32 ArrayRecords, so ``dtype`` is fixed."""
        return {"tau": self.tau, "steps": self.steps, "batch_size": self.batch_size, "lr": self.lr, "seed": self.seed,
                "stages": self.stages or None, "stage_by": self.stage_by or None, "dtype": "float32", "precision": self.precision or None,
                "quantize": self.quantize or None}

    def device_name(self, node_config: Mapping[str, Any] | None = None) -> str:
        """The device this node trains on: its node config's ``device`` (the device belongs to the machine),
        else the run config's, else ``auto``."""
        override = (node_config or {}).get("device")
        return str(override) if override else (self.device or "auto")

    def workspace_path(self, node_config: Mapping[str, Any] | None = None) -> Path:
        """A node may keep its own copy of the workspace (``--node-config "workspace='/srv/fed'"``)."""
        override = (node_config or {}).get("workspace")
        path = str(override) if override else self.workspace
        if not path:
            raise ConfigError("the run config names no workspace", fix="set workspace = '/abs/path/to/fed' (uniflow init + uniflow partition)")
        return Path(path).expanduser()

    def eval_round_set(self, total: int) -> set[int]:
        text = self.eval_rounds.strip()
        if text in ("", "none"):
            return set()
        if text == "all":
            return set(range(1, total + 1))
        if text == "last":
            return {total}
        rounds = set()
        for part in text.split(","):
            try:
                rounds.add(int(part))
            except ValueError:
                raise ConfigError(f"eval-rounds entry {part.strip()!r} is not a round number", fix="use eval-rounds = 'last', 'all' or '1,3'") from None
        outside = sorted(r for r in rounds if not 1 <= r <= total)
        if outside:
            raise ConfigError(
                f"eval-rounds {outside} outside the run's rounds 1..{total} (num-server-rounds={total})",
                fix=f"name rounds of this run, e.g. eval-rounds = '{total}' (before any training: uniflow evaluate --base)",
            )
        return rounds
