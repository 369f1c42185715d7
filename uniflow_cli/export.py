"""``uniflow export``: a trained model as standard Hugging Face checkpoints that load without uniflow.

The model is the one ``uniflow evaluate`` scores (:func:`uniflow_cli.ask.resolve_model_target` →
:func:`uniflow_cli.evaluation.build_model`, in float32: FedEx residuals and FLoRA merges folded into the base,
FedSA's private B or FedDPA's local adapter with ``client``). Formats:

* ``merged`` (task qa): PEFT's ``merge_and_unload`` folds every active LoRA into its weight in float32, then
  each part is cast once to ``dtype`` and saved: ``llm/`` (AutoModelForCausalLM + tokenizer),
  ``encoders/<m>/`` (the encoder + its preprocessor config), ``projectors.safetensors``, ``uniflow_export.json``
  (pool, projector, prompt: what the parts need to fit, Eq. 2–4), ``README.md``, and ``uniflow-adapter/``:
  the projectors as a uniflow adapter over the exported dirs taken as a ``custom`` preset, so uniflow loads
  the tree back with unchanged outputs. Task classify: OUT is an AutoModelForSequenceClassification dir
  (LoRA merged, head included, ``id2label``) with its tokenizer.
* ``peft-llm``: the LLM's LoRA only, as a PEFT adapter over ``AutoModelForCausalLM`` (keys and patterns
  renamed from uniflow's ``base_model.model.llm.…``), its ``base_model_name_or_path`` the custom preset's
  LLM dir, else the untouched base exported to ``OUT/base``. Refused where it would not be the model
  evaluated (:func:`peft_llm_refusal`).

Everything is written into a hidden sibling and renamed into place (:func:`uniflow_cli.atomic.publish_dir`);
an existing OUT is replaced only with ``force`` and only if it is an earlier export.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uniflow_cli.errors import ConfigError, UsageError, worded
from uniflow_cli.settings import UPLOAD_DTYPES

FORMATS = ("merged", "peft-llm")
EXPORT_DTYPES = UPLOAD_DTYPES  # float32 | bfloat16 | float16
INFO_FILE = "uniflow_export.json"  # also the mark of an export (what --force may replace)
UNIFLOW_ADAPTER = "uniflow-adapter"
LLM_PREFIX = "base_model.model.llm."  # uniflow's PEFT keys of the LLM inside UniflowModel
PEFT_PREFIX = "base_model.model."  # PeftModel over AutoModelForCausalLM
_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


@dataclass(frozen=True)
class ExportRequest:
    """Which model (as :class:`~uniflow_cli.ask.AskRequest`), where (``out``), as what (``format``, ``dtype``)."""

    out: Path
    workspace: Any = None
    round: int | None = None
    adapter: Path | None = None
    preset: str | None = None
    client: str | None = None
    format: str = "merged"
    dtype: str = "float32"
    force: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError.invalid("format", self.format, f"is not one of {' | '.join(FORMATS)}", example="merged")
        if self.dtype not in EXPORT_DTYPES:
            raise ConfigError.invalid("dtype", self.dtype, f"is not one of {' | '.join(EXPORT_DTYPES)}", example="float32")


@dataclass
class ExportResult:
    out: Path
    format: str
    task: str
    dtype: str
    info: dict[str, Any]
    files: list[str]
    notices: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Pure helpers: key names and configs
# --------------------------------------------------------------------------------------------------
def llm_key(key: str) -> str | None:
    """uniflow's ``base_model.model.llm.X`` → PEFT-over-causal-LM's ``base_model.model.X`` (None: not the LLM's)."""
    return PEFT_PREFIX + key[len(LLM_PREFIX):] if key.startswith(LLM_PREFIX) else None


def llm_pattern(pattern: str) -> str | None:
    """A rank/alpha pattern key inside UniflowModel (``llm.model.layers.0.q_proj``) as the causal LM names it;
    None for a pattern of the encoders or projectors; any other pattern (a bare name) is kept."""
    if pattern.startswith("llm."):
        return pattern[len("llm."):]
    return None if pattern.startswith(("encoders.", "projectors.")) else pattern


def llm_lora_tensors(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """The LLM's LoRA factors of a uniflow adapter's tensors, under PEFT-over-causal-LM key names."""
    return {llm_key(k): v for k, v in sorted(tensors.items()) if k.startswith(LLM_PREFIX) and k.endswith(_LORA_SUFFIXES)}  # type: ignore[misc]


def peft_llm_config(peft_config: Mapping[str, Any], tensors: Mapping[str, Any], base: str) -> dict[str, Any]:
    """LoraConfig fields for the renamed ``tensors``: targets = the module names that carry LoRA (uniflow targets
    the LLM by those names), ``rank_pattern`` from each module's own rank, alpha patterns renamed."""
    modules = sorted({k[: -len(s)] for k in tensors for s in _LORA_SUFFIXES if k.endswith(s)})
    r = int(peft_config["r"])
    ranks = {m.removeprefix(PEFT_PREFIX): int(tensors[m + ".lora_A.weight"].shape[0]) for m in modules if m + ".lora_A.weight" in tensors}
    alphas = {llm_pattern(k): v for k, v in (peft_config.get("alpha_pattern") or {}).items() if llm_pattern(k) is not None}
    return {
        "task_type": "CAUSAL_LM", "r": r, "lora_alpha": peft_config.get("lora_alpha", 8), "lora_dropout": peft_config.get("lora_dropout", 0.0),
        "use_rslora": bool(peft_config.get("use_rslora", False)), "bias": "none", "base_model_name_or_path": base,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}),
        "rank_pattern": {m: k for m, k in ranks.items() if k != r}, "alpha_pattern": alphas,
    }


