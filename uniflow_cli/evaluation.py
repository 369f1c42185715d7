"""Evaluation: teacher-forced token accuracy and greedy generation scored with the standard libraries.

Two layers, as everywhere in uniflow:

* :func:`evaluate_model` — the in-memory core: a built model and samples per modality in, the
  :func:`uniflow_cli.metrics.summarize` dict and the per-sample records out. No paths, no printing.
* :func:`run_evaluate` — the I/O around it for ``uniflow evaluate``, in three steps:
  :func:`~uniflow_cli.eval_target.resolve_target` (what to evaluate: a workspace round, the untrained base,
  or an explicit adapter + data; every input checked *before* the expensive model build),
  :func:`build_model` (settings → model → earlier rounds folded into the base → the final adapter) and
  :func:`evaluate_target` (metrics, the payload, the atomic write of the eval JSON).

Determinism: the model runs in eval mode (no dropout), generation is greedy (no sampling) and the RNG
is seeded inside a forked RNG state, so the same inputs — device, precision and thread count included —
give the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from uniflow_cli.errors import ConfigError, DataError
from uniflow_cli.eval_target import (  # noqa: F401  (re-exported: the Flower server and tests import them from here)
    ALL_MODALITIES,
    ENCODER_MODALITIES,
    EvalRequest,
    EvalTarget,
    check_fingerprint,
    check_modalities,
    check_workspace_evaluation,
    resolve_target,
)

#: How many predictions per modality the eval JSON keeps (the metrics cover every sample).
SAMPLES_IN_JSON = 10

OnBatch = Callable[[int, int, str], None]  # (samples done, samples total, phase/modality)


@dataclass(frozen=True)
class EvalOptions:
    """How to score: greedy generation length, batch size, the first ``limit`` samples per modality (None:
    all), the BERTScore backbone (None: the embedded all-MiniLM-L6-v2) and layer (None: its default), and
    where and how the model computes: ``device`` (``auto | cpu | cuda[:N] | mps``) and ``precision``
    (``fp32 | bf16 | fp16``: the base's dtype and the autocast; None: the workspace's ``[train]``
    precision, else fp32); ``quantize`` (None | nf4 | int8): the LLM's frozen linear layers quantised
    after any FedEx/FLoRA history is folded in (evaluation folds once, so this is sound here)."""

    max_new_tokens: int = 16
    batch_size: int = 8
    limit: int | None = None
    bertscore_model: Path | None = None
    bertscore_layers: int | None = None
    device: str = "auto"
    precision: str | None = None
    quantize: str | None = None

    def __post_init__(self) -> None:
        from uniflow_cli.compute import check_precision_name, check_quantize_name

        if self.precision is not None:
            check_precision_name(self.precision)
        check_quantize_name(self.quantize)
        if self.max_new_tokens < 1:
            raise ConfigError.invalid("max_new_tokens", self.max_new_tokens, "must be >= 1", example=16)
        if self.batch_size < 1:
            raise ConfigError.invalid("batch_size", self.batch_size, "must be >= 1", example=8)
        if self.limit is not None and self.limit < 1:
            raise ConfigError.invalid("limit", self.limit, "must be >= 1", fix="leave it unset to use every sample")


# --------------------------------------------------------------------------------------------------
# The in-memory core
# --------------------------------------------------------------------------------------------------
def _rows(samples: Any, limit: int | None) -> list[dict[str, Any]]:
    # datasets.Dataset and plain lists both support len() and integer indexing; rows become dicts.
    n = len(samples) if limit is None else min(limit, len(samples))
    return [dict(samples[i]) for i in range(n)]


def _checked_groups(model: Any, datasets_by_modality: Mapping[str, Any], limit: int | None) -> dict[str, list[dict[str, Any]]]:
    """The first ``limit`` rows of each modality, sorted by modality; every split is one the model can read."""
    from uniflow_cli.models import unwrap

    have = set(unwrap(model).modalities)
    groups: dict[str, list[dict[str, Any]]] = {}
    for modality in sorted(datasets_by_modality):
        if modality in ENCODER_MODALITIES and modality not in have:
            raise DataError(
                f"the test data has {modality} samples but the model has no {modality} encoder (encoders: {', '.join(sorted(have)) or 'none'})",
                fix=f"evaluate with a model whose [model] modalities include {modality!r}, or remove that split",
            )
        rows = _rows(datasets_by_modality[modality], limit)
        if not rows:
            raise DataError(f"the {modality} test set is empty (0 samples)", fix="re-run 'uniflow partition' with a test split")
        for row in rows:
            if row.get("modality") != modality:
                raise DataError(
                    f"sample {row.get('id')!r} has modality {row.get('modality')!r} but is in the {modality} split",
                    fix="re-create the test split with 'uniflow partition'",
                )
        groups[modality] = rows
    return groups


def _teacher_forced_counts(out: Any, labels: Any, n_rows: int) -> list[tuple[int, int]]:
    """Per row ``(correct, total)`` answer tokens: from the answer-only head when the model ran it, else
    from the full logits (an LLM whose head is more than ``lm_head(hidden)``)."""
    from uniflow_cli.metrics import answer_token_counts, token_accuracy
    from uniflow_cli.models.multimodal import AnswerOutput

    if isinstance(out, AnswerOutput):
        return answer_token_counts(out.logits.float().cpu(), out.labels.cpu(), out.rows.cpu(), n_rows)
    logits = out.logits.float().cpu()
    return [token_accuracy(logits[i : i + 1], labels[i : i + 1]) for i in range(n_rows)]


def _batches(model: Any, groups: Mapping[str, list[dict[str, Any]]], options: EvalOptions, on_batch: OnBatch | None,
             seed: int) -> Iterator[tuple[str, list[dict[str, Any]], Any, str]]:
    """``(modality, rows, device, precision)`` for every batch, in order: the model placed on ``options.device``
    for ``options.precision`` (None: fp32), in eval mode (dropout off: evaluation must not depend on the
    RNG), the caller's work inside a forked, seeded RNG; ``on_batch`` is told after each batch."""
    import torch

    from uniflow_cli.compute import check_precision, place, resolve_device

    device, precision = resolve_device(options.device), options.precision or "fp32"
    check_precision(precision, device)
    place(model, device, precision)
    total, done = sum(len(rows) for rows in groups.values()), 0
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for modality, rows in groups.items():
            for start in range(0, len(rows), options.batch_size):
                chunk = rows[start : start + options.batch_size]
                yield modality, chunk, device, precision
                done += len(chunk)
                if on_batch is not None:
                    on_batch(done, total, modality)


