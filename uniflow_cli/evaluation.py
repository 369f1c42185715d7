"""Evaluation: teacher-forced token accuracy and greedy generation scored with the standard libraries.

Two layers, as everywhere in uniflow:

* :func:`evaluate_model` — the in-memory core: a built model and samples per modality in, the
  :func:`uniflow_cli.metrics.summarize` dict and the per-sample records out. No paths, no printing.
* :func:`run_evaluate` — the I/O around it for ``uniflow evaluate``: resolves what to evaluate (a
  workspace round, the untrained base, or an explicit adapter + data), validates every input *before*
  the expensive model build, assembles the model the adapter describes (FedEx residuals and FLoRA
  merges of earlier rounds folded into the base weights) and writes the eval JSON atomically.

Determinism: the model runs in eval mode (no dropout), generation is greedy (no sampling) and the RNG
is seeded inside a forked RNG state, so the same inputs give the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uniflow_cli.errors import (
    AdapterError,
    DataError,
    IncompatibleAdaptersError,
    OutputExistsError,
    UsageError,
    WorkspaceError,
)

#: How many predictions per modality the eval JSON keeps (the metrics cover every sample).
SAMPLES_IN_JSON = 10
#: Modalities that need an encoder (text needs none).
ENCODER_MODALITIES = ("image", "audio")
#: Every modality a sample can have.
ALL_MODALITIES = ("image", "audio", "text")

OnBatch = Callable[[int, int, str], None]  # (samples done, samples total, phase/modality)


# --------------------------------------------------------------------------------------------------
# The in-memory core
# --------------------------------------------------------------------------------------------------
def _rows(samples: Any, limit: int | None) -> list[dict[str, Any]]:
    # datasets.Dataset and plain lists both support len() and integer indexing; rows become dicts.
    n = len(samples) if limit is None else min(limit, len(samples))
    return [dict(samples[i]) for i in range(n)]


def _check_generation_options(max_new_tokens: int, batch_size: int, limit: int | None) -> None:
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {max_new_tokens} must be >= 1", fix="use --max-new-tokens 16")
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size} must be >= 1", fix="use --batch-size 8")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit {limit} must be >= 1", fix="omit --limit to use every sample")


def evaluate_model(
    model: Any,
    datasets_by_modality: Mapping[str, Any],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 8,
    limit: int | None = None,
    bertscore_model: str | Path | None = None,
    bertscore_layers: int | None = None,
    on_batch: OnBatch | None = None,
    seed: int = 0,
) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Score ``model`` on the samples of each modality.

    For every batch: (1) teacher-forced token accuracy from ``model(collate(batch, train=True))``
    (:func:`uniflow_cli.metrics.token_accuracy`, counted per sample and pooled later), (2) greedy
    generation of up to ``max_new_tokens`` tokens for EM, BLEU, ROUGE-L; after all batches one
    BERTScore pass. ``limit`` keeps the first N samples of each modality (deterministic).

    Returns ``(metrics, samples)``: ``metrics`` is :func:`uniflow_cli.metrics.summarize`'s dict
    (percentages per modality and ``overall``, whose ``modalities`` lists what it pools), ``samples``
    maps each modality to its per-sample records (``id``, ``question``, ``prediction``, ``reference``,
    ``correct``, ``total``, ``truncated``, ``bert_*``). Every sequence is cut to the model's default
    ``max_length`` while it is tokenised (a huge question or answer costs no more than a long one).
    """
    import torch

    from uniflow_cli.metrics import OVERALL, attach_bertscore, resolve_bertscore_model, summarize, token_accuracy
    from uniflow_cli.models import collate, unwrap

    _check_generation_options(max_new_tokens, batch_size, limit)
    resolve_bertscore_model(bertscore_model, bertscore_layers)  # a bad backbone fails before generation

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

    total = sum(len(rows) for rows in groups.values())
    done = 0
    records: list[dict[str, Any]] = []
    model.eval()  # dropout off: evaluation must not depend on the RNG
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for modality, rows in groups.items():
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                with torch.inference_mode():
                    batch = collate(chunk, model, train=True)
                    logits = model(batch).logits
                    labels = batch["labels"]
                    counts = [token_accuracy(logits[i : i + 1], labels[i : i + 1]) for i in range(len(chunk))]
                    prompts = collate(chunk, model, train=False)
                    predictions = model.generate(prompts, max_new_tokens=max_new_tokens)
                cut = [a or b for a, b in zip(batch["truncated"], prompts["truncated"])]
                for row, (correct, n_tokens), prediction, was_cut in zip(chunk, counts, predictions, cut):
                    records.append(
                        {
                            "modality": modality,
                            "id": str(row.get("id", "")),
                            "question": str(row.get("question", "")),
                            "prediction": prediction,
                            "reference": str(row.get("answer", "")).strip(),
                            "correct": correct,
                            "total": n_tokens,
                            "truncated": was_cut,
                        }
                    )
                done += len(chunk)
                if on_batch is not None:
                    on_batch(done, total, modality)
    if on_batch is not None:
        on_batch(done, total, "BERTScore")
    records = attach_bertscore(records, model_path=bertscore_model, num_layers=bertscore_layers)
    metrics = summarize(records)
    metrics[OVERALL]["modalities"] = list(groups)  # "overall" always says what it pools
    by_modality: dict[str, list[dict[str, Any]]] = {m: [] for m in groups}
    for rec in records:
        by_modality[rec["modality"]].append(rec)
    return metrics, by_modality