def peft_llm_refusal(target: Any) -> str | None:
    """Why the LLM's LoRA alone would not be the model ``target`` describes (None: it would be)."""
    from uniflow_cli.peft_keys import adapter_family

    final = target.final
    if target.model.is_classify:
        return "a classify model has no LLM"
    if final is None or adapter_family(final.peft_config) == "vera":
        return "a VeRA adapter's projections are shared with the encoders' layers and sized for all of them"
    if any(a.residual for a in target.adapters):
        return "FedEx residuals changed the base weights"
    if target.chain and target.spec is not None and target.spec.merges_into_base:
        return "earlier FLoRA rounds were merged into the base weights"
    if target.local is not None:
        return "FedDPA's local adapter is a second LoRA beside the global one"
    if not any(k.startswith(LLM_PREFIX) for k in final.tensors):
        return "the adapter has no LoRA in the LLM"
    return None


def is_export_dir(path: Path) -> bool:
    """An earlier ``uniflow export`` (what ``force`` may replace; never any other directory)."""
    return Path(path).is_dir() and not Path(path).is_symlink() and (Path(path) / INFO_FILE).is_file()


def _torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# --------------------------------------------------------------------------------------------------
# Saving the parts
# --------------------------------------------------------------------------------------------------
def save_module(module: Any, path: Path, dtype: Any) -> None:
    """``save_pretrained`` in ``dtype``; a bare tower (CLIP's/SigLIP's vision transformer) inside the model class
    its config builds, so that ``AutoModel`` loads it back."""
    from transformers import AutoModel, PreTrainedModel

    module.to(dtype)
    if not isinstance(module, PreTrainedModel):
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            holder = AutoModel.from_config(module.config)
        name = next(n for n, child in holder.named_children() if type(child) is type(module))
        setattr(holder, name, module)
        module = holder.to(dtype)
    module.save_pretrained(path)


def save_whisper_encoder(encoder: Any, path: Path, dtype: Any, max_seconds: float) -> None:
    """A Whisper encoder as a ``WhisperModel`` dir whose decoder is an empty stub (0 layers, a 1-token
    vocabulary): ``WhisperModel.from_pretrained(dir).get_encoder()`` is the encoder, and uniflow's
    audio loader reads it as any Whisper dir. The positional table stays cut to ``max_seconds``."""
    import copy

    import torch
    from transformers import WhisperFeatureExtractor, WhisperModel

    config = copy.deepcopy(encoder.config)
    config.update({"decoder_layers": 0, "vocab_size": 1, "max_target_positions": 1, "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0,
                   "decoder_start_token_id": 0, "suppress_tokens": None, "begin_suppress_tokens": None, "architectures": ["WhisperModel"]})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the stub's few weights: fixed bytes
        model = WhisperModel(config)
    model.encoder.load_state_dict(encoder.state_dict())
    model.to(dtype).save_pretrained(path)
    chunk = int(max_seconds) if float(max_seconds).is_integer() else 30  # an integral clip length pads like uniflow does
    WhisperFeatureExtractor(feature_size=config.num_mel_bins, chunk_length=chunk).save_pretrained(path)