def _generate(model: Any, groups: Mapping[str, list[dict[str, Any]]], options: EvalOptions, on_batch: OnBatch | None, seed: int) -> list[dict[str, Any]]:
    """Per-sample records: teacher-forced token counts and the greedy prediction, batch by batch, on
    ``options.device`` under ``options.precision``'s autocast (None: fp32)."""
    import torch

    from uniflow_cli.compute import autocast, to_device
    from uniflow_cli.models import collate

    records: list[dict[str, Any]] = []
    for modality, chunk, device, precision in _batches(model, groups, options, on_batch, seed):
        with torch.inference_mode(), autocast(device, precision):
            batch = collate(chunk, model, train=True)
            counts = _teacher_forced_counts(model(to_device(batch, device), full_logits=False), batch["labels"], len(chunk))
            prompts = collate(chunk, model, train=False)
            predictions = model.generate(to_device(prompts, device), max_new_tokens=options.max_new_tokens)
        cut = [a or b for a, b in zip(batch["truncated"], prompts["truncated"])]
        for row, (correct, n_tokens), prediction, was_cut in zip(chunk, counts, predictions, cut):
            records.append({
                "modality": modality, "id": str(row.get("id", "")), "question": str(row.get("question", "")),
                "prediction": prediction, "reference": str(row.get("answer", "")).strip(),
                "correct": correct, "total": n_tokens, "truncated": was_cut,
            })
    return records


