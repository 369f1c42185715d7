"""What ``uniflow evaluate`` evaluates, resolved and checked before any model is built.

An :class:`EvalRequest` is what a front end was asked (a workspace round, the untrained base, or an explicit
adapter + data); :func:`resolve_target` turns it into an :class:`EvalTarget`: the adapter whose LoRA tensors
are loaded, the earlier rounds whose residuals/merges feed the base, the method's spec, the model settings,
the test samples per modality and where the eval JSON goes. Every input is read and checked here, so a
mistake costs seconds, not a model build.

Messages name the request's fields (``round``, ``data``, ...) through :func:`uniflow_cli.errors.worded`, so
each front end can word them its own way: the CLI boundary re-words them with its flags, a library caller
reads the field names. No torch at import.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uniflow_cli.errors import worded
from uniflow_cli.errors import AdapterError, ConfigError, DataError, IncompatibleAdaptersError, OutputExistsError, UsageError, WorkspaceError

#: Modalities that need an encoder (text needs none).
ENCODER_MODALITIES = ("image", "audio")
#: Every modality a sample can have.
ALL_MODALITIES = ("image", "audio", "text")


@dataclass(frozen=True)
class EvalRequest:
    """What to evaluate. Workspace mode (no ``adapter``/``data``): ``rounds/<round>/global`` (default: the
    latest published round; ``round=0`` or ``base``: the untrained model) on every ``data/test/<modality>``.
    Explicit mode (``data`` given): ``adapter`` (or, with ``base``, the untrained model) on those split
    directories, with model settings from ``preset``, else the adapter's recorded settings, else the
    ``workspace`` given here (never one found from the cwd); writes ``out`` (required). ``client`` (FedSA, FedDPA):
    that client's personalised model of a workspace round. ``modalities`` narrows the run."""

    workspace: Any = None  # Path | Workspace | None; None in workspace mode: $UNIFLOW_WORKSPACE, then the cwd's
    round: int | None = None
    base: bool = False
    adapter: Path | None = None
    data: Sequence[Path] = ()
    preset: str | None = None
    out: Path | None = None
    force: bool = False
    client: str | None = None
    modalities: Sequence[str] | None = None

    @property
    def explicit(self) -> bool:
        return self.adapter is not None or bool(self.data)


@dataclass
class EvalTarget:
    """A checked request: everything the model build and the evaluation need, nothing read twice."""

    explicit: bool
    workspace: Any  # Workspace | None
    round: int | None  # None: an explicit adapter that records no round
    final: Any  # the LoadedAdapter whose LoRA tensors are loaded; None = the untrained model
    chain: list[tuple[int, Any]]  # (round, LoadedAdapter) of rounds 1..T-1 (their residuals / merges feed the base)
    spec: Any  # the final adapter's MethodSpec, None when it records no method
    model: Any  # ModelSettings
    lora: Any  # LoraSettings
    samples: dict[str, Any]  # modality → rows
    out: Path
    source: str  # where the samples came from, for messages and the eval JSON
    client: str | None = None
    force: bool = False  # the eval JSON may replace an earlier one
    notices: list[str] = field(default_factory=list)
    local: Any = None  # FedDPA: the client's local adapter (a LoadedAdapter), active beside ``final``

    @property
    def method(self) -> str | None:
        return self.final.meta.method if self.final is not None and self.final.meta is not None else None

    @property
    def adapters(self) -> list[Any]:
        """Every adapter read: the earlier rounds, then the final one."""
        return [a for _, a in self.chain] + ([self.final] if self.final is not None else [])


