"""``uniflow models``: prepare (convert + verify) the embedded default model, list presets and cache state."""

from __future__ import annotations

from typing import Annotated

import typer

from uniflow_cli.cli.boundary import UniflowGroup
from uniflow_cli.cli.examples import Example, epilog
from uniflow_cli.cli.options import JsonOpt, preset_option

EXAMPLES: list[Example] = [
    ("convert SmolLM2 + DINOv2 + Whisper once (~1 min), verified", "uniflow models prepare"),
    ("rebuild the LLM and image encoder", "uniflow models prepare --modalities image --force"),
    ("", "uniflow models list"),
    ("is the embedded default converted?", "uniflow models list --json | jq '.cache.parts.llm.state'"),
]
EPILOG = epilog(EXAMPLES, ["The cache lives in $UNIFLOW_CACHE/models (default ~/.cache/uniflow/models)."])

# What each preset is made of (the `models list` table and its JSON).
PRESET_PARTS = {
    "smol": {"llm": "SmolLM2-135M-Instruct", "image_encoder": "DINOv2-small", "audio_encoder": "Whisper tiny.en encoder"},
    "tiny-random": {"llm": "Llama 2×32 (random)", "image_encoder": "DINOv2 2×24 (random)", "audio_encoder": "Whisper enc. 2×16 (random)"},
    "random-1b": {"llm": "Llama-3.2-1B shapes (random)", "image_encoder": "DINOv2-base shapes (random)", "audio_encoder": "Whisper-base enc. (random)"},
    "random-7b": {"llm": "Llama-2-7B / Vicuna-7B shapes (random)", "image_encoder": "DINOv2-large shapes (random)",
                  "audio_encoder": "Whisper-small enc. (random)"},
    # task classify (docs/models.md): a sequence classifier, no LLM; tiny-random and custom serve it too
    "minilm": {"llm": "- (task classify: all-MiniLM-L6-v2 classifier)", "image_encoder": "-", "audio_encoder": "-"},
    "custom": {"llm": "any local AutoModelForCausalLM dir", "image_encoder": "DINOv2/ViT/CLIP/SigLIP dir", "audio_encoder": "Whisper/wav2vec2/HuBERT dir"},
}
DEFAULT_PRESET = "smol"

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
    preset: Annotated[str, preset_option("Only smol needs conversion (minilm: its package is checked).")] = DEFAULT_PRESET,
    modalities: Annotated[str, typer.Option("--modalities", help="Encoders to prepare besides the LLM.")] = "image,audio",
    force: Annotated[bool, typer.Option("--force", help="Convert again even if the cache is intact.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Convert the embedded model files into cached HF dirs and verify them (GGUF, ONNX, CTranslate2)."""
    from uniflow_cli.cli.console import out, print_json
    from uniflow_cli.models import cache
    from uniflow_cli.models.presets import SMOL_PARTS, cache_status
    from uniflow_cli.models.settings import ModelSettings

    if preset == "minilm":  # the classify encoder: read as the package ships it, so only its presence is checked
        from uniflow_cli.models.presets import minilm_dir

        path = minilm_dir()
        if as_json:
            print_json({"preset": preset, "needs_conversion": False, "parts": {"encoder": {"entry": str(path)}}})
        else:
            out.print(f"preset 'minilm' needs no conversion: [green]ready[/green] {path}")
        return
    settings = ModelSettings(preset=preset, modalities=[m.strip() for m in modalities.split(",") if m.strip()])
    parts = ["llm", *settings.modalities] if settings.preset == "smol" else []
    for part in parts:  # fail on a missing package before converting anything
        cache.locate(SMOL_PARTS[part])
    if parts:
        _convert(parts, force=force)
    ready = {part: cache_status(SMOL_PARTS[part]) for part in parts}
    if as_json:
        print_json({"preset": settings.preset, "needs_conversion": bool(parts), "parts": ready})
        return
    if not parts:
        out.print(f"preset {settings.preset!r} needs no conversion")
    for info in ready.values():
        out.print(f"[green]ready[/green] {info['name']:<22} {info['entry']}")


def _convert(parts: list[str], *, force: bool) -> None:
    """Convert (or check) each part under a progress bar on stderr."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from uniflow_cli.cli.console import err
    from uniflow_cli.models.presets import SMOL_PARTS, ensure_converted

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("checking cache", total=len(parts))
        for part in parts:
            bar.update(task, description=f"{SMOL_PARTS[part].name}")
            ensure_converted(SMOL_PARTS[part], force=force, progress=lambda msg: bar.update(task, description=msg))
            bar.advance(task)


@models_app.command("list", epilog=EPILOG)
def list_models(as_json: JsonOpt = False) -> None:
    """Show the presets, what they contain, and whether the embedded default is converted."""
    from uniflow_cli.cli.console import print_json
    from uniflow_cli.models import cache
    from uniflow_cli.models.presets import SMOL_PARTS, cache_status

    parts = {part: cache_status(source) for part, source in SMOL_PARTS.items()}
    if as_json:
        presets = [{"preset": name, "default": name == DEFAULT_PRESET, **what} for name, what in PRESET_PARTS.items()]
        print_json({"presets": presets, "cache": {"dir": str(cache.models_cache()), "parts": parts}})
        return
    _print_list(parts, cache.models_cache())


def _print_list(parts: dict, cache_dir: object) -> None:
    from rich.table import Table

    from uniflow_cli.cli.console import out

    presets = Table(title="presets", show_lines=False)
    for col in ("preset", "llm", "image encoder", "audio encoder"):
        presets.add_column(col)
    for name, what in PRESET_PARTS.items():
        presets.add_row(f"{name} (default)" if name == DEFAULT_PRESET else name, what["llm"], what["image_encoder"], what["audio_encoder"])
    out.print(presets)
    table = Table(title=f"embedded default cache ({cache_dir})")
    for col in ("part", "package", "state", "entry / fix"):
        table.add_column(col)
    for part, info in parts.items():
        state = info["state"]
        colour = "green" if state == "ready" else "yellow"
        table.add_row(part, info["package"], f"[{colour}]{state}[/{colour}]", info.get("entry") or info.get("fix") or "")
    out.print(table)
