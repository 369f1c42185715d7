"""``uniflow ask``: one-off answers from a trained model, with the paper's prompt.

The model is the one ``uniflow evaluate`` scores: :func:`uniflow_cli.eval_target.model_target` resolves a
workspace round (its earlier rounds' FedEx residuals / FLoRA merges, FedSA's private B or FedDPA's local
adapter with ``client``) or an explicit adapter, and :func:`uniflow_cli.evaluation.build_model` builds it. A
question becomes a sample and goes through the same ``collate(..., train=False)`` (Eq. 4's prompt) and the
same greedy ``generate`` as a test sample; ``sample`` draws from the LLM's distribution instead (temperature
only, no top-k/top-p). A ``classify`` model answers with its predicted label (the argmax evaluation counts)
and the class probabilities.

Media files are untrusted input: a regular file (no FIFO or device) of at most :data:`MAX_MEDIA_BYTES`,
decoded before the model is built, so a wrong file costs no model build. Each question is answered on its
own (batch of one, RNG reseeded), so an answer never depends on the other questions asked with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uniflow_cli.errors import ConfigError, DataError, UsageError, worded

#: The largest image or audio file ``ask`` reads (a 16 kHz mono WAV of ~30 min; far above any encoder's input).
MAX_MEDIA_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class AskRequest:
    """Which model: a workspace ``round`` (default the latest; ``client`` K: K's personalised model) or an
    explicit ``adapter`` (settings from ``preset``, else recorded, else ``workspace``)."""

    workspace: Any = None
    round: int | None = None
    adapter: Path | None = None
    preset: str | None = None
    client: str | None = None


@dataclass(frozen=True)
class Question:
    """One question; ``image`` / ``audio``: a file for an image or spoken-question sample; ``pair``: a
    classify model's second text (e.g. the hypothesis of an NLI pair)."""

    text: str
    image: Path | None = None
    audio: Path | None = None
    pair: str | None = None


@dataclass(frozen=True)
class AskOptions:
    """How to answer: ``max_new_tokens`` generated (greedy, or ``sample`` at ``temperature``), the RNG
    ``seed`` (sampling), where and how the model computes (``device``; ``precision`` None: the workspace's
    ``[train]`` precision, else fp32)."""

    max_new_tokens: int = 64
    sample: bool = False
    temperature: float | None = None
    seed: int = 0
    device: str = "auto"
    precision: str | None = None

    def __post_init__(self) -> None:
        from uniflow_cli.compute import check_precision_name

        if self.precision is not None:
            check_precision_name(self.precision)
        if self.max_new_tokens < 1:
            raise ConfigError.invalid("max_new_tokens", self.max_new_tokens, "must be >= 1", example=64)
        if self.temperature is not None and not self.sample:
            raise ConfigError.invalid("temperature", self.temperature, "applies only when sampling", fix="add --sample, or drop --temperature")
        if self.temperature is not None and not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError.invalid("temperature", self.temperature, "must be a positive number", example=0.7)


@dataclass
class AskResult:
    task: str  # qa | classify
    round: int | None
    adapter: str | None
    method: str | None
    client: str | None
    answers: list[dict[str, Any]]
    notices: list[str] = field(default_factory=list)


def resolve_model_target(request: AskRequest) -> Any:
    """:func:`~uniflow_cli.eval_target.model_target`, refusing a model that is no one's: a FedSA global alone
    carries A but no B (``evaluate`` scores it as B = 0 on purpose; asking or shipping it is a mistake)."""
    from uniflow_cli.eval_target import model_target

    target = model_target(request.workspace, request.round, request.adapter, request.preset, request.client)
    if target.spec is not None and target.spec.private_B and target.client is None:
        raise worded(UsageError, "round {t} is a {m} global: it carries A but no B (each client keeps its own B), so it is no client's model",
                     "give {round} {t} {client} K inside the workspace (client K's personalised model)",
                     t=target.round if target.round is not None else "T", m=target.method)
    return target


def read_media(path: Path, kind: str) -> bytes:
    """The bytes of an ``image`` or ``audio`` file, checked to decode (``kind`` names the setting in messages)."""
    from uniflow_cli.data.media import load_audio, load_image
    from uniflow_cli.paths import read_regular

    setting = "{" + kind + "}"  # the option's name: the CLI tells it as its flag (errors.worded)
    try:
        data = read_regular(Path(path), limit=MAX_MEDIA_BYTES, follow=True)  # the user's own file: a symlink is fine, a FIFO is not
    except FileNotFoundError:
        raise worded(DataError, setting + " {path} does not exist", "give the path of a file", path=path) from None
    except IsADirectoryError:
        raise worded(DataError, setting + " {path} is a directory", "give the path of a file", path=path) from None
    try:
        (load_image if kind == "image" else load_audio)(data)
    except DataError:
        what, fix = ("an image PIL can read", "give a PNG, JPEG, WebP or BMP file") if kind == "image" else (
            "audio soundfile can read", "give a WAV, FLAC or OGG file")
        raise worded(DataError, setting + " {path} is not " + what, fix, path=path) from None
    return data


def question_rows(model: Any, questions: Sequence[Question]) -> list[dict[str, Any]]:
    """Samples (the schema's rows) for ``questions`` on a model of settings ``model``; every file read and
    every modality checked here, before the model is built."""
    if not questions:
        raise UsageError("no question given", fix="pass the question as an argument, or '-' and one question per line on stdin")
    media: dict[tuple[str, Path], bytes] = {}
    rows = []
    for i, q in enumerate(questions):
        if model.is_classify:
            if q.image is not None or q.audio is not None:
                setting = "{image}" if q.image is not None else "{audio}"
                raise worded(UsageError, setting + " applies to a qa model; a classify model reads text only",
                             "ask a text (and {pair} TEXT for a pair)")
            rows.append({"id": f"q{i}", "modality": "text", "question": q.text, "text_pair": q.pair, "answer": ""})
            continue
        if q.pair is not None:
            raise worded(UsageError, "{pair} applies to a classify model (a text pair); this is a qa model", "put the whole question in QUESTION")
        if q.image is not None and q.audio is not None:
            raise worded(UsageError, "{image} and {audio} were both given, but a sample has one modality", "ask about the image or the audio")
        modality = "image" if q.image is not None else "audio" if q.audio is not None else "text"
        row = {"id": f"q{i}", "modality": modality, "question": q.text, "answer": "", "image": None, "audio": None}
        if modality != "text":
            if modality not in model.modalities:
                have = ", ".join(model.modalities) or "none"
                raise worded(DataError, "{" + modality + "} was given, but the model has no {m} encoder (encoders: {have})",
                             "ask a text question, or use a model whose [model] modalities include {m}", m=modality, have=have)
            path = Path(q.image if modality == "image" else q.audio)  # type: ignore[arg-type]
            if (modality, path) not in media:
                media[(modality, path)] = read_media(path, modality)
            row[modality] = media[(modality, path)]
        rows.append(row)
    return rows


def run_ask(request: AskRequest, questions: Sequence[Question], options: AskOptions | None = None, *,
            on_status: Callable[[str], None] | None = None) -> AskResult:
    """The whole ``uniflow ask``: resolve and check the model and the questions, build the model (as
    ``evaluate`` does), answer each question."""
    from dataclasses import replace

    from uniflow_cli.compute import check_precision, precision_dtype, resolve_device
    from uniflow_cli.evaluation import build_model, train_precision

    options = options or AskOptions()
    target = resolve_model_target(request)
    if target.model.is_classify and (options.sample or options.temperature is not None):
        raise worded(UsageError, "{sample} applies to a qa model's generated answer; a classify model answers with its label", "drop {sample}")
    rows = question_rows(target.model, questions)
    device = resolve_device(options.device)
    options = replace(options, device=str(device), precision=options.precision or train_precision(target.workspace))
    check_precision(options.precision, device)
    built = build_model(target, progress=on_status, dtype=precision_dtype(options.precision))
    if on_status is not None:
        on_status("answering")
    answers = (classify_rows if target.model.is_classify else answer_rows)(built.model, rows, options)
    return AskResult(task="classify" if target.model.is_classify else "qa", round=target.round,
                     adapter=str(target.final.path) if target.final is not None else None, method=target.method, client=target.client,
                     answers=answers, notices=[*target.notices, *built.notices])


def _each_row(model: Any, rows: Sequence[dict[str, Any]], options: AskOptions) -> Any:
    """``(row, device, precision)`` per question: the model placed and in eval mode (as evaluation runs it), the
    RNG forked and reseeded with ``options.seed`` before each question."""
    import torch

    from uniflow_cli.compute import place, resolve_device

    device, precision = resolve_device(options.device), options.precision or "fp32"
    place(model, device, precision)
    model.eval()
    with torch.random.fork_rng(devices=[]):
        for row in rows:
            torch.manual_seed(options.seed)
            yield row, device, precision


def answer_rows(model: Any, rows: Sequence[dict[str, Any]], options: AskOptions) -> list[dict[str, Any]]:
    """A qa model's answers: evaluation's prompt batch and greedy ``generate`` (or sampling), one row at a time."""
    import torch

    from uniflow_cli.compute import autocast, to_device
    from uniflow_cli.models import collate

    answers = []
    for row, device, precision in _each_row(model, rows, options):
        with torch.inference_mode(), autocast(device, precision):
            prompt = collate([row], model, train=False)
            text = _generate(model, to_device(prompt, device), options)[0]
        answers.append({"question": row["question"], "modality": row["modality"], "answer": text, "truncated": prompt["truncated"][0]})
    return answers


def _generate(model: Any, batch: dict[str, Any], options: AskOptions) -> list[str]:
    """Greedy: the model's own ``generate`` (evaluation's call). Sampling: the same embedded prompt into the LLM's
    ``generate`` with ``do_sample`` at ``temperature`` (top-k and top-p off: the distribution as trained)."""
    from uniflow_cli.models.multimodal import unwrap

    if not options.sample:
        return model.generate(batch, max_new_tokens=options.max_new_tokens)
    base = unwrap(model)
    tok = base.tokenizer
    out = base.llm.generate(
        inputs_embeds=base.embed(batch), attention_mask=batch["attention_mask"], max_new_tokens=options.max_new_tokens, do_sample=True,
        temperature=options.temperature or 1.0, top_k=0, top_p=1.0, num_beams=1,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id, eos_token_id=tok.eos_token_id,
    )
    return [text.strip() for text in tok.batch_decode(out, skip_special_tokens=True)]


def classify_rows(model: Any, rows: Sequence[dict[str, Any]], options: AskOptions) -> list[dict[str, Any]]:
    """A classify model's answers: the argmax label (what evaluation counts) and every class's probability."""
    import torch

    from uniflow_cli.compute import autocast, to_device
    from uniflow_cli.models import collate
    from uniflow_cli.models.multimodal import unwrap

    labels = unwrap(model).labels
    answers = []
    for row, device, precision in _each_row(model, rows, options):
        with torch.inference_mode(), autocast(device, precision):
            batch = collate([row], model, train=False)
            logits = model(to_device(batch, device)).logits.float()[0].cpu()
        probabilities = torch.softmax(logits, dim=-1).tolist()
        answers.append({"question": row["question"], "pair": row["text_pair"], "label": labels[int(logits.argmax())],
                        "probabilities": dict(zip(labels, probabilities)), "truncated": batch["truncated"][0]})
    return answers


__all__ = ["AskOptions", "AskRequest", "AskResult", "Question", "read_media", "resolve_model_target", "run_ask"]