def evaluate_model(
    model: Any,
    datasets_by_modality: Mapping[str, Any],
    options: EvalOptions | None = None,
    *,
    on_batch: OnBatch | None = None,
    seed: int = 0,
) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Score ``model`` on the samples of each modality.

    For every batch: (1) teacher-forced token accuracy from ``model(collate(batch, train=True))``
    (:func:`uniflow_cli.metrics.token_accuracy`, counted per sample and pooled later), (2) greedy
    generation of up to ``options.max_new_tokens`` tokens for EM, BLEU, ROUGE-L; after all batches one
    BERTScore pass. ``options.limit`` keeps the first N samples of each modality (deterministic).

    Returns ``(metrics, samples)``: ``metrics`` is :func:`uniflow_cli.metrics.summarize`'s dict
    (percentages per modality and ``overall``, whose ``modalities`` lists what it pools), ``samples``
    maps each modality to its per-sample records (``id``, ``question``, ``prediction``, ``reference``,
    ``correct``, ``total``, ``truncated``, ``bert_*``). Every sequence is cut to the model's default
    ``max_length`` while it is tokenised (a huge question or answer costs no more than a long one).
    """
    from uniflow_cli.metrics import OVERALL, attach_bertscore, resolve_bertscore_model, summarize
    from uniflow_cli.models.classify import is_classifier

    options = options or EvalOptions()
    if is_classifier(model):
        return evaluate_classifier(model, datasets_by_modality, options, on_batch=on_batch, seed=seed)
    resolve_bertscore_model(options.bertscore_model, options.bertscore_layers)  # a bad backbone fails before generation
    groups = _checked_groups(model, datasets_by_modality, options.limit)
    records = _generate(model, groups, options, on_batch, seed)
    if on_batch is not None:
        on_batch(len(records), len(records), "BERTScore")
    records = attach_bertscore(records, model_path=options.bertscore_model, num_layers=options.bertscore_layers)
    metrics = summarize(records)
    metrics[OVERALL]["modalities"] = list(groups)  # "overall" always says what it pools
    by_modality: dict[str, list[dict[str, Any]]] = {m: [] for m in groups}
    for rec in records:
        by_modality[rec["modality"]].append(rec)
    return metrics, by_modality


def _predicted_labels(model: Any, groups: Mapping[str, list[dict[str, Any]]], options: EvalOptions, on_batch: OnBatch | None,
                      seed: int) -> list[dict[str, Any]]:
    """Per-sample records of a classifier: the argmax class of each row, batch by batch (eval mode, seeded)."""
    import torch

    from uniflow_cli.compute import autocast, to_device
    from uniflow_cli.models import collate
    from uniflow_cli.models.multimodal import unwrap

    labels = unwrap(model).labels
    records: list[dict[str, Any]] = []
    for modality, chunk, device, precision in _batches(model, groups, options, on_batch, seed):
        with torch.inference_mode(), autocast(device, precision):
            batch = collate(chunk, model, train=False)
            predicted = model(to_device(batch, device)).logits.float().argmax(dim=-1).tolist()
        for row, index, was_cut in zip(chunk, predicted, batch["truncated"]):
            records.append({
                "modality": modality, "id": str(row.get("id", "")), "question": str(row.get("question", "")),
                "text_pair": row.get("text_pair"), "prediction": labels[index], "reference": str(row.get("answer", "")).strip(),
                "truncated": was_cut,
            })
    return records


def evaluate_classifier(
    model: Any, datasets_by_modality: Mapping[str, Any], options: EvalOptions | None = None, *, on_batch: OnBatch | None = None, seed: int = 0
) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """:func:`evaluate_model` for a classify model: the argmax class of every sample, then accuracy, macro-F1,
    per-class scores and the confusion matrix per split and ``overall``
    (:func:`uniflow_cli.metrics.classification_summary`). Every reference must be one of the model's labels."""
    from uniflow_cli.metrics import OVERALL, classification_summary
    from uniflow_cli.models.multimodal import unwrap
    from uniflow_cli.models.task import check_dataset_labels

    options = options or EvalOptions()
    base = unwrap(model)
    groups = _checked_groups(model, datasets_by_modality, options.limit)
    for modality, rows in groups.items():
        check_dataset_labels(rows, base.settings, f"the {modality} test set")
    records = _predicted_labels(model, groups, options, on_batch, seed)
    metrics = classification_summary(records, base.labels)
    metrics[OVERALL]["modalities"] = list(groups)
    by_modality: dict[str, list[dict[str, Any]]] = {m: [] for m in groups}
    for rec in records:
        by_modality[rec["modality"]].append(rec)
    return metrics, by_modality


# --------------------------------------------------------------------------------------------------
# The I/O layer: uniflow evaluate = resolve the target, build its model, evaluate it
# --------------------------------------------------------------------------------------------------
@dataclass
class EvalResult:
    payload: dict[str, Any]
    path: Path
    round: int
    notices: list[str] = field(default_factory=list)


@dataclass
class BuiltModel:
    model: Any
    fingerprint: str
    notices: list[str] = field(default_factory=list)


