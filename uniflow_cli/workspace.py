"""The workspace: the directory layout of a file-drop federation and its ``uniflow.toml`` config.

A workspace is found the way git finds a repository: ``--workspace DIR``, else ``UNIFLOW_WORKSPACE``,
else the nearest parent of the current directory holding ``uniflow.toml``. Layout::

    fed/
      uniflow.toml                    experiment config (sections [model], [lora], [train], [aggregate])
      data/partition.json             clients, modalities, counts, label histograms, seed
      data/clients/<k>/ data/test/<modality>/
      rounds/<t>/global/              what the server published for round t (round 0 = initial adapter)
      rounds/<t>/clients/<k>/         what client k dropped for round t
      state/clients/<k>/              client-private state that never leaves the client (FedSA's B)
      state/flower/<k>/globals/<t>/   a Flower node's copies of earlier globals (fedex/flora fold them)
      eval/round-<t>.json             uniflow evaluate of rounds/<t>/global
      eval/clients/<k>/round-<t>.json FedSA: client k's personalised model (global A + its private B)

Round numbering: clients train on ``rounds/t/global`` and drop into ``rounds/t+1/clients/<k>``; the
server fuses ``rounds/t+1/clients/*`` into ``rounds/t+1/global``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uniflow_cli.errors import ConfigError, WorkspaceError
from uniflow_cli.paths import check_id, check_round, confined, is_real_dir

CONFIG_NAME = "uniflow.toml"
ENV_VAR = "UNIFLOW_WORKSPACE"


# --------------------------------------------------------------------------------------------------
# Config dataclasses (the paper's names; validated in __post_init__ like peft's configs)
# --------------------------------------------------------------------------------------------------
@dataclass
class LoraSettings:
    """LoRA hyper-parameters shared by every client of an experiment."""

    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    use_rslora: bool = False
    llm_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    encoder_target_modules: list[str] = field(default_factory=lambda: ["query", "key", "value", "q_proj", "k_proj", "v_proj"])

    def __post_init__(self) -> None:
        from uniflow_cli.models.settings import check_field_types  # lazy: the one set of type rules for config tables

        check_field_types(self, "lora")
        if not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"lora r={self.r!r} must be a positive integer", fix="set r = 8 (or 4, 16, ...)")
        if not (isinstance(self.lora_alpha, (int, float)) and math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise ConfigError(f"lora_alpha={self.lora_alpha!r} must be a positive number", fix="set lora_alpha = 2*r")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout={self.lora_dropout!r} must be in [0, 1)", fix="set lora_dropout = 0.05")


@dataclass
class TrainSettings:
    """Local-training defaults (Eq. 7's tau is the fraction of local steps spent in stage I)."""

    tau: float = 0.25
    steps: int = 20
    batch_size: int = 4
    lr: float = 2e-4
    seed: int = 0

    def __post_init__(self) -> None:
        from uniflow_cli.models.settings import check_field_types  # lazy: the one set of type rules for config tables

        check_field_types(self, "train")
        if not 0.0 <= self.tau <= 1.0:
            raise ConfigError(f"tau={self.tau!r} must be in [0, 1]", fix="use --stage-tau 0.25 (the paper's best)")
        if self.steps < 1:
            raise ConfigError(f"steps={self.steps!r} must be >= 1", fix="use --steps 20")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size!r} must be >= 1", fix="use --batch-size 4")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr={self.lr!r} must be a finite number > 0", fix="use --lr 2e-4")
        if self.seed < 0:  # numpy's generators refuse negative seeds
            raise ConfigError(f"seed={self.seed!r} must be >= 0", fix="use --seed 0")


@dataclass
class AggregateSettings:
    """Server-side defaults: the method and FedA²-LoRA's Tikhonov term (Eq. 13)."""

    method: str = "fedA2"
    lambda_: float = 1.0
    ridge: str = "auto"
    weighting: str = "examples"

    def __post_init__(self) -> None:
        from uniflow_cli.aggregation.methods import METHODS  # lazy: imports torch
        from uniflow_cli.models.settings import check_field_types

        check_field_types(self, "aggregate", keys={"lambda_": "lambda"})
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r} is not one of {', '.join(METHODS)}", fix="use --method fedA2")
        if not (math.isfinite(self.lambda_) and self.lambda_ >= 0):
            raise ConfigError(f"lambda={self.lambda_!r} must be a finite number >= 0", fix="use --lambda 1.0")
        if self.ridge not in ("auto", "always", "never"):
            raise ConfigError(f"ridge={self.ridge!r} is not one of auto|always|never", fix="use --ridge auto")
        if self.weighting not in ("examples", "uniform"):
            raise ConfigError(f"weighting={self.weighting!r} is not examples|uniform", fix="use --weighting examples")


