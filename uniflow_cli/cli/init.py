"""``uniflow init``: create a workspace (uniflow.toml) and its round-0 global adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from uniflow_cli.cli.examples import Example, epilog
from uniflow_cli.cli.options import ForceOpt, JsonOpt, SeedOpt, method_option, preset_option, tau_option

EXAMPLES: list[Example] = [
    ("the embedded offline default (SmolLM2-135M + DINOv2-small + Whisper tiny.en encoder)", "uniflow init fed/"),
    ("tiny random model for quick experiments and tests; image only, rank 4 rsLoRA",
     "uniflow init fed/ --preset tiny-random --modalities image --r 4 --lora-alpha 8 --rslora"),
    ("your own local Hugging Face dirs", "uniflow init fed/ --preset custom --llm ./qwen --image-encoder ./siglip --audio-encoder ./whisper-base"),
    ("the paths written, as JSON", "uniflow init fed/ --preset tiny-random --json | jq -r .global"),
]
EPILOG = epilog(EXAMPLES, ["Writes fed/uniflow.toml ([model], [lora], [train], [aggregate]) and fed/rounds/0/global."])


def init(
    directory: Annotated[Path, typer.Argument(help="Workspace directory (created if missing).")] = Path("."),
    preset: Annotated[str, preset_option("smol is the embedded real model; custom takes --llm and the encoder dirs.")] = "smol",
    llm: Annotated[Optional[Path], typer.Option("--llm", help="custom: local HF causal-LM dir.", show_default=False)] = None,
    image_encoder: Annotated[Optional[Path], typer.Option("--image-encoder", help="custom: local HF vision model dir.", show_default=False)] = None,
    audio_encoder: Annotated[Optional[Path], typer.Option("--audio-encoder", help="custom: local HF Whisper/wav2vec2/HuBERT dir.", show_default=False)] = None,
    modalities: Annotated[str, typer.Option("--modalities", help="Encoders to build, comma-separated (image,audio); text needs none.")] = "image,audio",
    r: Annotated[int, typer.Option("--r", help="LoRA rank r.")] = 8,
    lora_alpha: Annotated[float, typer.Option("--lora-alpha", help="LoRA α (scaling α/r, or α/√r with --rslora).")] = 16.0,
    rslora: Annotated[bool, typer.Option("--rslora", help="Use rank-stabilised scaling α/√r.")] = False,
    pool: Annotated[str, typer.Option("--pool", help="Eq. 3 pooling: cls | mean | adaptive.")] = "adaptive",
    pool_tokens: Annotated[int, typer.Option("--pool-tokens", help="Tokens per modality with --pool adaptive.")] = 4,
    image_size: Annotated[int, typer.Option("--image-size", help="Image side in pixels (DINOv2 patch 14).")] = 112,
    method: Annotated[str, method_option("Aggregation method of the experiment (\\[aggregate] method):")] = "fedA2",
    lambda_: Annotated[float, typer.Option("--lambda", help="Tikhonov λ of Eq. 13 (\\[aggregate] lambda_).")] = 1.0,
    tau: Annotated[float, tau_option("Eq. 7's τ for local training (\\[train] tau).")] = 0.25,
    steps: Annotated[int, typer.Option("--steps", help="Local steps per round (\\[train] steps).")] = 20,
    lr: Annotated[float, typer.Option("--lr", help="Local learning rate (\\[train] lr).")] = 2e-4,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Local batch size (\\[train] batch_size).")] = 4,
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Create a workspace: uniflow.toml and the round-0 global adapter (PEFT's seeded LoRA init)."""
    from uniflow_cli.cli.console import err, print_json
    from uniflow_cli.models.settings import ModelSettings
    from uniflow_cli.models.workspace_init import init_workspace
    from uniflow_cli.workspace import AggregateSettings, LoraSettings, TrainSettings

    model = ModelSettings(
        preset=preset,
        llm=str(llm) if llm else None,
        image_encoder=str(image_encoder) if image_encoder else None,
        audio_encoder=str(audio_encoder) if audio_encoder else None,
        modalities=[m.strip() for m in modalities.split(",") if m.strip()],
        pool=pool,
        pool_tokens=pool_tokens,
        image_size=image_size,
    )
    lora = LoraSettings(r=r, lora_alpha=lora_alpha, use_rslora=rslora)
    train = TrainSettings(tau=tau, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    aggregate = AggregateSettings(method=method, lambda_=lambda_)
    with err.status("building the model") as status:
        result = init_workspace(directory, model, lora, seed=seed, force=force, progress=lambda msg: status.update(msg), train=train, aggregate=aggregate)
    if as_json:
        print_json(_as_json(result))
    else:
        _print(result)


def _as_json(result: Any) -> dict[str, Any]:
    return {
        "workspace": str(result.root), "config": str(result.config_path), "global": str(result.global_dir),
        "tensors": result.tensors, "base_fingerprint": result.fingerprint, "parameters": dict(result.counts),
    }


def _print(result: Any) -> None:
    from uniflow_cli.cli.console import out

    c = result.counts
    out.print(f"[green]workspace[/green] {result.root}")
    out.print(f"  config         {result.config_path}")
    out.print(f"  round 0 global {result.global_dir}  ({result.tensors} tensors)")
    out.print(f"  base           {result.fingerprint}")
    out.print(
        f"  trainable      stage encoder {c['trainable_stage_encoder']:,} · stage llm {c['trainable_stage_llm']:,} "
        f"(frozen: llm {c['llm']:,}, encoders {c['encoders']:,})"
    )