def build_model(target: EvalTarget, *, progress: Callable[[str], None] | None = None, dtype: Any = None) -> BuiltModel:
    """The model ``target`` describes: its base (fingerprint-checked against every adapter first; loaded in
    ``dtype``, None: float32), rounds 1..T-1 folded into the base (FedEx residuals, FLoRA merges:
    :func:`~uniflow_cli.models.history.fold_history`), then round T's LoRA loaded and its own residual added."""
    from uniflow_cli.models import base_fingerprint, load_model, model_from_adapter
    from uniflow_cli.models.history import fold_history

    status = progress or (lambda _msg: None)
    status("fingerprinting the base model")
    fingerprint = base_fingerprint(target.model)
    for loaded in target.adapters:
        check_fingerprint(loaded, fingerprint)
    status("building the model")
    if target.final is None:
        model = load_model(target.model, target.lora, 0, progress=status, dtype=dtype)
    else:
        model = model_from_adapter(target.model, target.final, target.lora, progress=status, dtype=dtype, local_adapter=target.local is not None)
    if target.local is not None:  # FedDPA's personalised model: the client's local adapter beside the global
        from uniflow_cli.models.lora import load_local_tensors

        load_local_tensors(model, target.local.tensors, where=str(target.local.path))
    folded = fold_history(model, target.chain, target.spec)
    if target.final is not None:  # its LoRA pairs are loaded as LoRA, not merged; only its residual goes to the base
        fold_history(model, [(target.round or 0, target.final)], target.spec, merge=False, into=folded)
    notices = []
    if folded.residual_tensors:
        notices.append(f"added {folded.residual_tensors} FedEx residual tensor(s) of rounds 1..{target.round} to the base weights")
    if folded.merged_layers:
        notices.append(f"merged {folded.merged_layers} FLoRA layer update(s) of earlier rounds into the base weights")
    return BuiltModel(model=model, fingerprint=fingerprint, notices=notices)


def evaluate_target(target: EvalTarget, built: BuiltModel, options: EvalOptions, *, on_batch: OnBatch | None = None) -> EvalResult:
    """Score ``built`` on ``target``'s samples and write the eval JSON; the notices say what was assembled."""
    from uniflow_cli.compute import math_mode, resolve_device
    from uniflow_cli.evaluation_io import build_eval_payload, write_eval_json
    from uniflow_cli.metrics import DEFAULT_BERTSCORE_MODEL, resolve_bertscore_model
    from uniflow_cli.models.lora import unwrap

    if target.model.is_classify:
        return _evaluate_classify_target(target, built, options, on_batch=on_batch)
    bs_dir, bs_layers = resolve_bertscore_model(options.bertscore_model, options.bertscore_layers)
    metrics, records = evaluate_model(built.model, target.samples, options, on_batch=on_batch)
    notices = [*target.notices, *built.notices]
    max_length = unwrap(built.model).max_length
    cut = sum(1 for recs in records.values() for rec in recs if rec["truncated"])
    if cut:
        notices.append(f"{cut} test sample(s) were longer than {max_length} tokens and were cut to fit")
    keep = ("id", "question", "prediction", "reference")
    client = {"client": target.client, "private_state": str(target.workspace.client_state(target.client))} if target.client is not None else {}
    payload = build_eval_payload(
        round=target.round if target.round is not None else 0,
        adapter={"path": str(target.final.path) if target.final is not None else None, "method": target.method,
                 "base_fingerprint": built.fingerprint, **client},
        config={
            "max_new_tokens": options.max_new_tokens,
            "limit": options.limit,
            "batch_size": options.batch_size,
            "bertscore": {"model": DEFAULT_BERTSCORE_MODEL if options.bertscore_model is None else str(bs_dir), "num_layers": bs_layers},
            "data": target.source,
            "max_length": max_length,
            "device": str(resolve_device(options.device)),
            "precision": options.precision or "fp32",
            "math": math_mode(resolve_device(options.device), options.precision or "fp32"),
            "quantize": options.quantize,
        },
        metrics=metrics,
        samples={m: [{k: rec[k] for k in keep} for rec in recs[:SAMPLES_IN_JSON]] for m, recs in records.items()},
    )
    if target.explicit and target.round is None:
        notices.append("the adapter records no round; the eval JSON says round 0")
    write_eval_json(target.out, payload, force=target.force)
    return EvalResult(payload=payload, path=target.out, round=payload["round"], notices=notices)


