"""The workspace: the directory layout of a file-drop federation and its ``uniflow.toml`` config.

A workspace is found the way git finds a repository: ``--workspace DIR``, else ``UNIFLOW_WORKSPACE``,
else the nearest parent of the current directory holding ``uniflow.toml``. Layout::

    fed/
      uniflow.toml                    experiment config (sections [model], [lora], [train], [aggregate]: settings.py)
      data/partition.json             clients, modalities, counts, label histograms, seed
      data/clients/<k>/ data/test/<modality>/
      rounds/<t>/global/              what the server published for round t (round 0 = initial adapter)
      rounds/<t>/report.json          the server's per-layer aggregation report of round t (aggregate --report)
      rounds/<t>/clients/<k>/         what client k dropped for round t
      state/clients/<k>/              client-private state that never leaves the client (FedSA's B, FedDPA's local adapter)
      state/flower/<k>/globals/<t>/   a Flower node's copies of earlier globals (fedex/flora fold them)
      eval/round-<t>.json             uniflow evaluate of rounds/<t>/global
      eval/clients/<k>/round-<t>.json FedSA/FedDPA: client k's personalised model (global + its private state)

Round numbering: clients train on ``rounds/t/global`` and drop into ``rounds/t+1/clients/<k>``; the
server fuses ``rounds/t+1/clients/*`` into ``rounds/t+1/global``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib  # Python >= 3.11 (pyproject's requires-python; tests/test_packaging.py checks the floor)
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uniflow_cli.errors import ConfigError, WorkspaceError
from uniflow_cli.paths import check_id, check_round, confined, is_real_dir
from uniflow_cli.settings import AggregateSettings, LoraSettings, TrainSettings  # noqa: F401  (the tables live in settings.py)

CONFIG_NAME = "uniflow.toml"
ENV_VAR = "UNIFLOW_WORKSPACE"


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

    def round_report(self, t: int) -> Path:
        """The per-layer report of round ``t``'s aggregation (beside the global, never inside it)."""
        return self._under("rounds", str(check_round(t)), "report.json")

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
        """A client's personalised model (FedSA: global A + its private B; FedDPA: global + its local adapter) evaluated at round ``t``."""
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
                f"workspace {root} has no {CONFIG_NAME}", fix=f"run 'uniflow init {root}' first, or point to the right directory"
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