# --------------------------------------------------------------------------------------------------
# The request's own consistency
# --------------------------------------------------------------------------------------------------
def check_request(r: EvalRequest) -> None:
    """The combinations that make no request, in the request's terms (mode conflicts, missing parts)."""
    if r.base and r.round not in (None, 0):
        raise worded(UsageError, "{base} is round 0, but {round} {t} was given", "give either {base} or {round} T", t=r.round)
    if r.adapter is not None and (r.base or r.round is not None):
        raise worded(UsageError, "{adapter} cannot be combined with {base} or {round}", "give {adapter} DIR with {data} DIR, or {round} T")
    if r.preset is not None and not r.explicit:
        raise worded(UsageError, "{preset} only applies with {adapter}/{data} (a workspace uses its uniflow.toml)",
                            "drop {preset}, or give {data} DIR")
    if r.explicit and not r.data:
        raise worded(UsageError, "{adapter} needs {data} DIR (the split to evaluate on)", "add {data} data/test/<modality>")
    if r.explicit and r.adapter is None and not r.base:
        raise worded(UsageError, "{data} needs {adapter} DIR or {base}", "give {adapter} DIR (or {base} for the untrained model)")
    if r.explicit and r.round is not None:
        raise worded(UsageError, "{round} selects a workspace round and cannot be combined with {data}",
                            "use {adapter} rounds/<T>/global {data} DIR")
    if r.explicit and r.out is None:
        raise worded(UsageError, "explicit mode ({data}) needs {out} FILE for the eval JSON", "add {out} eval.json")
    if r.client is not None and (r.explicit or r.base):
        fix = "give {round} T {client} K inside the workspace"
        template = "{client} {k} evaluates a client's personalised model of a workspace round; it cannot be combined with "
        raise worded(UsageError, template + ("{base}" if r.base else "{adapter}/{data}"), fix, k=r.client)


def check_modalities(modalities: Sequence[str] | None) -> list[str] | None:
    """The requested modalities as a sorted list of known names (None: every test split)."""
    if modalities is None:
        return None
    names = sorted({str(m).strip() for m in modalities if str(m).strip()})
    if not names:
        raise worded(UsageError, "{modalities} is empty", "name one or more of {known}, comma-separated", known=", ".join(ALL_MODALITIES))
    unknown = [m for m in names if m not in ALL_MODALITIES]
    if unknown:
        raise worded(UsageError, "{modalities} names unknown modality {name!r}", "use {known}", name=unknown[0], known=", ".join(ALL_MODALITIES))
    return names


# --------------------------------------------------------------------------------------------------
# Resolving: the request → the target
# --------------------------------------------------------------------------------------------------
def resolve_target(request: EvalRequest) -> EvalTarget:
    """Read and check everything ``request`` names; the output is refused here if it exists (before any work)."""
    from uniflow_cli.atomic import check_writable_target

    check_request(request)
    only = check_modalities(request.modalities)
    target = _explicit_target(request, only) if request.explicit else _workspace_target(request, only)
    target.force = request.force
    check_writable_target(target.out, force=target.force)  # before the expensive work
    _check_encoders(sorted(target.samples), list(target.model.modalities), target.source)
    for modality, rows in target.samples.items():
        if len(rows) == 0:
            raise DataError(f"the {modality} test set in {target.source} is empty (0 samples)", fix="re-run 'uniflow partition' with a test split")
    _check_task(target)
    target.notices.extend(_target_notices(target))
    return target


def _check_task(target: EvalTarget) -> None:
    """Every adapter was made for the configured task (and labels); a classify model's test rows carry its labels."""
    from uniflow_cli.models.task import check_dataset_labels, check_global_task

    for loaded in target.adapters:
        check_global_task(loaded.meta, target.model, str(loaded.path))
    for modality, rows in target.samples.items():
        check_dataset_labels(rows, target.model, f"the {modality} test set in {target.source}")


def _workspace(given: Any, *, required: bool) -> Any:
    from uniflow_cli.workspace import Workspace, find_workspace

    return given if isinstance(given, Workspace) else find_workspace(given, required=required)


def method_spec_of(adapter: Any) -> Any:
    """The MethodSpec of the method ``adapter`` records (None: it records none, e.g. round 0)."""
    from uniflow_cli.aggregation.registry import METHOD_NAMES, method_spec

    method = adapter.meta.method if adapter is not None and adapter.meta is not None else None
    if method is None:
        return None
    try:
        return method_spec(method)  # a method, or a per-module spec (aggregation/per_module.py)
    except ConfigError:  # another party's file: say which adapter, not which setting
        raise AdapterError(f"{adapter.path} records method {method[:200]!r}, not one of {', '.join(METHOD_NAMES)} (or a per-module spec of them)",
                           fix="evaluate an adapter uniflow published") from None