# --------------------------------------------------------------------------------------------------
# Folding earlier rounds into the base weights (FedEx residuals, FLoRA merges)
# --------------------------------------------------------------------------------------------------
def _merges_into_base(loaded: Any) -> bool:
    extra = loaded.meta.extra if loaded.meta is not None else {}
    aggregation = extra.get("aggregation") if isinstance(extra, dict) else None
    return bool(isinstance(aggregation, dict) and aggregation.get("merge_into_base"))


# --------------------------------------------------------------------------------------------------
# The I/O layer: uniflow evaluate
# --------------------------------------------------------------------------------------------------
@dataclass
class EvalResult:
    payload: dict[str, Any]
    path: Path
    round: int
    notices: list[str] = field(default_factory=list)


def _settings_for(workspace: Any, preset: str | None, modalities: Sequence[str]) -> tuple[Any, Any]:
    """(ModelSettings, LoraSettings): the workspace's uniflow.toml, or a preset with the given encoders."""
    from uniflow_cli.models.settings import ModelSettings
    from uniflow_cli.models.workspace_init import settings_from_config
    from uniflow_cli.workspace import LoraSettings

    if preset is not None:
        return ModelSettings(preset=preset, modalities=list(modalities)), LoraSettings()
    return settings_from_config(workspace.config())


def _adapter_modalities(loaded: Any) -> list[str]:
    # The projectors an adapter carries are exactly the encoders of the model it was made for.
    saved = loaded.peft_config.get("modules_to_save") or []
    return [m for m in ENCODER_MODALITIES if f"projectors.{m}" in saved]


def _check_fingerprint(loaded: Any, fingerprint: str) -> None:
    theirs = loaded.meta.base_fingerprint if loaded.meta is not None else None
    if theirs is not None and theirs != fingerprint:
        raise IncompatibleAdaptersError(
            f"adapter {loaded.path} was made for base {theirs}, the configured model is {fingerprint}",
            fix="use the [model] settings (workspace or --preset) of the run that produced the adapter",
        )


def check_modalities(modalities: Sequence[str] | None) -> list[str] | None:
    """``--modalities`` as a sorted list of known names (None: every test split)."""
    if modalities is None:
        return None
    names = sorted({str(m).strip() for m in modalities if str(m).strip()})
    if not names:
        raise UsageError("--modalities is empty", fix=f"name one or more of {', '.join(ALL_MODALITIES)}, comma-separated")
    unknown = [m for m in names if m not in ALL_MODALITIES]
    if unknown:
        raise UsageError(f"--modalities names unknown modality {unknown[0]!r}", fix=f"use {', '.join(ALL_MODALITIES)}")
    return names


