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
    ("the paper's NLU setting: a sentence(-pair) classifier on the embedded MiniLM, SNLI's three labels",
     "uniflow init nlu/ --task classify --preset minilm --labels snli --r 8"),
    ("a classifier with labels of your own, rsLoRA", "uniflow init sst/ --task classify --preset minilm --labels negative,positive --rslora"),
]
EPILOG = epilog(EXAMPLES, [
    "Writes fed/uniflow.toml ([model], [lora], [train], [aggregate]) and fed/rounds/0/global.",
    "--task classify: LoRA on the encoder's query/value projections ([lora] encoder_target_modules), the classifier head "
    "shared as modules_to_save, one training stage ([train] stages = joint). --labels takes the class names in order, "
    "or a built-in's name (snli, rotten-tomatoes) for its label set.",
])


def init(
    directory: Annotated[Path, typer.Argument(help="Workspace directory (created if missing).")] = Path("."),
    task: Annotated[str, typer.Option("--task", help="qa (the multimodal model: generated answers) | classify (a BERT-family "
                                      "sequence classifier: the paper's NLU setting).")] = "qa",
    preset: Annotated[Optional[str], preset_option("Default smol (qa) or minilm (classify, the embedded all-MiniLM-L6-v2); "
                                                   "custom takes --llm and the encoder dirs (classify: --encoder).", show_default=False)] = None,
    labels: Annotated[Optional[str], typer.Option("--labels", help="classify: the class names in class-index order, comma-separated, "
                                                  "or a built-in's name (snli, rotten-tomatoes) for its label set.", show_default=False)] = None,
    encoder: Annotated[Optional[Path], typer.Option("--encoder", help="classify + custom: local BERT-family dir "
                                                    "(AutoModelForSequenceClassification).", show_default=False)] = None,
    llm: Annotated[Optional[Path], typer.Option("--llm", help="custom: local HF causal-LM dir.", show_default=False)] = None,
    image_encoder: Annotated[Optional[Path], typer.Option("--image-encoder", help="custom: local HF vision model dir.", show_default=False)] = None,
    audio_encoder: Annotated[Optional[Path], typer.Option("--audio-encoder", help="custom: local HF Whisper/wav2vec2/HuBERT dir.", show_default=False)] = None,
    modalities: Annotated[Optional[str], typer.Option("--modalities", help="qa: encoders to build, comma-separated (default image,audio); "
                                                      "text needs none.", show_default=False)] = None,
    r: Annotated[int, typer.Option("--r", help="LoRA rank r.")] = 8,
    client_ranks: Annotated[Optional[str], typer.Option("--client-ranks", help="Heterogeneous ranks: client=rank pairs, comma-separated "
                                                        "(e.g. 0=4,1=4; each <= --r, the global's rank; \\[lora] client_ranks).",
                                                        show_default=False)] = None,
    lora_alpha: Annotated[float, typer.Option("--lora-alpha", help="LoRA α (scaling α/r, or α/√r with --rslora).")] = 16.0,
    rslora: Annotated[bool, typer.Option("--rslora", help="Use rank-stabilised scaling α/√r (the same as --adapter rslora).")] = False,
    adapter: Annotated[str, typer.Option("--adapter", help="Adapter family: lora | rslora (LoRA with α/√r) | vera (PEFT's VeRA: frozen "
                                         "random projections from --seed, trained vectors; --r is VeRA's rank, e.g. 256).")] = "lora",
    pool: Annotated[str, typer.Option("--pool", help="Eq. 3 pooling: cls | mean | adaptive.")] = "adaptive",
    pool_tokens: Annotated[int, typer.Option("--pool-tokens", help="Tokens per modality with --pool adaptive.")] = 4,
    image_size: Annotated[int, typer.Option("--image-size", help="Image side in pixels (DINOv2 patch 14).")] = 112,
    method: Annotated[str, method_option("Aggregation method of the experiment (\\[aggregate] method):")] = "fedA2",
    lambda_: Annotated[float, typer.Option("--lambda", help="Tikhonov λ of Eq. 13 (\\[aggregate] lambda_).")] = 1.0,
    tau: Annotated[float, tau_option("Eq. 7's τ for local training (\\[train] tau).")] = 0.25,
    steps: Annotated[int, typer.Option("--steps", help="Local steps per round (\\[train] steps).")] = 20,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Local learning rate (\\[train] lr; default 2e-4 for qa, 3e-3 for classify).",
                                                show_default=False)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Local batch size (\\[train] batch_size).")] = 4,
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Create a workspace: uniflow.toml and the round-0 global adapter (PEFT's seeded LoRA init)."""
    from uniflow_cli.cli.console import err, print_json
    from uniflow_cli.models.settings import ModelSettings
    from uniflow_cli.models.task import parse_labels
    from uniflow_cli.models.workspace_init import init_workspace
    from uniflow_cli.workspace import AggregateSettings, LoraSettings, TrainSettings

    classify = task == "classify"
    if classify:
        _check_classify_options(labels, modalities)
    model = ModelSettings(
        task=task,
        preset=preset or ("minilm" if classify else "smol"),
        llm=str(llm) if llm else None,
        image_encoder=str(image_encoder) if image_encoder else None,
        audio_encoder=str(audio_encoder) if audio_encoder else None,
        modalities=[] if classify else [m.strip() for m in (modalities if modalities is not None else "image,audio").split(",") if m.strip()],
        pool=pool,
        pool_tokens=pool_tokens,
        image_size=image_size,
        labels=parse_labels(labels),
        encoder=str(encoder) if encoder else None,
    )
    if classify:  # LoRA on the encoder's query/value (the paper's RoBERTa runs), no LLM; one training stage
        lora = LoraSettings(r=r, lora_alpha=lora_alpha, **adapter_family(adapter, rslora, seed), llm_target_modules=[], encoder_target_modules=["query", "value"],
                            client_ranks=_client_ranks(client_ranks))
    else:
        lora = LoraSettings(r=r, lora_alpha=lora_alpha, **adapter_family(adapter, rslora, seed), client_ranks=_client_ranks(client_ranks))
    from uniflow_cli.models.task import DEFAULT_LR

    lr = DEFAULT_LR["classify" if classify else "qa"] if lr is None else lr
    train = TrainSettings(tau=tau, steps=steps, batch_size=batch_size, lr=lr, seed=seed, **({"stages": "joint"} if classify else {}))
    aggregate = AggregateSettings(method=method, lambda_=lambda_)
    with err.status("building the model") as status:
        result = init_workspace(directory, model, lora, seed=seed, force=force, progress=lambda msg: status.update(msg), train=train, aggregate=aggregate)
    if as_json:
        print_json(_as_json(result))
    else:
        _print(result)


def _client_ranks(text: Optional[str]) -> dict[str, int]:
    """``"0=4,1=4"`` → ``{"0": 4, "1": 4}``; the values are checked by LoraSettings (ids, 1 <= rank <= r)."""
    from uniflow_cli.errors import UsageError

    out: dict[str, int] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        client, sep, rank = item.partition("=")
        if not sep or not rank.strip().isdigit() or client.strip() in out:
            raise UsageError(f"--client-ranks item {item.strip()!r} is not a new client=rank pair", fix="write e.g. --client-ranks 0=4,1=4")
        out[client.strip()] = int(rank)
    return out


def _check_classify_options(labels: Optional[str], modalities: Optional[str]) -> None:
    """What --task classify needs (--labels) and refuses (--modalities: a classifier reads text only)."""
    from uniflow_cli.errors import UsageError
    from uniflow_cli.models.task import labels_hint, parse_labels

    if modalities is not None:
        raise UsageError("--modalities applies to --task qa: a classify model reads text only", fix="drop --modalities")
    if not parse_labels(labels):
        raise UsageError("--task classify needs its class names", fix=f"give {labels_hint()}")


def adapter_family(adapter: str, rslora: bool, seed: int) -> dict[str, Any]:
    """``[lora]`` fields of ``--adapter`` (``rslora`` = ``--rslora``); VeRA's projections are drawn from ``--seed``."""
    from uniflow_cli.errors import UsageError
    from uniflow_cli.peft_keys import ADAPTER_FAMILIES

    names = (*ADAPTER_FAMILIES, "rslora")
    if adapter not in names:
        raise UsageError(f"--adapter {adapter} is not one of {' | '.join(names)}", fix="use --adapter lora, rslora or vera")
    if adapter == "vera" and rslora:
        raise UsageError("--rslora applies to LoRA, not to --adapter vera (VeRA has no α scaling)", fix="drop --rslora, or use --adapter rslora")
    if adapter == "vera":
        return {"adapter": "vera", "projection_prng_key": seed}
    return {"adapter": "lora", "use_rslora": rslora or adapter == "rslora"}


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
    if "head" in c:  # a classify model: one stage
        out.print(f"  trainable      LoRA {c['lora']:,} · head {c['head']:,} (frozen: encoder {c['encoder']:,})")
        return
    out.print(
        f"  trainable      stage encoder {c['trainable_stage_encoder']:,} · stage llm {c['trainable_stage_llm']:,} "
        f"(frozen: llm {c['llm']:,}, encoders {c['encoders']:,})"
    )