def _workspace_target(request: EvalRequest, only: list[str] | None) -> EvalTarget:
    from uniflow_cli.adapters import read_adapter
    from uniflow_cli.settings import LoraSettings, resolve, resolve_model

    ws = _workspace(request.workspace, required=True)
    published = ws.published_rounds()
    if not published:
        raise WorkspaceError(f"no global adapter is published in {ws.root / 'rounds'}", fix="run 'uniflow init' to create round 0")
    t = 0 if request.base else (published[-1] if request.round is None else request.round)
    if t not in published:
        raise worded(WorkspaceError, "round {t} is not published in {where} (published: {listed})",
                            "pick a published round, e.g. {round} {last}", t=t, where=ws.root / "rounds",
                            listed=", ".join(map(str, published)), last=published[-1])
    final = read_adapter(ws.global_dir(t))
    missing = [s for s in range(1, t) if s not in published]
    if missing:
        raise WorkspaceError(
            f"round {t} needs the globals of rounds 1..{t - 1} (their residuals/merges), but round(s) {missing} are missing",
            fix="restore the missing rounds/<t>/global directories",
        )
    chain = [(s, read_adapter(ws.global_dir(s))) for s in range(1, t)]
    spec = method_spec_of(final)
    client = None if request.client is None else str(request.client)
    local = None
    if client is not None:
        final, local = personalised(ws, final, spec, t, client)
    model, lora = resolve_model(ws), resolve(LoraSettings, ws)
    out = Path(request.out) if request.out is not None else (ws.client_eval_json(client, t) if client is not None else ws.eval_json(t))
    return EvalTarget(explicit=False, workspace=ws, round=t, final=final, chain=chain, spec=spec, model=model, lora=lora,
                      samples=_load_test_splits(ws, model.modalities, only), out=out, source=str(ws.data_dir / "test"), client=client,
                      local=local)


def _explicit_target(request: EvalRequest, only: list[str] | None) -> EvalTarget:
    """Explicit mode uses only what it is given: a workspace's settings only when the request names one."""
    from uniflow_cli.adapters import read_adapter
    from uniflow_cli.data import load_split
    from uniflow_cli.global_info import recorded_settings

    ws = _workspace(request.workspace, required=True) if request.workspace is not None else None
    final = read_adapter(Path(request.adapter)) if request.adapter is not None else None
    t = 0 if request.base else (final.meta.round if final is not None and final.meta is not None else None)
    recorded = recorded_settings(final.meta, str(final.path)) if final is not None and request.preset is None else None
    if request.preset is None and recorded is None and ws is None:
        what = f"the adapter {final.path} records none" if final is not None else "the untrained base has no adapter to record them"
        raise worded(UsageError, "no model settings: {what}, and neither {preset} nor {workspace} was given",
                            "give {preset} tiny-random|smol (or {workspace} DIR, the workspace the adapter came from)", what=what)
    samples = _group_by_modality([(Path(d), load_split(d)) for d in request.data])
    if only is not None:
        absent = [m for m in only if m not in samples]
        if absent:
            raise worded(DataError, "{modalities} {wanted}: the {data} dirs hold no {m} samples (they hold {held})",
                                "name only modalities the {data} dirs hold", wanted=",".join(only), m=absent[0],
                                held=", ".join(sorted(samples)) or "none")
        samples = {m: samples[m] for m in only}
    model, lora = _explicit_settings(request, ws, final, recorded, samples)
    return EvalTarget(explicit=True, workspace=ws, round=t, final=final, chain=[], spec=method_spec_of(final), model=model, lora=lora,
                      samples=samples, out=Path(request.out), source=", ".join(str(d) for d in request.data))  # type: ignore[arg-type]


def _explicit_settings(request: EvalRequest, ws: Any, final: Any, recorded: Any, samples: Mapping[str, Any]) -> tuple[Any, Any]:
    """(ModelSettings, LoraSettings): the preset (with the encoders the adapter or the data need), else what
    the adapter records, else the named workspace's uniflow.toml."""
    from uniflow_cli.settings import LoraSettings, resolve, resolve_model

    if request.preset is not None:
        from uniflow_cli.global_info import recorded_settings

        # A classify adapter's own settings carry its labels, which no preset knows: the preset may only confirm them.
        mine = recorded_settings(final.meta, str(final.path)) if final is not None else None
        if mine is not None and mine[0].is_classify and mine[0].preset == request.preset:
            return mine
        wanted = _adapter_modalities(final) if final is not None else [m for m in ENCODER_MODALITIES if m in samples]
        return resolve_model(None, {"preset": request.preset, "modalities": wanted}), resolve(LoraSettings, None)
    if recorded is not None:
        return recorded
    return resolve_model(ws), resolve(LoraSettings, ws)


