"""``uniflow export``: a trained model as standard Hugging Face checkpoints (merged weights, or the LLM's LoRA for PEFT)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from uniflow_cli.cli.examples import Example, epilog
from uniflow_cli.cli.options import (
    OUT_FLAGS,
    DtypeOpt,
    ForceOpt,
    JsonOpt,
    RoundOpt,
    ThreadsOpt,
    WorkspaceOpt,
    client_option,
    preset_option,
)

EXAMPLES: list[Example] = [
    ("inside a workspace: the latest round, LoRA merged into plain HF checkpoints (llm/, encoders/, projectors)", "uniflow export --out shipped/"),
    ("round 3 in bfloat16 (merged in float32, then cast)", "uniflow export --round 3 --dtype bfloat16 --out shipped-r3/"),
    ("FedSA / FedDPA: client 2's personalised model", "uniflow export --round 3 --client 2 --out client2/"),
    ("the LLM's LoRA as a PEFT adapter, for text use with PeftModel.from_pretrained", "uniflow export --format peft-llm --out peft/"),
    ("an explicit adapter; replace an earlier export", "uniflow export --adapter rounds/5/global --out shipped/ --force"),
]
EPILOG = epilog(EXAMPLES, [
    ("merged: OUT/llm (AutoModelForCausalLM + tokenizer), OUT/encoders/<m> (encoder + preprocessor), OUT/projectors.safetensors, "
    "OUT/uniflow_export.json (pool, projector, prompt), OUT/README.md (how they fit, Eq. 2-4) and OUT/uniflow-adapter (uniflow ask "
    "--adapter OUT/uniflow-adapter answers as before); a classify model: OUT is an AutoModelForSequenceClassification dir. "
    "peft-llm: OUT/adapter_config.json + adapter_model.safetensors over OUT/base (or the custom preset's LLM); refused where "
    "it would not be exact (VeRA, FedEx residuals, FLoRA history, FedDPA's local adapter). Published atomically. See docs/export.md."),
])


def export(
    out: Annotated[Path, typer.Option(*OUT_FLAGS, help="Output directory (must not exist unless --force; --force replaces only an "
                                                       "earlier export).", show_default=False)],
    round: RoundOpt = None,
    adapter: Annotated[Path | None, typer.Option("--adapter", "-a", help="An explicit adapter directory instead of a workspace round.",
                                                    show_default=False)] = None,
    preset: Annotated[str | None, preset_option("With --adapter: the base model (default: the adapter's recorded settings, else "
                                                   "--workspace's uniflow.toml).", show_default=False)] = None,
    client: Annotated[str | None, client_option("FedSA / FedDPA: client K's personalised model of the round.")] = None,
    format: Annotated[str, typer.Option("--format", help="merged (plain HF checkpoints, every LoRA merged) | peft-llm (the LLM's LoRA "
                                                         "as a PEFT adapter).")] = "merged",
    dtype: DtypeOpt = None,
    force: ForceOpt = False,
    threads: ThreadsOpt = None,
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Export a trained model as standard Hugging Face checkpoints that load without uniflow."""
    from uniflow_cli.cli.console import err
    from uniflow_cli.compute import set_threads
    from uniflow_cli.export import ExportRequest, run_export

    set_threads(threads)
    request = ExportRequest(out=out, workspace=workspace, round=round, adapter=adapter, preset=preset, client=client, format=format,
                            dtype=dtype or "float32", force=force)
    with err.status("checking inputs") as status:
        result = run_export(request, on_status=lambda message: status.update(message))
    _print(result, as_json)


def _print(result: Any, as_json: bool) -> None:
    from uniflow_cli.cli.console import notice, out, print_json

    for message in result.notices:
        notice(message)
    if as_json:
        print_json({"out": result.out, "format": result.format, "task": result.task, "dtype": result.dtype, "files": result.files,
                    "source": result.info["source"], "notices": result.notices})
        return
    src = result.info["source"]
    what = f"round {src['round']}" + (f" ({src['method']})" if src["method"] else "") + (f", client {src['client']}" if src["client"] else "")
    out.print(f"[green]exported[/green] {what} as {result.format} ({result.dtype}) to {result.out}", soft_wrap=True)
    for name in sorted({f.split("/")[0] for f in result.files}):
        out.print(f"  {name}", markup=False)
    out.print(f"how the parts fit: {result.out / 'README.md'}", soft_wrap=True)