def _partition_modalities(ws: Any) -> list[str]:
    """The modalities ``data/partition.json`` says the partition has (its ``modalities`` table, else its
    clients' ``modalities``); [] without a partition.json (hand-made test splits: nothing is expected)."""
    import json

    from uniflow_cli.paths import read_regular

    path = ws.partition_json
    if not path.exists() and not path.is_symlink():
        return []
    fix = "re-run 'uniflow partition --force' (it writes data/partition.json)"
    try:
        info = json.loads(read_regular(path))
    except (OSError, ValueError) as exc:
        raise WorkspaceError(f"{path} is unreadable ({exc})", fix=fix) from None
    if not isinstance(info, dict):
        raise WorkspaceError(f"{path} is not a JSON object", fix=fix)
    table, clients = info.get("modalities"), info.get("clients", [])
    if table is not None:
        if not isinstance(table, dict):
            raise WorkspaceError(f"{path}: 'modalities' is not an object", fix=fix)
        names = list(table)
    elif isinstance(clients, list):
        names = []
        for client in clients:
            listed = client.get("modalities", []) if isinstance(client, dict) else []
            if not isinstance(listed, list):
                raise WorkspaceError(f"{path}: a client's 'modalities' is {listed!r}, not a list", fix=fix)
            names += listed
    else:
        raise WorkspaceError(f"{path}: 'clients' is not a list", fix=fix)
    unknown = [m for m in names if m not in ALL_MODALITIES]
    if unknown:
        raise WorkspaceError(f"{path} names modality {unknown[0]!r}, not one of {', '.join(ALL_MODALITIES)}", fix=fix)
    return sorted(set(names))


def _load_test_splits(ws: Any, model_modalities: Sequence[str], only: Sequence[str] | None = None) -> dict[str, Any]:
    """``data/test/<m>`` of every modality ``only`` names, else of every split present. Without ``only``, a
    split that data/partition.json lists and the model can evaluate (text, or one of its encoders) must be
    there: an "overall" silently pooled over fewer modalities would be compared with complete ones."""
    from uniflow_cli.data import load_split

    test_root = ws.data_dir / "test"
    present = sorted(p.name for p in test_root.iterdir() if p.is_dir() and not p.name.startswith(".")) if test_root.is_dir() else []
    if only is not None:
        absent = [m for m in only if m not in present]
        if absent:
            raise DataError(
                f"--modalities {','.join(only)}: there is no {absent[0]} test split {test_root / absent[0]}",
                fix=f"evaluate the splits present ({', '.join(present) or 'none'}), or re-run 'uniflow partition'",
            )
        names = list(only)
    else:
        if not present:
            raise DataError(f"no test split in {test_root}", fix="run 'uniflow partition' (it writes data/test/<modality>)")
        evaluable = {"text", *model_modalities}
        missing = [m for m in _partition_modalities(ws) if m in evaluable and m not in present]
        if missing:
            raise DataError(
                f"the {missing[0]} test split {test_root / missing[0]} is missing (data/partition.json lists {missing[0]} "
                f"and the model evaluates it; present: {', '.join(present)})",
                fix=f"restore it (re-run 'uniflow partition'), or evaluate the others on purpose with --modalities {','.join(present)}",
            )
        names = present
    return {name: load_split(ws.test_data(name)) for name in names}


def _workspace_model_modalities(ws: Any) -> list[str]:
    return list(_settings_for(ws, None, ())[0].modalities)


def check_workspace_evaluation(workspace: Path, rounds: Sequence[int], modalities: Sequence[str] | None = None) -> None:
    """What evaluating ``rounds`` of a workspace later needs, checked now (before hours of training):
    the test splits (every one the partition lists, or ``modalities``), and no earlier eval JSON for
    those rounds that would have to be overwritten."""
    from uniflow_cli.workspace import find_workspace

    ws = find_workspace(workspace)
    _load_test_splits(ws, _workspace_model_modalities(ws), check_modalities(modalities))
    existing = [str(ws.eval_json(t)) for t in sorted(rounds) if ws.eval_json(t).exists()]
    if existing:
        raise OutputExistsError(f"evaluation output {', '.join(existing)} already exists", fix="move it away or evaluate other rounds")