def _target_notices(target: EvalTarget) -> list[str]:
    notices = []
    t, spec, final = target.round, target.spec, target.final
    if target.explicit and final is not None and (final.residual or (spec is not None and spec.folds_history)) and (t or 0) > 1:
        notices.append(
            f"{target.method} adapter of round {t} given explicitly: earlier rounds' residuals/merges are unknown and not applied; "
            "evaluate that round inside the workspace for the exact model"
        )
    if spec is not None and spec.local_adapter and target.client is not None:
        notices.append(f"client {target.client}'s personalised model: round {t}'s global adapter + its local adapter, both active "
                       f"({target.workspace.client_state(target.client)})")
    elif spec is not None and spec.private_B and target.client is not None:
        notices.append(f"client {target.client}'s personalised model: round {t}'s global A and shared tensors + its private B "
                       f"({target.workspace.client_state(target.client)})")
    elif spec is not None and spec.local_adapter:
        notices.append(f"round {t} is a {target.method} global: evaluated alone (the shared model); {'--client'} K adds that client's local adapter")
    elif spec is not None and spec.private_B:
        notices.append(
            f"round {t} is a {target.method} global: it carries A and the shared tensors but no B (each client keeps its own B), "
            "so it is evaluated with B = 0, i.e. the base behaviour in the LoRA layers"
        )
    return notices


# --------------------------------------------------------------------------------------------------
# The pieces: adapters, splits, encoders
# --------------------------------------------------------------------------------------------------
def _adapter_modalities(loaded: Any) -> list[str]:
    # The projectors an adapter carries are exactly the encoders of the model it was made for.
    saved = loaded.peft_config.get("modules_to_save") or []
    return [m for m in ENCODER_MODALITIES if f"projectors.{m}" in saved]


def check_fingerprint(loaded: Any, fingerprint: str) -> None:
    theirs = loaded.meta.base_fingerprint if loaded.meta is not None else None
    if theirs is not None and theirs != fingerprint:
        raise worded(IncompatibleAdaptersError, "adapter {path} was made for base {theirs}, the configured model is {ours}",
                            "use the [model] settings ({workspace} or {preset}) of the run that produced the adapter",
                            path=loaded.path, theirs=theirs, ours=fingerprint)


def _check_encoders(modalities: Sequence[str], available: Sequence[str], source: str) -> None:
    for modality in modalities:
        if modality in ENCODER_MODALITIES and modality not in available:
            raise DataError(
                f"{source} has {modality} samples but the model has no {modality} encoder (encoders: {', '.join(available) or 'none'})",
                fix=f"add {modality!r} to modalities in [model] of uniflow.toml (or use a matching adapter), or drop that split",
            )


