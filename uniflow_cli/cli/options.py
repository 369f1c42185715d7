"""Shared ``Annotated`` option types, so every command spells the same option the same way.

Short flags: ONE meaning per letter across every command (a new short flag is added to this table first;
every option not listed has only its long form)::

    -a  --adapter      evaluate, ask, export
    -b  --batch-size   local-train, evaluate
    -c  --client       local-train, evaluate, ask, export (partition's and simulate's --clients have none)
    -d  --dataset      partition                         (the --data of evaluate/local-train has none)
    -h  --help         every command
    -m  --method       init, aggregate, simulate, local-train, flower new   (report's --metrics and
                                                          evaluate's --modalities have none)
    -n  --limit        evaluate, data show               (data show keeps --n as an alias)
    -o  --out          partition, report, aggregate, local-train, evaluate, export
    -p  --preset       init, evaluate, local-train, models prepare, flower new, ask, export
    -t  --round        aggregate, evaluate, local-train, ask, export
    -w  --workspace    every command that reads or writes a workspace

``-d`` went to ``--dataset`` (not ``--data``) because the README, docs/benchmarks.md and the tests write
``uniflow partition -d easy-vqa -d spoken-qa``; ``--data`` is rarer and reads fine in full.

Where commands word an option differently, the ``*_option`` factories keep the spelling here and take the
command's help text; the ``*Opt`` types are the common case. Nothing here imports torch (``uniflow --help``
must stay fast): the method names come from the torch-free ``aggregation.registry``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from uniflow_cli.aggregation.registry import DEFAULT_METHOD, METHOD_NAMES
from uniflow_cli.compute import DEVICES, PRECISIONS  # torch-free
from uniflow_cli.settings import UPLOAD_DTYPES

# The spellings, one place each (tests check every command against the table above).
WORKSPACE_FLAGS = ("--workspace", "-w")
CLIENT_FLAGS = ("--client", "-c")
METHOD_FLAGS = ("--method", "-m")
DATASET_FLAGS = ("--dataset", "-d")
DATA_FLAGS = ("--data",)
PRESET_FLAGS = ("--preset", "-p")
TAU_FLAGS = ("--stage-tau", "--tau")  # --tau: init's and local-train's alias, and flower new's only spelling before
ROUND_FLAGS = ("--round", "-t")
LIMIT_FLAGS = ("--limit", "-n")
OUT_FLAGS = ("--out", "-o")
BATCH_SIZE_FLAGS = ("--batch-size", "-b")

# Kept literal (with a test against models.settings.PRESETS / data.builtin.BUILTINS): importing those
# modules would load the model cache helpers and numpy on every --help.
PRESET_NAMES = ("smol", "tiny-random", "random-1b", "random-7b", "minilm", "custom")
BUILTIN_DATASETS = ("easy-vqa", "spoken-qa", "text-qa", "snli", "rotten-tomatoes")

METHODS_HELP = " | ".join(METHOD_NAMES) + ", or per module: 'encoders=fedsa,llm=fedA2' (module patterns → method; a bare method is the default)"

# Help text is rich markup: a literal TOML table name must be written "\\[train]", or rich drops it as a tag.


def method_option(help: str = "Aggregation method:", **kwargs: Any) -> Any:
    """``--method/-m``; the help always ends with the method names, so no command lists them by hand."""
    return typer.Option(*METHOD_FLAGS, help=f"{help} {METHODS_HELP}.", **kwargs)


def client_option(help: str = "Client id (its shard is data/clients/<id>).", **kwargs: Any) -> Any:
    return typer.Option(*CLIENT_FLAGS, help=help, show_default=False, **kwargs)


def preset_option(help: str = "", **kwargs: Any) -> Any:
    """``--preset/-p``; the help starts with the preset names, then says what the command does with it."""
    return typer.Option(*PRESET_FLAGS, help=f"Model preset: {' | '.join(PRESET_NAMES)}. {help}".strip(), **kwargs)


def tau_option(help: str = "τ of Eq. 7: share of local steps (or rounds) in stage I (encoders).", **kwargs: Any) -> Any:
    return typer.Option(*TAU_FLAGS, help=help, **kwargs)


def round_option(help: str = "Round number in the workspace.", **kwargs: Any) -> Any:
    # min=0 belongs to the spelling: round 0 is the initial global, a negative round never exists.
    return typer.Option(*ROUND_FLAGS, min=0, help=help, show_default=False, **kwargs)


WorkspaceOpt = Annotated[
    Optional[Path],
    typer.Option(
        *WORKSPACE_FLAGS,
        help="Workspace directory (else $UNIFLOW_WORKSPACE, else the nearest parent holding uniflow.toml).",
        show_default=False,
    ),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output (never done silently).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object on stdout (progress and notices go to stderr).")]
# Optional where a command's None means "the workspace's [train] value" (local-train); others pass a default.
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed: same inputs and seed give the same bytes.")]
RoundOpt = Annotated[Optional[int], round_option()]
OutDirOpt = Annotated[
    Optional[Path], typer.Option(*OUT_FLAGS, help="Output directory (must not exist unless --force).", show_default=False)
]
DtypeOpt = Annotated[
    Optional[str], typer.Option("--dtype", help=f"Storage dtype of the written tensors: {', '.join(UPLOAD_DTYPES)} (bfloat16/float16: half the bytes).")
]
ClientOpt = Annotated[Optional[str], client_option()]
# Optional: None means "the command's default" (the workspace's [aggregate] method, the global's method, ...).
MethodOpt = Annotated[Optional[str], method_option(f"Aggregation method (default: the workspace's \\[aggregate] method, else {DEFAULT_METHOD}):", show_default=False)]
PresetOpt = Annotated[Optional[str], preset_option(show_default=False)]
TauOpt = Annotated[Optional[float], tau_option(show_default=False)]
DatasetOpt = Annotated[
    list[str],
    typer.Option(*DATASET_FLAGS, help=f"Built-in name ({', '.join(BUILTIN_DATASETS)}) or dataset path; repeat to combine.", show_default=False),
]
DataDirOpt = Annotated[Optional[Path], typer.Option(*DATA_FLAGS, help="A partitioned data directory (a client shard or a test split).", show_default=False)]
# No min=1 here: set_threads says "--threads 0 must be >= 1" with a fix, better than click's range message.
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help="CPU threads for torch (>= 1; default: $UNIFLOW_THREADS, else "
                                                   "$OMP_NUM_THREADS, else the physical cores this process may use).", show_default=False)]
LimitOpt = Annotated[Optional[int], typer.Option(*LIMIT_FLAGS, min=1, help="Only the first N samples (default: all).", show_default=False)]
# Where and how the model computes (uniflow_cli.compute). The device is a flag only, never a [train] key:
# it belongs to the machine, not to the experiment. No choices list here: compute's one-line errors say
# more than click's (which device is missing, and why).
DeviceOpt = Annotated[str, typer.Option("--device", help=f"Where the model computes: {' | '.join(DEVICES)} (auto: CUDA if present, else MPS, else the CPU).")]
PrecisionOpt = Annotated[
    Optional[str],
    typer.Option("--precision", help=f"{' | '.join(PRECISIONS)}: the dtype the frozen base is loaded in and autocast runs under; LoRA, "
                 "projectors and the optimizer stay float32; fp16 only on CUDA (default: the \\[train] precision, else fp32).", show_default=False),
]
QuantizeOpt = Annotated[
    Optional[str],
    typer.Option("--quantize", help="nf4 | int8: store the LLM's frozen linear layers quantised (QLoRA, bitsandbytes; CUDA or the CPU); "
                 "LoRA stays float32. Not with methods that fold updates into the base (fedex, flora). Default: the \\[train] quantize, else none.",
                 show_default=False),
]
GradientCheckpointingOpt = Annotated[
    bool, typer.Option("--gradient-checkpointing", help="Recompute the LLM's and encoders' activations in the backward pass: less memory, more time.")
]