def save_encoder(wrapper: Any, module: Any, path: Path, dtype: Any) -> dict[str, Any]:
    """One modality's encoder (LoRA already merged) and its preprocessing; returns what the JSON says of it."""
    from transformers import ViTImageProcessor

    from uniflow_cli.models.encoders import VisionEncoder, WhisperAudioEncoder

    if isinstance(wrapper, VisionEncoder):
        save_module(module, path, dtype)
        size = wrapper.image_size
        # uniflow's preprocessing: RGB, bicubic resize to size × size, /255, normalise: ViT's processor does exactly that.
        ViTImageProcessor(do_resize=True, size={"height": size, "width": size}, resample=3, do_rescale=True, rescale_factor=1 / 255,
                          do_normalize=True, image_mean=list(wrapper.mean), image_std=list(wrapper.std)).save_pretrained(path)
        return {"kind": "vision", "image_size": size, "has_cls": wrapper.has_cls, "interpolate_pos_encoding": wrapper.interpolate,
                "image_mean": list(wrapper.mean), "image_std": list(wrapper.std)}
    if isinstance(wrapper, WhisperAudioEncoder):
        save_whisper_encoder(module, path, dtype, wrapper.max_seconds)
        return {"kind": "whisper", "max_seconds": wrapper.max_seconds, "frames": wrapper.n_frames, "has_cls": False,
                "valid_positions": "ceil(samples / 320), at most frames / 2"}
    save_module(module, path, dtype)
    wrapper.extractor.save_pretrained(path)
    return {"kind": "waveform", "max_seconds": wrapper.max_seconds, "has_cls": False}


def _prompt_record(base: Any) -> dict[str, Any]:
    """Eq. 4's strings exactly as the collator tokenises them (chat template pieces included)."""
    collator, p = base.collator, base.settings.prompt
    return {"bos_token_id": base.tokenizer.bos_token_id, "prefix": collator.chat_pre + p.before,
            "open": {m: p.tag("open", m) for m in base.modalities}, "close": {m: p.tag("close", m) for m in base.modalities},
            "gap": p.gap, "gap_text_only": p.gap_text_only, "suffix": p.after + collator.chat_post}


def write_merged_qa(merged: Any, target: Any, tmp: Path, final: Path, dtype: str) -> dict[str, Any]:
    """``llm/``, ``encoders/<m>/``, ``projectors.safetensors`` and ``uniflow-adapter/`` of a merged UniflowModel;
    returns the JSON's model part."""
    from safetensors.torch import save_file

    dt = _torch_dtype(dtype)
    projectors = {f"{m}.{name}": p.detach().to(dt).contiguous() for m, proj in merged.projectors.items() for name, p in proj.state_dict().items()}
    save_file(projectors, str(tmp / "projectors.safetensors"), metadata={"format": "pt"})
    modalities = {}
    for m in merged.modalities:
        enc = save_encoder(merged.collator.encoders[m], merged.encoders[m], tmp / "encoders" / m, dt)
        proj = merged.projectors[m]
        modalities[m] = {"encoder": f"encoders/{m}", "projector": {"weight": f"{m}.weight", "bias": f"{m}.bias",
                                                                    "in_features": proj.in_features, "out_features": proj.out_features}, **enc}
    info = {"llm": "llm", "modalities": modalities, "pool": target.model.pool, "pool_tokens": target.model.pool_tokens,
            "tokens_per_modality": target.model.tokens_per_modality, "max_length": merged.max_length, "prompt": _prompt_record(merged)}
    save_module(merged.llm, tmp / "llm", dt)
    merged.tokenizer.save_pretrained(tmp / "llm")
    info["uniflow_adapter"] = _write_uniflow_adapter(projectors, target, tmp, final)
    return info


