"""``uniflow flower new DIR``: write a ready Flower app project (pyproject.toml + README) for a workspace.

The project holds configuration only: its components point at the apps inside the installed uniflow
package. ``examples/flower/`` is this template rendered with the defaults (a test keeps them equal).
No flwr or torch import here (the command module must stay light).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from uniflow_cli.errors import ConfigError

TEMPLATE = """\
# A ready Flower app: uniflow's two-stage multimodal clients and FedA²-LoRA aggregation under Flower.
#
#   uniflow init fed --preset tiny-random --modalities image && uniflow partition ... --workspace fed
#   export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1   # use this environment; never `uv sync` the app
#   flwr run . local --stream --run-config "workspace='$PWD/fed'"
#
# See docs/flower.md for the SuperLink + SuperNode deployment (TLS, SuperNode authentication).
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{name}"
version = "0.1.0"
description = "uniflow as a Flower app: two-stage multimodal LoRA clients, FedA²-LoRA aggregation"
license = {{ text = "Apache-2.0" }}
dependencies = ["flwr>=1.42,<1.43", "uniflow-cli[flower]"]

[tool.flwr.app]
publisher = "uniflow"

[tool.flwr.app.components]
# The apps live in the installed uniflow package; this project only configures them.
serverapp = "uniflow_cli.flower.server_app:app"
clientapp = "uniflow_cli.flower.client_app:app"

[tool.flwr.app.config]
workspace = {workspace}              # absolute path of the server's workspace (and the nodes', unless a node overrides it)
preset = {preset}      # must match the workspace's [model] preset ("" = whatever it uses)
method = {method}            # {methods}
num-server-rounds = {rounds}
tau = {tau}                  # Eq. 7: share of local steps in stage I (encoders)
lambda = {lambda_}                # Eq. 13's Tikhonov λ
ridge = "auto"              # auto: λ only where ĀĀᵀ is singular; always; never
steps = {steps}                   # local optimizer steps per round
batch-size = 4
lr = 0.0002
seed = 0
min-train-nodes = 2         # a round proceeds as long as this many clients reply usefully
min-available-nodes = 2
dp = false                  # Flower's server-side fixed-clipping DP ({dp_methods})
dp-noise-multiplier = 0.1
dp-clipping-norm = 10.0
secagg = false              # Flower's SecAgg+: the server sees only sums (fedA2: 2 exchanges a round, fedit, ffa: 1)
secagg-num-shares = 0       # key shares per node (0 = every sampled node)
secagg-reconstruction-threshold = 2
secagg-clipping-range = 1.0 # a client refuses to send |n_k/max-weight * value| above it
secagg-quantization-range = 0   # levels (0 = the largest power of two with nodes * levels < 2^32)
secagg-max-weight = 1024.0  # n_k must not exceed it; a power of two keeps the weights exact
stages = "two-stage"        # two-stage (Eq. 7) | joint | reverse | llm-only | encoder-only
stage-by = "step"           # step: stage I = the first tau of each round's steps; round: of the rounds
fraction-train = 1.0        # share of the connected nodes asked to train each round
round-timeout = 3600.0      # seconds a round waits for replies (a dead node is noticed after 2 missed heartbeats)
eval-rounds = ""            # "last", "all" or "1,3": uniflow evaluate on the server after those rounds
eval-limit = 0              # test samples per modality for that evaluation (0 = all)
"""

CONNECTIONS = """\
# Flower CLI connections: copy into $FLWR_HOME/config.toml (default ~/.flwr/config.toml).
[superlink]
default = "local"

[superlink.local]                 # flwr run . local  — a simulation on this machine
address = ":local:"
options.num-supernodes = {supernodes}

[superlink.loopback]              # flwr run . loopback — a SuperLink you started (docs/flower.md)
address = "127.0.0.1:9093"
insecure = true
"""


@dataclass(frozen=True)
class ProjectSettings:
    name: str = "uniflow-flower"
    workspace: str = ""
    preset: str = "tiny-random"
    method: str = "fedA2"
    rounds: int = 2
    tau: float = 0.25
    lambda_: float = 1.0
    steps: int = 4
    supernodes: int = 3

    def __post_init__(self) -> None:
        from uniflow_cli.aggregation.registry import method_spec  # torch-free

        method_spec(self.method)
        for name, example in (("rounds", 2), ("steps", 4), ("supernodes", 3)):
            if getattr(self, name) < 1:
                raise ConfigError.invalid(name, getattr(self, name), "must be >= 1", example=example)
        if not 0.0 <= self.tau <= 1.0:
            raise ConfigError.invalid("tau", self.tau, "must be in [0, 1]", example=0.25)
        if not (math.isfinite(self.lambda_) and self.lambda_ >= 0):
            raise ConfigError.invalid("lambda_", self.lambda_, "must be a finite number >= 0", example=1.0)


def render(settings: ProjectSettings) -> dict[str, str]:
    """File name → text of the project (TOML strings are JSON-quoted: both accept the same escapes here)."""
    from uniflow_cli.aggregation.registry import SPECS

    pyproject = TEMPLATE.format(
        name=settings.name, workspace=json.dumps(settings.workspace), preset=json.dumps(settings.preset), method=json.dumps(settings.method),
        rounds=settings.rounds, tau=repr(float(settings.tau)), lambda_=repr(float(settings.lambda_)), steps=settings.steps,
        methods=" | ".join(SPECS), dp_methods=", ".join(name for name, spec in SPECS.items() if spec.line_up),
    )
    return {"pyproject.toml": pyproject, "flower-config.toml": CONNECTIONS.format(supernodes=settings.supernodes)}


def is_project_dir(path: Path, files: dict[str, str]) -> bool:
    """What ``flower new --force`` may replace: a directory holding only the files this command writes."""
    from uniflow_cli.paths import is_real_dir

    return is_real_dir(path) and all(p.name in files and p.is_file() and not p.is_symlink() for p in Path(path).iterdir())


def write_project(out: Path, settings: ProjectSettings, *, force: bool = False) -> Path:
    from uniflow_cli.atomic import publish_dir

    files = render(settings)
    with publish_dir(Path(out), force=force, replaces=lambda p: is_project_dir(p, files), kind="uniflow Flower app directory") as tmp:
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
    return Path(out)