def _personalised(ws: Any, global_: Any, t: int, client: str) -> Any:
    """FedSA: round ``t``'s global (A + shared tensors) with ``client``'s private B of the same round."""
    from uniflow_cli.adapters import LoadedAdapter, lora_modules, read_adapter

    method = global_.meta.method if global_.meta is not None else None
    if method != "fedsa":
        raise UsageError(
            f"--client {client}: round {t} is a {method or 'untrained'} global; only fedsa keeps a client-private part (B), "
            "for every other method the global is each client's model",
            fix="drop --client",
        )
    state = ws.client_state(client)
    if not (state / "uniflow.json").is_file():
        raise WorkspaceError(
            f"client {client} has no private state in {state}",
            fix="pick a client that trained with fedsa in this workspace (with Flower: evaluate on the node that holds it)",
        )
    private = read_adapter(state)
    r = private.meta.round if private.meta is not None else None
    if r != t:
        raise WorkspaceError(
            f"client {client}'s private B in {state} is from round {r}, not round {t} (it is overwritten every round)",
            fix=f"evaluate --round {r} --client {client} (once rounds/{r}/global is published)" if r is not None else "re-train that client",
        )
    theirs, ours = (private.meta.base_fingerprint if private.meta else None), global_.meta.base_fingerprint
    if theirs is not None and ours is not None and theirs != ours:
        raise IncompatibleAdaptersError(
            f"client {client}'s private B in {state} was trained on base {theirs}, round {t}'s global on {ours}",
            fix="both must come from the same federation; re-train the client",
        )
    shared_modules, _ = lora_modules(global_.tensors.keys())
    own_B = {k: v for k, v in private.tensors.items() if k.endswith(".lora_B.weight")}
    private_modules, _ = lora_modules(own_B.keys())
    if set(private_modules) != set(shared_modules):
        missing = sorted(set(shared_modules) ^ set(private_modules))
        raise AdapterError(
            f"client {client}'s private B in {state} and round {t}'s global cover different LoRA modules (e.g. {missing[0]})",
            fix="both must come from the same federation; re-train the client",
        )
    for module, (a_key, _b) in shared_modules.items():
        b_key = private_modules[module][1]
        if a_key is not None and own_B[b_key].shape[1] != global_.tensors[a_key].shape[0]:
            raise AdapterError(
                f"{module}: client {client}'s B has rank {own_B[b_key].shape[1]}, the global A rank {global_.tensors[a_key].shape[0]}",
                fix="both must come from the same federation; re-train the client",
            )
    return LoadedAdapter(path=global_.path, peft_config=global_.peft_config, tensors={**global_.tensors, **own_B},
                         meta=global_.meta, residual=global_.residual)