def _evaluate_classify_target(target: EvalTarget, built: BuiltModel, options: EvalOptions, *, on_batch: OnBatch | None = None) -> EvalResult:
    """:func:`evaluate_target` for a classify model: its payload records ``task`` and ``labels`` and has no
    generation or BERTScore settings (see docs/evaluation.md, "Classification")."""
    from uniflow_cli.compute import math_mode, resolve_device
    from uniflow_cli.evaluation_io import build_eval_payload, write_eval_json
    from uniflow_cli.models.lora import unwrap

    metrics, records = evaluate_classifier(built.model, target.samples, options, on_batch=on_batch)
    notices = [*target.notices, *built.notices]
    max_length = unwrap(built.model).max_length
    cut = sum(1 for recs in records.values() for rec in recs if rec["truncated"])
    if cut:
        notices.append(f"{cut} test sample(s) were longer than {max_length} tokens and were cut to fit")
    client = {"client": target.client, "private_state": str(target.workspace.client_state(target.client))} if target.client is not None else {}
    device = resolve_device(options.device)
    payload = build_eval_payload(
        round=target.round if target.round is not None else 0,
        task="classify",
        labels=list(target.model.labels),
        adapter={"path": str(target.final.path) if target.final is not None else None, "method": target.method,
                 "base_fingerprint": built.fingerprint, **client},
        config={"limit": options.limit, "batch_size": options.batch_size, "data": target.source, "max_length": max_length,
                "device": str(device), "precision": options.precision or "fp32", "math": math_mode(device, options.precision or "fp32")},
        metrics=metrics,
        samples={m: [{k: rec[k] for k in ("id", "question", "text_pair", "prediction", "reference")} for rec in recs[:SAMPLES_IN_JSON]]
                 for m, recs in records.items()},
    )
    if target.explicit and target.round is None:
        notices.append("the adapter records no round; the eval JSON says round 0")
    write_eval_json(target.out, payload, force=target.force)
    return EvalResult(payload=payload, path=target.out, round=payload["round"], notices=notices)


def _check_task_options(target: EvalTarget, options: EvalOptions) -> None:
    """QA: the BERTScore backbone resolves. Classify: no option that only generation or an LLM uses."""
    from uniflow_cli.metrics import resolve_bertscore_model

    if not target.model.is_classify:
        resolve_bertscore_model(options.bertscore_model, options.bertscore_layers)
        return
    if options.quantize is not None:
        raise ConfigError.invalid("quantize", options.quantize, "applies to a qa model's LLM; a classify model is not quantised",
                                  fix="leave it unset")
    if options.bertscore_model is not None or options.bertscore_layers is not None:
        raise ConfigError.invalid("bertscore_model", options.bertscore_model or options.bertscore_layers,
                                  "does not apply to a classify model (it generates no text to score)", fix="drop the BERTScore options")


def run_evaluate(
    request: EvalRequest,
    options: EvalOptions | None = None,
    *,
    on_batch: OnBatch | None = None,
    on_status: Callable[[str], None] | None = None,
) -> EvalResult:
    """The whole ``uniflow evaluate`` (see :class:`~uniflow_cli.eval_target.EvalRequest` for the modes); returns
    the written payload. Every check runs before the model build; the output is refused before any work."""
    from uniflow_cli.compute import check_precision, compute_dtype, precision_dtype, resolve_device
    from uniflow_cli.models.quantize import check_quantize, quantize_llm

    options = options or EvalOptions()
    device = resolve_device(options.device)
    target = resolve_target(request)
    _check_task_options(target, options)  # QA: a bad BERTScore backbone fails before the model build
    options = replace(options, device=str(device), precision=options.precision or train_precision(target.workspace))
    check_precision(options.precision, device)
    check_quantize(options.quantize, device)
    built = build_model(target, progress=on_status, dtype=precision_dtype(options.precision))
    if options.quantize is not None:
        quantize_llm(built.model, options.quantize, device=device, compute_dtype=compute_dtype(device, options.precision))
    return evaluate_target(target, built, options, on_batch=on_batch)


def train_precision(workspace: Any) -> str:
    """The precision a workspace trains in (its ``[train]`` precision; fp32 without a workspace): evaluating
    in the same one measures the model the clients trained, at the memory they needed."""
    from uniflow_cli.settings import resolve_train

    return resolve_train(workspace).precision if workspace is not None else "fp32"


__all__ = ["BuiltModel", "EvalOptions", "EvalRequest", "EvalResult", "EvalTarget", "build_model", "evaluate_model", "evaluate_target",
           "run_evaluate"]
