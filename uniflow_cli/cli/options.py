"""Shared ``Annotated`` option types, so every command spells the same option the same way.

Nothing here imports torch: ``uniflow --help`` must stay fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

WorkspaceOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--workspace",
        "-w",
        help="Workspace directory (else $UNIFLOW_WORKSPACE, else the nearest parent holding uniflow.toml).",
        show_default=False,
    ),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output (never done silently).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed: same inputs and seed give the same bytes.")]
RoundOpt = Annotated[
    Optional[int], typer.Option("--round", "-t", min=0, help="Round number in the workspace.", show_default=False)
]
OutDirOpt = Annotated[
    Optional[Path], typer.Option("--out", "-o", help="Output directory (must not exist unless --force).", show_default=False)
]
DtypeOpt = Annotated[
    str, typer.Option("--dtype", help="Storage dtype of the written tensors: float32, bfloat16 or float16.")
]