def _group_by_modality(splits: Sequence[tuple[Path, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Explicit --data dirs may mix modalities (a client shard): group their rows by the modality column."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for _path, ds in splits:
        for i in range(len(ds)):
            row = dict(ds[i])
            groups.setdefault(str(row.get("modality")), []).append(row)
    return groups


def _check_encoders(modalities: Sequence[str], available: Sequence[str], source: str) -> None:
    for modality in modalities:
        if modality in ENCODER_MODALITIES and modality not in available:
            raise DataError(
                f"{source} has {modality} samples but the model has no {modality} encoder (encoders: {', '.join(available) or 'none'})",
                fix=f"add {modality!r} to modalities in [model] of uniflow.toml (or use a matching adapter), or drop that split",
            )


def run_evaluate(
    *,
    workspace: Path | None = None,
    round: int | None = None,
    base: bool = False,
    adapter: Path | None = None,
    data: Sequence[Path] = (),
    preset: str | None = None,
    out: Path | None = None,
    force: bool = False,
    max_new_tokens: int = 16,
    batch_size: int = 8,
    limit: int | None = None,
    bertscore_model: Path | None = None,
    bertscore_layers: int | None = None,
    client: str | None = None,
    modalities: Sequence[str] | None = None,
    on_batch: OnBatch | None = None,
    on_status: Callable[[str], None] | None = None,
) -> EvalResult:
    """The whole ``uniflow evaluate``; returns the written payload. Every check runs before the model build.

    Workspace mode (no ``adapter``/``data``): evaluate ``rounds/<T>/global`` (default: the latest
    published round; ``round=0`` or ``base`` = the untrained model) on every ``data/test/<modality>``
    and write ``eval/round-<T>.json`` (or ``out``). Explicit mode (``data`` given): evaluate ``adapter``
    (or, with ``base``, the untrained model) on the given split directories with model settings from
    the workspace's uniflow.toml or ``preset``; writes ``out`` (required). ``client`` (workspace mode, FedSA):
    the personalised model of that client — round T's global A and shared tensors with the client's private
    B from ``state/clients/<k>`` (it must be the B of round T) — written to ``eval/clients/<k>/round-<T>.json``.
    ``modalities`` narrows the run to those test splits (workspace mode) or those rows (explicit mode); without
    it, a test split that data/partition.json lists (for a modality the model evaluates) must be present.
    """
    from uniflow_cli.adapters import read_adapter
    from uniflow_cli.atomic import check_writable_target
    from uniflow_cli.data import load_split
    from uniflow_cli.evaluation_io import build_eval_payload, write_eval_json
    from uniflow_cli.metrics import DEFAULT_BERTSCORE_MODEL, resolve_bertscore_model
    from uniflow_cli.models import base_fingerprint
    from uniflow_cli.workspace import find_workspace

    status = on_status or (lambda _msg: None)
    notices: list[str] = []
    _check_generation_options(max_new_tokens, batch_size, limit)
    only = check_modalities(modalities)
    if base and round not in (None, 0):
        raise UsageError(f"--base is round 0, but --round {round} was given", fix="pass either --base or --round T")
    if adapter is not None and (base or round is not None):
        raise UsageError("--adapter cannot be combined with --base or --round", fix="pass --adapter DIR --data DIR, or --round T")
    explicit = adapter is not None or bool(data)
    if preset is not None and not explicit:
        raise UsageError("--preset only applies with --adapter/--data (a workspace uses its uniflow.toml)", fix="drop --preset, or pass --data DIR")
    if explicit and not data:
        raise UsageError("--adapter needs --data DIR (the split to evaluate on)", fix="add --data data/test/<modality>")
    if explicit and adapter is None and not base:
        raise UsageError("--data needs --adapter DIR or --base", fix="pass --adapter DIR (or --base for the untrained model)")
    if explicit and round is not None:
        raise UsageError("--round selects a workspace round and cannot be combined with --data", fix="use --adapter rounds/<T>/global --data DIR")
    if explicit and out is None:
        raise UsageError("explicit mode (--data) needs --out FILE for the eval JSON", fix="add --out eval.json")
    if client is not None and (explicit or base):
        raise UsageError(
            f"--client {client} evaluates a client's personalised model of a workspace round; it cannot be combined with "
            f"{'--base' if base else '--adapter/--data'}",
            fix="pass --round T --client K inside the workspace",
        )
    bs_dir, bs_layers = resolve_bertscore_model(bertscore_model, bertscore_layers)
    bs_name = DEFAULT_BERTSCORE_MODEL if bertscore_model is None else str(bs_dir)

    ws = None
    if not explicit or preset is None:
        ws = find_workspace(workspace, required=not explicit)
        if ws is None:
            raise UsageError("no model settings: no workspace found and no --preset given", fix="pass --workspace DIR (its uniflow.toml) or --preset tiny-random|smol")

    # ---- what to evaluate: the chain of adapters (rounds 1..T feed the base; round T is loaded) ----
    chain: list[Any] = []  # earlier rounds, oldest first (only their residuals / FLoRA merges are used)
    final = None  # the adapter whose LoRA tensors are loaded; None = the untrained model
    if explicit:
        t = 0 if base else None
        if adapter is not None:
            final = read_adapter(Path(adapter))
            t = final.meta.round if final.meta is not None and final.meta.round is not None else None
        # Explicit data: every --data dir must load, and together they must hold samples.
        loaded_splits = [(Path(d), load_split(d)) for d in data]
        samples_by_modality: dict[str, Any] = _group_by_modality(loaded_splits)
        if only is not None:
            absent = [m for m in only if m not in samples_by_modality]
            if absent:
                raise DataError(
                    f"--modalities {','.join(only)}: the --data dirs hold no {absent[0]} samples (they hold {', '.join(sorted(samples_by_modality)) or 'none'})",
                    fix="name only modalities the --data dirs hold",
                )
            samples_by_modality = {m: samples_by_modality[m] for m in only}
        out_path = Path(out)  # type: ignore[arg-type]
        source = ", ".join(str(d) for d in data)
    else:
        assert ws is not None
        published = ws.published_rounds()
        if not published:
            raise WorkspaceError(f"no global adapter is published in {ws.root / 'rounds'}", fix="run 'uniflow init' to create round 0")
        t = 0 if base else (published[-1] if round is None else round)
        if t not in published:
            raise WorkspaceError(
                f"round {t} is not published in {ws.root / 'rounds'} (published: {', '.join(map(str, published))})",
                fix=f"pick a published round, e.g. --round {published[-1]}",
            )
        final = read_adapter(ws.global_dir(t))
        chain = [read_adapter(ws.global_dir(s)) for s in range(1, t) if s in published]
        if t > 0 and len(chain) != t - 1:
            missing = [s for s in range(1, t) if s not in published]
            raise WorkspaceError(
                f"round {t} needs the globals of rounds 1..{t - 1} (their residuals/merges), but round(s) {missing} are missing",
                fix="restore the missing rounds/<t>/global directories",
            )
        if client is not None:
            final = _personalised(ws, final, t, str(client))
        samples_by_modality = _load_test_splits(ws, _workspace_model_modalities(ws), only)
        out_path = Path(out) if out is not None else (ws.client_eval_json(client, t) if client is not None else ws.eval_json(t))
        source = str(ws.data_dir / "test")
    check_writable_target(out_path, force=force)  # before the expensive work

    # ---- model settings; the fingerprint check comes before building anything ----
    if preset is not None:
        wanted = _adapter_modalities(final) if final is not None else [m for m in ENCODER_MODALITIES if m in samples_by_modality]
        model_settings, lora_settings = _settings_for(None, preset, wanted)
    else:
        model_settings, lora_settings = _settings_for(ws, None, ())
    _check_encoders(sorted(samples_by_modality), list(model_settings.modalities), source)
    for modality, rows in samples_by_modality.items():
        if len(rows) == 0:
            raise DataError(f"the {modality} test set in {source} is empty (0 samples)", fix="re-run 'uniflow partition' with a test split")
    status("fingerprinting the base model")
    fingerprint = base_fingerprint(model_settings)
    for loaded in [*chain, *([final] if final is not None else [])]:
        _check_fingerprint(loaded, fingerprint)

    method = final.meta.method if final is not None and final.meta is not None else None
    if explicit and final is not None and (final.residual or _merges_into_base(final)) and (t or 0) > 1:
        notices.append(
            f"{method} adapter of round {t} given explicitly: earlier rounds' residuals/merges are unknown and not applied; "
            "evaluate inside the workspace (--round) for the exact model"
        )
    if method == "fedsa" and client is not None:
        notices.append(f"client {client}'s personalised model: round {t}'s global A and shared tensors + its private B ({ws.client_state(client)})")  # type: ignore[union-attr]
    elif method == "fedsa":
        notices.append(
            f"round {t} is a fedsa global: it carries A and the shared tensors but no B (each client keeps its own B), "
            "so it is evaluated with B = 0, i.e. the base behaviour in the LoRA layers"
        )

    # ---- build the model ----
    status("building the model")
    from uniflow_cli.models import load_model, model_from_adapter
    from uniflow_cli.models.lora import add_to_base, lora_deltas, unwrap

    if final is None:
        model = load_model(model_settings, lora_settings, 0, progress=status)
    else:
        model = model_from_adapter(model_settings, final, lora_settings, progress=status)
    folded_residuals = folded_merges = 0
    for loaded in [*chain, *([final] if final is not None else [])]:
        where = str(loaded.path)
        if loaded.residual:
            folded_residuals += add_to_base(model, loaded.residual, where=where)
        if loaded is not final and _merges_into_base(loaded):
            # FLoRA: clients merged this round's stacked adapter into W_0 before the next round.
            folded_merges += add_to_base(model, lora_deltas(loaded.peft_config, loaded.tensors), where=where)
    if folded_residuals:
        notices.append(f"added {folded_residuals} FedEx residual tensor(s) of rounds 1..{t} to the base weights")
    if folded_merges:
        notices.append(f"merged {folded_merges} FLoRA layer update(s) of earlier rounds into the base weights")

    metrics, records = evaluate_model(
        model,
        samples_by_modality,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        limit=limit,
        bertscore_model=bertscore_model,
        bertscore_layers=bertscore_layers,
        on_batch=on_batch,
    )
    cut = sum(1 for recs in records.values() for rec in recs if rec["truncated"])
    if cut:
        notices.append(f"{cut} test sample(s) were longer than {unwrap(model).max_length} tokens and were cut to fit")
    keep = ("id", "question", "prediction", "reference")
    samples = {m: [{k: rec[k] for k in keep} for rec in recs[:SAMPLES_IN_JSON]] for m, recs in records.items()}
    payload = build_eval_payload(
        round=t if t is not None else 0,
        adapter={
            "path": str(final.path) if final is not None else None,
            "method": method,
            "base_fingerprint": fingerprint,
            **({"client": str(client), "private_state": str(ws.client_state(client))} if client is not None else {}),  # type: ignore[union-attr]
        },
        config={
            "max_new_tokens": max_new_tokens,
            "limit": limit,
            "batch_size": batch_size,
            "bertscore": {"model": bs_name, "num_layers": bs_layers},
            "data": source,
            "max_length": unwrap(model).max_length,
        },
        metrics=metrics,
        samples=samples,
    )
    if explicit and t is None:
        notices.append("the adapter records no round; the eval JSON says round 0")
    write_eval_json(out_path, payload, force=force)
    return EvalResult(payload=payload, path=out_path, round=payload["round"], notices=notices)


__all__ = ["EvalResult", "evaluate_model", "run_evaluate"]
