"""``uniflow models``: prepare (convert + verify) the embedded default model, list presets and cache state."""

from __future__ import annotations

from typing import Annotated

import typer

from uniflow_cli.cli.boundary import UniflowGroup

EPILOG = """[bold]Examples[/bold]

  uniflow models prepare                 [dim]# convert SmolLM2 + DINOv2 + Whisper once (~1 min), verified[/dim]

  uniflow models prepare --modalities image --force   [dim]# rebuild the LLM and image encoder[/dim]

  uniflow models list

The cache lives in $UNIFLOW_CACHE/models (default ~/.cache/uniflow/models)."""

models_app = typer.Typer(
    cls=UniflowGroup,
    name="models",
    help="Prepare and list the models (the embedded offline default and the test preset).",
    epilog=EPILOG,
    rich_markup_mode="rich",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@models_app.command("prepare", epilog=EPILOG)
def prepare(
    preset: Annotated[str, typer.Option("--preset", "-p", help="Preset to prepare (only smol needs conversion).")] = "smol",
    modalities: Annotated[str, typer.Option("--modalities", help="Encoders to prepare besides the LLM.")] = "image,audio",
    force: Annotated[bool, typer.Option("--force", help="Convert again even if the cache is intact.")] = False,
) -> None:
    """Convert the embedded model files into cached HF dirs and verify them (GGUF, ONNX, CTranslate2)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from uniflow_cli.cli.console import err, out
    from uniflow_cli.models import cache
    from uniflow_cli.models.presets import SMOL_PARTS, cache_status, ensure_converted
    from uniflow_cli.models.settings import ModelSettings

    settings = ModelSettings(preset=preset, modalities=[m.strip() for m in modalities.split(",") if m.strip()])
    if settings.preset != "smol":
        out.print(f"preset {settings.preset!r} needs no conversion")
        return
    parts = ["llm", *settings.modalities]
    for part in parts:  # fail on a missing package before converting anything
        cache.locate(SMOL_PARTS[part])
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("checking cache", total=len(parts))
        for part in parts:
            bar.update(task, description=f"{SMOL_PARTS[part].name}")
            ensure_converted(SMOL_PARTS[part], force=force, progress=lambda msg: bar.update(task, description=msg))
            bar.advance(task)
    for part in parts:
        info = cache_status(SMOL_PARTS[part])
        out.print(f"[green]ready[/green] {info['name']:<22} {info['entry']}")


@models_app.command("list", epilog=EPILOG)
def list_models() -> None:
    """Show the presets, what they contain, and whether the embedded default is converted."""
    from rich.table import Table

    from uniflow_cli.cli.console import out
    from uniflow_cli.models import cache
    from uniflow_cli.models.presets import SMOL_PARTS, cache_status

    presets = Table(title="presets", show_lines=False)
    presets.add_column("preset")
    presets.add_column("llm")
    presets.add_column("image encoder")
    presets.add_column("audio encoder")
    presets.add_row("smol (default)", "SmolLM2-135M-Instruct", "DINOv2-small", "Whisper tiny.en encoder")
    presets.add_row("tiny-random", "Llama 2×32 (random)", "DINOv2 2×24 (random)", "Whisper enc. 2×16 (random)")
    presets.add_row("custom", "any local AutoModelForCausalLM dir", "DINOv2/ViT/CLIP/SigLIP dir", "Whisper/wav2vec2/HuBERT dir")
    out.print(presets)
    table = Table(title=f"embedded default cache ({cache.models_cache()})")
    table.add_column("part")
    table.add_column("package")
    table.add_column("state")
    table.add_column("entry / fix")
    for part, source in SMOL_PARTS.items():
        info = cache_status(source)
        state = info["state"]
        colour = "green" if state == "ready" else "yellow"
        table.add_row(part, info["package"], f"[{colour}]{state}[/{colour}]", info.get("entry") or info.get("fix") or "")
    out.print(table)