def _write_uniflow_adapter(projectors: Mapping[str, Any], target: Any, tmp: Path, final: Path) -> str:
    """A round-0-like uniflow adapter over the exported dirs as a ``custom`` preset: no LoRA tensors (B = 0, the
    LoRA is already in the weights), the exported projectors, the settings recorded with the dirs' final paths."""
    import dataclasses

    from uniflow_cli.adapters import AdapterMeta, write_adapter
    from uniflow_cli.global_info import settings_record
    from uniflow_cli.models import base_fingerprint

    def dirs(root: Path) -> dict[str, Any]:
        return {"llm": str(root / "llm"), **{f"{m}_encoder": str(root / "encoders" / m) for m in target.model.modalities}}

    custom = dataclasses.replace(target.model, preset="custom", **dirs(final.resolve()))
    staged = dataclasses.replace(custom, **dirs(tmp))  # the fingerprint hashes the dirs' contents, not where they are
    tensors = {f"base_model.model.projectors.{k}": v.float() for k, v in projectors.items()}
    meta = AdapterMeta(role="global", base_fingerprint=base_fingerprint(staged), round=0, modalities=list(custom.modalities), method=None,
                       extra={"settings": settings_record(custom, target.lora)})
    write_adapter(tmp / UNIFLOW_ADAPTER, peft_config=target.final.peft_config, tensors=tensors, meta=meta)
    return UNIFLOW_ADAPTER


def write_classifier(merged: Any, target: Any, tmp: Path, dtype: str) -> dict[str, Any]:
    """A merged SequenceClassifier as an AutoModelForSequenceClassification dir (head included) + tokenizer."""
    labels = list(target.model.labels)
    net = merged.encoder
    net.config.id2label = dict(enumerate(labels))
    net.config.label2id = {label: i for i, label in enumerate(labels)}
    save_module(net, tmp, _torch_dtype(dtype))
    merged.tokenizer.save_pretrained(tmp)
    return {"labels": labels, "max_length": merged.max_length}


def write_peft_llm(model: Any, target: Any, tmp: Path, final: Path, dtype: str) -> dict[str, Any]:
    """The LLM's LoRA as a PEFT adapter (the tensors the built model holds: loaded, or the build's init where the
    adapter has none, as FFA's A) over the custom preset's LLM dir, else the base saved into ``base/``."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    from uniflow_cli.models import adapter_tensors
    from uniflow_cli.models.multimodal import unwrap

    dt = _torch_dtype(dtype)
    tensors = {k: v.to(dt).contiguous() for k, v in llm_lora_tensors(adapter_tensors(model)).items()}
    if target.model.preset == "custom":
        base, shipped = str(Path(target.model.llm).resolve()), None
    else:
        base, shipped = str(final.resolve() / "base"), "base"
        llm = unwrap(model.unload()).llm  # the frozen base as built, without LoRA
        save_module(llm, tmp / "base", dt)
        unwrap(model).tokenizer.save_pretrained(tmp / "base")
    LoraConfig(**peft_llm_config(target.final.peft_config, tensors, base)).save_pretrained(str(tmp))
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    return {"base_model_name_or_path": base, "base": shipped, "lora_modules": len(tensors) // 2, "prompt": _prompt_record(unwrap(model))}


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------
def run_export(request: ExportRequest, *, on_status: Callable[[str], None] | None = None) -> ExportResult:
    """The whole ``uniflow export``: the output is refused before any work, the model resolved and checked, built
    in float32 as ``evaluate`` builds it, written into a hidden sibling and renamed into place."""
    from uniflow_cli import __version__
    from uniflow_cli.ask import AskRequest, resolve_model_target
    from uniflow_cli.atomic import check_writable_target, publish_dir
    from uniflow_cli.evaluation import build_model
    from uniflow_cli.models.presets import quiet_transformers

    status = on_status or (lambda _msg: None)
    out = Path(request.out)
    check_writable_target(out, force=request.force, replaces=is_export_dir, kind="uniflow export")
    target = resolve_model_target(AskRequest(request.workspace, request.round, request.adapter, request.preset, request.client))
    refusal = peft_llm_refusal(target) if request.format == "peft-llm" else None
    if refusal is not None:
        raise worded(UsageError, "{format} peft-llm cannot be exact here: {why}", "use {format} merged (everything folded into plain weights)", why=refusal)
    built = build_model(target, progress=status)  # float32: every merge in float32, one cast per part when saved
    task = "classify" if target.model.is_classify else "qa"
    info: dict[str, Any] = {"uniflow_export": 1, "uniflow": __version__, "format": request.format, "task": task, "dtype": request.dtype,
                            "source": _source(target, built)}
    with publish_dir(out, force=request.force, replaces=is_export_dir, kind="uniflow export") as tmp, quiet_transformers():
        status(f"writing the {request.format} export")
        if request.format == "peft-llm":
            info["peft"] = write_peft_llm(built.model, target, tmp, out, request.dtype)
        else:
            merged = built.model.merge_and_unload(safe_merge=True)  # every active adapter (FedDPA: both) into its weight
            info["model"] = (write_classifier(merged, target, tmp, request.dtype) if task == "classify"
                             else write_merged_qa(merged, target, tmp, out, request.dtype))
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(readme(info), encoding="utf-8")
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    return ExportResult(out=out, format=request.format, task=task, dtype=request.dtype, info=info, files=files, notices=[*target.notices, *built.notices])


def _source(target: Any, built: Any) -> dict[str, Any]:
    return {"adapter": str(target.final.path) if target.final is not None else None, "round": target.round, "method": target.method,
            "client": target.client, "base_fingerprint": built.fingerprint, "preset": target.model.preset, "notes": list(built.notices),
            "model_settings": target.model.to_dict()}


# --------------------------------------------------------------------------------------------------
# README.md of an export
# --------------------------------------------------------------------------------------------------
def readme(info: Mapping[str, Any]) -> str:
    """How the exported parts fit, in the export's own values (deterministic: no dates)."""
    src = info["source"]
    who = f"round {src['round']}" + (f" ({src['method']})" if src["method"] else "") + (f", client {src['client']}'s personalised model" if src["client"] else "")
    head = [f"# uniflow export: {who}", "", (f"Format `{info['format']}`, task `{info['task']}`, tensors in {info['dtype']}; written by uniflow "
            f"{info['uniflow']}. Standard Hugging Face files: loading them needs no uniflow code."), ""]
    if info["format"] == "peft-llm":
        return "\n".join([*head, *_readme_peft(info)]) + "\n"
    if info["task"] == "classify":
        return "\n".join([*head, *_readme_classify(info)]) + "\n"
    return "\n".join([*head, *_readme_qa(info)]) + "\n"