def _group_by_modality(splits: Sequence[tuple[Path, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Explicit data dirs may mix modalities (a client shard): group their rows by the modality column."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for _path, ds in splits:
        for i in range(len(ds)):
            row = dict(ds[i])
            groups.setdefault(str(row.get("modality")), []).append(row)
    return groups


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
            raise worded(DataError, "{modalities} {wanted}: there is no {m} test split {path}",
                                "evaluate the splits present ({listed}), or re-run 'uniflow partition'",
                                wanted=",".join(only), m=absent[0], path=test_root / absent[0], listed=", ".join(present) or "none")
        names = list(only)
    else:
        if not present:
            raise DataError(f"no test split in {test_root}", fix="run 'uniflow partition' (it writes data/test/<modality>)")
        evaluable = {"text", *model_modalities}
        missing = [m for m in _partition_modalities(ws) if m in evaluable and m not in present]
        if missing:
            raise worded(
                DataError, "the {m} test split {path} is missing (data/partition.json lists {m} and the model evaluates it; present: {listed})",
                "restore it (re-run 'uniflow partition'), or evaluate the others on purpose with {modalities} {others}",
                m=missing[0], path=test_root / missing[0], listed=", ".join(present), others=",".join(present),
            )
        names = present
    return {name: load_split(ws.test_data(name)) for name in names}


def check_workspace_evaluation(workspace: Any, rounds: Sequence[int], modalities: Sequence[str] | None = None) -> None:
    """What evaluating ``rounds`` of a workspace later needs, checked now (before hours of training):
    the test splits (every one the partition lists, or ``modalities``), and no earlier eval JSON for
    those rounds that would have to be overwritten."""
    from uniflow_cli.settings import resolve_model

    ws = _workspace(workspace, required=True)
    _load_test_splits(ws, resolve_model(ws).modalities, check_modalities(modalities))
    existing = [str(ws.eval_json(t)) for t in sorted(rounds) if ws.eval_json(t).exists()]
    if existing:
        raise OutputExistsError(f"evaluation output {', '.join(existing)} already exists", fix="move it away or evaluate other rounds")


def personalised(ws: Any, global_: Any, spec: Any, t: int, client: str) -> tuple[Any, Any]:
    """``client``'s personalised model of round ``t``: (the adapter to load, FedDPA's local adapter or None).
    FedSA: round ``t``'s global (A + shared tensors) with the client's private B of round ``t``; FedDPA: the
    global unchanged, and the client's local adapter of round ``t`` beside it."""
    from uniflow_cli.adapters import LoadedAdapter, read_adapter
    from uniflow_cli.aggregation.registry import SPECS

    if spec is None or not spec.keeps_client_state:
        keepers = ", ".join(name for name, s in SPECS.items() if s.keeps_client_state)
        raise worded(UsageError, "{client} {k}: round {t} is a {m} global; only {keepers} keep a client-private part, "
                            "for every other method the global is each client's model", "drop {client}",
                            k=client, t=t, m=global_.meta.method if global_.meta is not None and global_.meta.method else "untrained", keepers=keepers)
    state = ws.client_state(client)
    if not (state / "uniflow.json").is_file():
        raise WorkspaceError(
            f"client {client} has no private state in {state}",
            fix=f"pick a client that trained with {spec.name} in this workspace (with Flower: evaluate on the node that holds it)",
        )
    private = read_adapter(state)
    r = private.meta.round if private.meta is not None else None
    if r != t:
        raise worded(WorkspaceError, "client {k}'s private state in {state} is from round {r}, not round {t} (it is overwritten every round)",
                            "evaluate {round} {r} {client} {k} (once rounds/{r}/global is published)" if r is not None else "re-train that client",
                            k=client, state=state, r=r, t=t)
    theirs, ours = (private.meta.base_fingerprint if private.meta else None), global_.meta.base_fingerprint
    if theirs is not None and ours is not None and theirs != ours:
        raise IncompatibleAdaptersError(
            f"client {client}'s private state in {state} was trained on base {theirs}, round {t}'s global on {ours}",
            fix="both must come from the same federation; re-train the client",
        )
    if spec.local_adapter:
        return global_, private  # its keys and shapes are checked when it loads (models.lora.load_local_tensors)
    own_B = _private_B(private, global_, client, state, t, spec)
    return LoadedAdapter(path=global_.path, peft_config=global_.peft_config, tensors={**global_.tensors, **own_B},
                         meta=global_.meta, residual=global_.residual), None


def _private_B(private: Any, global_: Any, client: str, state: Path, t: int, spec: Any) -> dict[str, Any]:
    """The client's B tensors (VeRA: its b vectors), checked to cover the global's LoRA modules whose method keeps B
    private (every module; a per-module spec: its FedSA modules) with the global A's rank."""
    from uniflow_cli.peft_keys import factor_modules, factor_side

    fix = "both must come from the same federation; re-train the client"
    shared_modules = {m: keys for m, keys in factor_modules(global_.tensors.keys()).items() if spec.for_module(m).private_B}
    own_B = {k: v for k, v in private.tensors.items() if factor_side(k) == "out"}
    private_modules = factor_modules(own_B.keys())
    if set(private_modules) != set(shared_modules):
        missing = sorted(set(shared_modules) ^ set(private_modules))
        raise AdapterError(f"client {client}'s private B in {state} and round {t}'s global cover different LoRA modules (e.g. {missing[0]})", fix=fix)
    for module, (a_key, _b) in shared_modules.items():
        b_key = private_modules[module][1]
        if a_key is not None and own_B[b_key].dim() == 2 and own_B[b_key].shape[1] != global_.tensors[a_key].shape[0]:
            raise AdapterError(f"{module}: client {client}'s B has rank {own_B[b_key].shape[1]}, the global A rank {global_.tensors[a_key].shape[0]}", fix=fix)
    return own_B


__all__ = ["EvalRequest", "EvalTarget", "check_modalities", "check_request", "check_workspace_evaluation", "resolve_target"]


# --------------------------------------------------------------------------------------------------
# A model without test data: what ``uniflow ask`` and ``uniflow export`` build
# --------------------------------------------------------------------------------------------------
def model_target(workspace: Any = None, round: int | None = None, adapter: Path | None = None, preset: str | None = None,
                 client: str | None = None) -> EvalTarget:
    """The model of a workspace round (default: the latest published; its earlier rounds as the chain; with
    ``client``, that client's personalised model), or of an explicit ``adapter`` (model settings: ``preset``,
    else the ones it records, else the ``workspace`` given here). No samples and no output file: the target
    :func:`uniflow_cli.evaluation.build_model` builds, checked as :func:`resolve_target` checks it."""
    from uniflow_cli.adapters import read_adapter
    from uniflow_cli.global_info import recorded_settings
    from uniflow_cli.settings import LoraSettings, resolve, resolve_model

    if adapter is not None and (round is not None or client is not None):
        raise worded(UsageError, "{adapter} names the model itself; it cannot be combined with {round} or {client}",
                     "give {adapter} DIR, or {round} T (and {client} K) inside the workspace")
    if adapter is None and preset is not None:
        raise worded(UsageError, "{preset} only applies with {adapter} (a workspace uses its uniflow.toml)", "drop {preset}, or give {adapter} DIR")
    ws = _workspace(workspace, required=True) if adapter is None or workspace is not None else None
    chain: list[tuple[int, Any]] = []
    local = None
    if adapter is None:
        published = ws.published_rounds()
        if not published:
            raise WorkspaceError(f"no global adapter is published in {ws.root / 'rounds'}", fix="run 'uniflow init' to create round 0")
        t = published[-1] if round is None else round
        if t not in published:
            raise worded(WorkspaceError, "round {t} is not published in {where} (published: {listed})", "pick a published round, e.g. {round} {last}",
                         t=t, where=ws.root / "rounds", listed=", ".join(map(str, published)), last=published[-1])
        missing = [s for s in range(1, t) if s not in published]
        if missing:
            raise WorkspaceError(f"round {t} needs the globals of rounds 1..{t - 1} (their residuals/merges), but round(s) {missing} are missing",
                                 fix="restore the missing rounds/<t>/global directories")
        final = read_adapter(ws.global_dir(t))
        chain = [(s, read_adapter(ws.global_dir(s))) for s in range(1, t)]
        spec = method_spec_of(final)
        if client is not None:
            final, local = personalised(ws, final, spec, t, str(client))
        model, lora = resolve_model(ws), resolve(LoraSettings, ws)
    else:
        final = read_adapter(Path(adapter))
        t, spec = (final.meta.round if final.meta is not None else None), method_spec_of(final)
        recorded = recorded_settings(final.meta, str(final.path)) if preset is None else None
        if preset is None and recorded is None and ws is None:
            raise worded(UsageError, "no model settings: the adapter {path} records none, and neither {preset} nor {workspace} was given",
                         "give {preset} tiny-random|smol (or {workspace} DIR, the workspace the adapter came from)", path=final.path)
        model, lora = _explicit_settings(EvalRequest(adapter=Path(adapter), preset=preset), ws, final, recorded, {})
    target = EvalTarget(explicit=adapter is not None, workspace=ws, round=t, final=final, chain=chain, spec=spec, model=model, lora=lora,
                        samples={}, out=None, source=str(final.path), client=None if client is None else str(client), local=local)  # type: ignore[arg-type]
    _check_task(target)
    target.notices.extend(_target_notices(target))
    return target