# --------------------------------------------------------------------------------------------------
# Finding the workspace and its directories
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workspace:
    root: Path

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_NAME

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def partition_json(self) -> Path:
        return self.data_dir / "partition.json"

    # Every path derived from an id goes through here: the id must be a plain name and the path, resolved,
    # must stay under the workspace (a symlinked `rounds/` or `clients/` pointing elsewhere is refused).
    def _under(self, *parts: str) -> Path:
        return confined(self.root, *parts)

    def client_data(self, client: int | str) -> Path:
        return self._under("data", "clients", check_id(client))

    def test_data(self, modality: str) -> Path:
        return self._under("data", "test", check_id(modality, "modality"))

    def round_dir(self, t: int) -> Path:
        return self._under("rounds", str(check_round(t)))

    def global_dir(self, t: int) -> Path:
        return self._under("rounds", str(check_round(t)), "global")

    def clients_dir(self, t: int) -> Path:
        return self._under("rounds", str(check_round(t)), "clients")

    def client_drop(self, t: int, client: int | str) -> Path:
        return self._under("rounds", str(check_round(t)), "clients", check_id(client))

    def client_state(self, client: int | str) -> Path:
        return self._under("state", "clients", check_id(client))

    def flower_globals(self, client: int | str) -> Path:
        """A Flower node's copies of the earlier globals it folds into its base (fedex, flora): ``<dir>/<t>``."""
        return self._under("state", "flower", check_id(client), "globals")

    def eval_json(self, t: int) -> Path:
        return self._under("eval", f"round-{check_round(t)}.json")

    def client_eval_json(self, client: int | str, t: int) -> Path:
        """A client's personalised model (FedSA: global A + its private B) evaluated at round ``t``."""
        return self._under("eval", "clients", check_id(client), f"round-{check_round(t)}.json")

    def rounds(self) -> list[int]:
        """All round numbers that have a directory, ascending."""
        base = self.root / "rounds"
        if not base.is_dir():
            return []
        # A round directory is a real directory named by plain decimal digits ("07" and symlinks are not rounds).
        return sorted(int(p.name) for p in base.iterdir() if p.name.isdigit() and str(int(p.name)) == p.name and is_real_dir(p))

    def published_rounds(self) -> list[int]:
        """Rounds whose global adapter has been published (the directory exists: publishing is atomic)."""
        return [t for t in self.rounds() if self.global_dir(t).is_dir()]

    def latest_global_round(self) -> int:
        published = self.published_rounds()
        if not published:
            raise WorkspaceError(
                f"no global adapter is published in {self.root / 'rounds'}",
                fix="run 'uniflow init' to create round 0, or 'uniflow aggregate --round T'",
            )
        return published[-1]

    def config(self) -> dict[str, Any]:
        return load_config(self.config_path)


def find_workspace(explicit: Path | None = None, *, required: bool = True, cwd: Path | None = None) -> Workspace | None:
    """Locate the workspace: explicit path, then $UNIFLOW_WORKSPACE, then the nearest parent with uniflow.toml."""
    if explicit is not None:
        root = Path(explicit)
        if not (root / CONFIG_NAME).is_file():
            raise WorkspaceError(
                f"--workspace {root} has no {CONFIG_NAME}", fix=f"run 'uniflow init {root}' first, or point to the right directory"
            )
        return Workspace(root.resolve())
    env = os.environ.get(ENV_VAR)
    if env:
        root = Path(env)
        if not (root / CONFIG_NAME).is_file():
            raise WorkspaceError(f"{ENV_VAR}={env} has no {CONFIG_NAME}", fix=f"unset {ENV_VAR} or run 'uniflow init {env}'")
        return Workspace(root.resolve())
    here = (cwd or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / CONFIG_NAME).is_file():
            return Workspace(candidate)
    if required:
        raise WorkspaceError(
            f"no workspace: neither --workspace, {ENV_VAR}, nor a {CONFIG_NAME} in {here} or its parents",
            fix="pass --workspace DIR, or give explicit paths (see --help)",
        )
    return None


# --------------------------------------------------------------------------------------------------
# uniflow.toml reading and writing (tomllib reads; the writer covers the flat tables we emit)
# --------------------------------------------------------------------------------------------------
SECTIONS = ("model", "lora", "train", "aggregate")


def load_config(path: Path) -> dict[str, Any]:
    """``uniflow.toml`` as a dict; each known section, when present, is a table (``lora = 3`` is refused)."""
    from uniflow_cli.errors import UnsafeInputError
    from uniflow_cli.paths import read_regular

    try:
        config = tomllib.loads(read_regular(Path(path), follow=True).decode("utf-8"))
    except FileNotFoundError as exc:
        raise WorkspaceError(f"config {path} does not exist", fix="run 'uniflow init' to create it") from exc
    except UnsafeInputError as exc:
        raise WorkspaceError(exc.problem, fix="make uniflow.toml a regular file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise WorkspaceError(f"config {path} is not valid TOML ({exc})", fix="correct the file by hand") from exc
    for name in SECTIONS:
        if name in config and not isinstance(config[name], dict):
            raise ConfigError(f"{path}: {name} = {config[name]!r:.40} must be a table ([{name}])", fix=f"write the settings under a [{name}] header")
    return config


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"cannot store non-finite value {value!r} in {CONFIG_NAME}")
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if dataclasses.is_dataclass(value):
        return _toml_value(dataclasses.asdict(value))
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, Path):
        return _toml_value(str(value))
    raise ConfigError(f"cannot store {type(value).__name__} value {value!r} in {CONFIG_NAME}")


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else _toml_value(key)


def dumps_config(config: dict[str, Any]) -> str:
    """Serialise ``{section: {key: value}}`` (values: scalars, lists, inline dicts, nested tables) to TOML."""
    lines: list[str] = []

    def emit(prefix: str, table: dict[str, Any]) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        tables = {k: v for k, v in table.items() if isinstance(v, dict)}
        if prefix:
            lines.append(f"[{prefix}]")
        for key, value in scalars.items():
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
        if prefix or scalars:
            lines.append("")
        for key, value in tables.items():
            emit(f"{prefix}.{_toml_key(key)}" if prefix else _toml_key(key), value)

    emit("", config)
    return "\n".join(lines).rstrip() + "\n"