def _readme_peft(info: Mapping[str, Any]) -> list[str]:
    base = "base" if info["peft"]["base"] else info["peft"]["base_model_name_or_path"]
    return [("The LLM's LoRA as a PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`), for text prompts. The encoders' LoRA "
            "and the projectors are not part of it: use `--format merged` for image and audio questions."), "", "```python",
            "from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'base = AutoModelForCausalLM.from_pretrained("{base}")', 'model = PeftModel.from_pretrained(base, ".")  # this directory',
            f'tokenizer = AutoTokenizer.from_pretrained("{base}")', "```", "",
            ("uniflow's prompt for a text question (Eq. 4 without features): the input ids `[BOS] + ids(prefix) + ids(gap_text_only + question + "
             f"suffix)`, each string tokenised on its own without special tokens, with the strings of `peft.prompt` in `{INFO_FILE}`. "
             "`model.merge_and_unload()` gives plain weights.")]


def _readme_classify(info: Mapping[str, Any]) -> list[str]:
    labels = ", ".join(info["model"]["labels"])
    return [("This directory is an `AutoModelForSequenceClassification` checkpoint: the encoder with its LoRA merged into the weights, the "
            f"trained classification head, `id2label` = {labels}, and its tokenizer."), "", "```python",
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer", "",
            'model = AutoModelForSequenceClassification.from_pretrained(".")', 'tokenizer = AutoTokenizer.from_pretrained(".")',
            'logits = model(**tokenizer("a premise", "a hypothesis", return_tensors="pt")).logits',
            "label = model.config.id2label[int(logits.argmax(-1))]", "```", "",
            (f"Back into uniflow: `uniflow init ws --task classify --preset custom --encoder <this dir> --labels {','.join(info['model']['labels'])}` "
            "(its round 0 is this model: the head is read from the checkpoint, LoRA starts at B = 0).")]


