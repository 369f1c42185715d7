"""What a workspace's task (``qa`` | ``classify``) demands of its inputs, checked before any model is built.

Torch-free: local training, evaluation and ``uniflow init`` call these on settings, adapter metadata and
dataset columns, so a mismatch costs a second, not a model build. The classifier itself is
:mod:`uniflow_cli.models.classify`.

* :func:`parse_labels` — ``--labels``: a comma-separated list, or the name of an NLU built-in whose label
  set is known (``snli``, ``rotten-tomatoes``).
* :func:`check_global_task` — a global made for another task (or, for ``classify``, other labels) is refused
  with its own line, before the fingerprint check would refuse it less clearly.
* :func:`check_data_labels` — every row of a classify split is text and its ``answer`` one of the labels.
* :func:`check_train_settings` — a classifier trains in one stage (``stages = "joint"``) and is not quantised.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from uniflow_cli.errors import ConfigError, DataError, IncompatibleAdaptersError


#: ``[train] lr`` that ``uniflow init`` writes per task. A classifier's LoRA and its fresh head need a larger
#: step than the LLM's LoRA (measured on minilm, rotten-tomatoes, 3 IID clients × 200 rows, 20 steps of
#: batch 8 per round, 2 seeds: 2e-4 stays at the majority class for 3 rounds, 3e-3 beats 1e-3; docs/models.md).
DEFAULT_LR = {"qa": 2e-4, "classify": 3e-3}


def builtin_labels() -> dict[str, tuple[str, ...]]:
    """The label sets of the NLU built-ins, in class-index order (no package is read: they are constants)."""
    from uniflow_cli.data.nlu import RT_LABELS, SNLI_LABELS

    return {"snli": tuple(SNLI_LABELS), "rotten-tomatoes": tuple(dict.fromkeys(RT_LABELS.values()))}


def parse_labels(text: str | None) -> list[str]:
    """``"a,b,c"`` → ``["a", "b", "c"]``; a built-in's name (``snli``) → its labels; None/empty → []."""
    if text is None or not text.strip():
        return []
    known = builtin_labels()
    if text.strip() in known:
        return list(known[text.strip()])
    return [item.strip() for item in text.split(",") if item.strip()]


def labels_hint() -> str:
    """How to give labels, for messages: the built-ins' names and an example list."""
    return f"--labels a,b,c (the class names) or a built-in's name ({', '.join(builtin_labels())})"


def recorded_task(meta: Any) -> tuple[str, list[str]] | None:
    """(task, labels) an adapter's ``extra.settings`` records; None when it records none (or not readably:
    another party's JSON — the base fingerprint still guards the model)."""
    from uniflow_cli.global_info import GlobalInfo

    info = GlobalInfo.of(meta)
    if info.settings is None:
        return None
    model = info.settings["model"]
    task, labels = model.get("task", "qa"), model.get("labels", [])
    if not isinstance(task, str) or not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        return None
    return task, list(labels)


def check_global_task(meta: Any, settings: Any, where: str) -> None:
    """``where`` (an adapter) was made for this model's task and, for ``classify``, its labels."""
    recorded = recorded_task(meta)
    if recorded is None:
        return
    task, labels = recorded
    if task != settings.task:
        made = f"a {task} model" + (f" (labels {', '.join(labels)})" if labels else "")
        raise IncompatibleAdaptersError(
            f"{where} was made for {made}, but the configured model is a {settings.task} model",
            fix=f"use an adapter of a {settings.task} workspace, or the [model] settings (task = {task!r}) of the run that made it",
        )
    if task == "classify" and labels != list(settings.labels):
        raise IncompatibleAdaptersError(
            f"{where} was made for labels {', '.join(labels)}, the configured model has labels {', '.join(settings.labels)}",
            fix="use the labels the workspace was initialised with (its round-0 global records them), in the same order",
        )


def check_data_labels(ids: Sequence[Any], modalities: Sequence[Any], answers: Sequence[Any], labels: Sequence[str], where: str) -> None:
    """Every row is text and its answer (stripped) is one of ``labels``; else one line naming the first bad row."""
    known = set(labels)
    for sid, modality, answer in zip(ids, modalities, answers):
        if modality != "text":
            raise DataError(f"{where}: sample {sid!r} is {modality}, but a classify model reads text only",
                            fix="partition text datasets (a question, optionally a text_pair, and the class as answer)")
        label = "" if answer is None else str(answer).strip()
        if label not in known:
            raise DataError(
                f"{where}: sample {sid!r} has label {label!r}, which is not one of the model's labels ({', '.join(labels)})",
                fix=f"partition data whose labels are among {', '.join(labels)}, or initialise a new workspace whose --labels include {label!r}",
            )


def check_dataset_labels(dataset: Any, settings: Any, where: str) -> None:
    """:func:`check_data_labels` on a split (a ``datasets.Dataset`` or a list of row dicts) for a classify model."""
    if not settings.is_classify:
        return
    if hasattr(dataset, "column_names"):
        ids, modalities, answers = dataset["id"], dataset["modality"], dataset["answer"]
    else:
        rows = list(dataset)
        ids, modalities, answers = ([r.get(k) for r in rows] for k in ("id", "modality", "answer"))
    check_data_labels(ids, modalities, answers, settings.labels, where)


def check_train_settings(settings: Any, cfg: Any) -> None:
    """A classifier has no encoder/LLM split to stage (Eq. 7) and no LLM to quantise."""
    if not settings.is_classify:
        return
    if cfg.stages != "joint":
        raise ConfigError.invalid("stages", cfg.stages, "does not apply to a classify model: it trains its LoRA and head together, in one stage",
                                  example="joint")
    if cfg.quantize is not None:
        raise ConfigError.invalid("quantize", cfg.quantize, "applies to a qa model's LLM; a classify model is not quantised",
                                  fix="leave it unset")