def _readme_qa(info: Mapping[str, Any]) -> list[str]:
    model, prompt = info["model"], info["model"]["prompt"]
    rows = ["| path | what | load with |", "|---|---|---|",
            ("| `llm/` | the LLM, every LoRA (and any FedEx residual / FLoRA merge) in its weights; its tokenizer | "
            "`AutoModelForCausalLM.from_pretrained`, `AutoTokenizer.from_pretrained` |")]
    steps = []
    for m, enc in model["modalities"].items():
        if enc["kind"] == "vision":
            rows.append(f"| `encoders/{m}/` | f_{m}, LoRA merged; its preprocessor | `AutoModel.from_pretrained`, `AutoImageProcessor.from_pretrained` |")
            steps.append(f"   * {m}: RGB, bicubic resize to {enc['image_size']}×{enc['image_size']}, /255, normalise (the image processor does all "
                         f"of it); Z = `last_hidden_state`" + (" with `interpolate_pos_encoding=True`" if enc["interpolate_pos_encoding"] else "") + ".")
        elif enc["kind"] == "whisper":
            rows.append(f"| `encoders/{m}/` | the Whisper encoder, LoRA merged (the decoder is a 0-layer stub); its feature extractor | "
                        "`WhisperModel.from_pretrained(...).get_encoder()`, `WhisperFeatureExtractor.from_pretrained` |")
            steps.append(f"   * {m}: 16 kHz mono, log-mel features padded or cut to {enc['max_seconds']} s ({enc['frames']} frames); Z = "
                         f"`last_hidden_state`, of which the first ceil(samples / 320) positions are the clip.")
        else:
            rows.append(f"| `encoders/{m}/` | the audio encoder, LoRA merged; its feature extractor | `AutoModel`, `AutoFeatureExtractor` |")
            steps.append(f"   * {m}: 16 kHz mono, at most {enc['max_seconds']} s; Z = `last_hidden_state` (valid frames from the attention mask).")
    rows += ["| `projectors.safetensors` | P_m per modality: `<m>.weight` (d_llm × d_m), `<m>.bias` | `safetensors.torch.load_file` |",
             f"| `{INFO_FILE}` | pool, tokens per modality, the prompt strings, sizes | `json.load` |",
             (f"| `{model['uniflow_adapter']}/` | the projectors as a uniflow adapter over these dirs (a `custom` preset) | "
             f"`uniflow ask --adapter {model['uniflow_adapter']} \"…\"` |")]
    pool = {"adaptive": f"adaptive average pooling of the content tokens (CLS excluded) to N = {model['pool_tokens']} tokens",
            "mean": "the mean of the content tokens (CLS excluded), N = 1", "cls": "token 0 (the CLS token; the mean without one), N = 1"}[model["pool"]]
    return [*rows, "", "## How the parts fit (UniFLoW, Eq. 2–4)", "",
            "1. Eq. 2, Z = f_m(M): each modality's encoder on its preprocessed input.", *steps,
            f"2. Eq. 3, X^m = P_m(Pool(Z)): Pool is {pool}; P_m is the linear layer in `projectors.safetensors` (float math).",
            ("3. Eq. 4: the LLM reads input embeddings, not ids: "
            "`[BOS] + ids(prefix) + ids(open) + X^m (N vectors) + ids(close) + ids(gap + question + suffix)`, each string tokenised on its own "
            "without special tokens; BOS only if `ids(prefix)` does not start with it. A text question: "
            "`[BOS] + ids(prefix) + ids(gap_text_only + question + suffix)`. The strings (chat template included) are "
            f"`prompt` in `{INFO_FILE}`:"), "", *(f"   * `{k}`: {json.dumps(prompt[k], ensure_ascii=False)}" for k in
                                                  ("prefix", "open", "close", "gap", "gap_text_only", "suffix")), "",
            "4. Generate from `inputs_embeds` with the attention mask, greedy, until EOS.", "",
            ("Back into uniflow: `uniflow ask --adapter uniflow-adapter \"…\"` (the adapter records these dirs), or "
            "`uniflow init ws --preset custom --llm llm --image-encoder encoders/image …` with the `[model]` settings in "
            f"`{INFO_FILE}` (`source.model_settings`) and then `-w ws --adapter uniflow-adapter`.")]


__all__ = ["EXPORT_DTYPES", "FORMATS", "ExportRequest", "ExportResult", "is_export_dir", "llm_key", "llm_lora_tensors", "llm_pattern",
           "peft_llm_config", "peft_llm_refusal", "run_export"]
