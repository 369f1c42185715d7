"""``uniflow sweep``: a grid of federated simulations (methods × adapters × seeds × knobs), resumable, with one
JSON row per (cell, round).

A grid is a TOML file (examples/paper/*.toml)::

    [sweep]                       # the grid's name and the knobs every cell shares
    name = "table4-snli"
    task = "classify"
    preset = "minilm"
    dataset = "snli"
    clients = "text:3"
    scheme = "dirichlet"
    rounds = 4

    [axes]                        # the cartesian product, in file order (the first axis varies slowest)
    method = ["fedit", "fedA2"]   # a knob's values ...
    seed = [0, 1, 2]

    [axes.adapter]                # ... or named variants, each setting several knobs
    lora = { adapter = "lora" }
    vera = { adapter = "vera", r = 256 }

    [[exclude]]                   # cells left out (axis → value or variant name)
    method = "svd"
    adapter = "vera"

    [full]                        # --full: the size to run elsewhere (keys as in [sweep]; a list replaces an axis)
    rounds = 20

A knob is a key of ``[model]``, ``[lora]``, ``[train]`` or ``[aggregate]`` (the same names as uniflow.toml),
of ``uniflow partition`` (:data:`PARTITION_KNOBS`) or of the run (:data:`RUN_KNOBS`); an unknown key is the
settings resolver's one error, naming the closest known key. Each cell is a workspace ``OUT/runs/<cell>/``
built by the functions ``uniflow init``, ``uniflow partition`` and ``uniflow simulate`` call, with the
cell's seed as the init, partition and training seed (so the methods of one seed share the partition and
the round-0 adapter: paired comparisons). The whole grid is validated before any cell runs.

Resuming: a finished cell (``runs/<cell>/sweep/rows.jsonl`` written) is skipped; an unfinished one goes on
where it stopped (init and partition are skipped when done, simulate resumes after its last published
round). A cell whose recorded config differs from the grid's is an error (``force`` redoes it). The rows
file is rebuilt from the finished cells, in grid order, after each cell, and published atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uniflow_cli.errors import ConfigError, UniflowError, UsageError, WorkspaceError
from uniflow_cli.json_text import strict

ROWS_FORMAT = 1
ROWS_MAX_BYTES = 1 << 28  # a rows file of a full grid is megabytes; a config JSON's 16 MiB cap is not its size
CELL_DIR = "sweep"  # inside each cell's workspace: cell.json (its config) and rows.jsonl (written when it finished)
TOP_KEYS = ("sweep", "axes", "exclude", "full")
PARTITION_KNOBS = ("dataset", "clients", "scheme", "alpha", "train_per_client", "test_per_modality", "label_column")
# seed: init, partition and training seed of the cell; warm_start: the share of rounds FedIT trains first
# (the paper's warm-start variant); train_clients: ids or kinds (image | audio | text | mixed) that train.
RUN_KNOBS = ("seed", "rounds", "eval_every", "eval_limit", "eval_batch_size", "max_new_tokens", "fraction", "train_clients", "warm_start",
             "fidelity")
_NOT_KNOBS = {"prompt", "use_rslora", "projection_prng_key"}  # a nested table; set by adapter (rslora) and seed (VeRA)
CLIENT_KINDS = ("image", "audio", "text", "mixed")
WARM_START_METHOD = "fedit"  # the paper's warm start: FedIT's rounds first, then the cell's method


# --------------------------------------------------------------------------------------------------
# The knobs: one namespace, checked by the settings resolver's one policy
# --------------------------------------------------------------------------------------------------
def knob_tables() -> dict[str, tuple[str, ...]]:
    """Which knobs each part of a cell reads: uniflow.toml's tables (their field names), partition, run."""
    from uniflow_cli.models.settings import ModelSettings
    from uniflow_cli.settings import AggregateSettings, LoraSettings, TrainSettings

    def names(cls: type, drop: Iterable[str] = ()) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in _NOT_KNOBS and f.name not in drop)

    return {"model": names(ModelSettings), "lora": names(LoraSettings), "train": names(TrainSettings, ("seed",)),
            "aggregate": names(AggregateSettings), "partition": PARTITION_KNOBS, "run": RUN_KNOBS}


def _knob_class() -> type:
    """A dataclass whose fields are every knob, for :func:`settings.check_keys` (``lambda`` is ``lambda_``'s key)."""
    knobs = [name for part in knob_tables().values() for name in part]
    return dataclasses.make_dataclass("GridKnobs", [(k, Any, field(default=None)) for k in knobs], namespace={"TOML_KEYS": {"lambda_": "lambda"}})


def check_knobs(table: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``table``'s knobs by field name; an unknown key is one ConfigError naming the closest known key."""
    from uniflow_cli.settings import check_keys

    if not isinstance(table, Mapping):
        raise ConfigError(f"{where} must be a table, not {type(table).__name__}", fix=f"write it as a TOML table ({where})")
    return check_keys(table, _knob_class(), where)


def _toml_key(knob: str) -> str:
    return "lambda" if knob == "lambda_" else knob


# --------------------------------------------------------------------------------------------------
# The grid: parse, expand, validate (nothing is written)
# --------------------------------------------------------------------------------------------------
@dataclass
class Cell:
    index: int
    id: str
    knobs: dict[str, Any]  # axis → the value or variant name it takes in this cell (the row's "knobs")
    given: dict[str, Any]  # every knob the grid gives this cell, by field name
    settings: CellSettings | None = None


@dataclass
class Grid:
    name: str
    path: Path
    axes: list[str]
    cells: list[Cell]
    full: bool = False


def read_grid_file(path: str | Path) -> dict[str, Any]:
    """The grid file's TOML (a bad file is one line naming it)."""
    import tomllib

    from uniflow_cli.paths import read_regular

    path = Path(path)
    try:
        data = tomllib.loads(read_regular(path, follow=True).decode("utf-8"))  # the user's own file: a link is fine
    except FileNotFoundError:
        raise UsageError(f"grid file {path} does not exist", fix="name a TOML grid file, e.g. examples/paper/lambda.toml") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"grid file {path} is not valid TOML ({exc})", fix="fix the file (https://toml.io)") from None
    unknown = [k for k in data if k not in TOP_KEYS]
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], TOP_KEYS, n=1)
        raise ConfigError(f"{path}: unknown table {unknown[0]!r}", fix=f"{f'did you mean {close[0]!r}? ' if close else ''}known: {', '.join(TOP_KEYS)}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` (VALUE as TOML: ``50``, ``[0, 1, 2]``, ``"x"``; a bare word is a string)."""
    import tomllib

    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"--set {text!r} is not KEY=VALUE", fix="e.g. --set rounds=50 or --set seed=[0,1,2,3,4]")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip(), value


def apply_overrides(data: dict[str, Any], overrides: Iterable[tuple[str, Any]], where: str) -> dict[str, Any]:
    """``data`` with each (key, value) set: an axis when the grid has that axis (the value a list), else a [sweep] knob."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    sweep, axes = dict(data.get("sweep") or {}), dict(data.get("axes") or {})
    for key, value in overrides:
        if key in axes:
            if not isinstance(value, list) and not isinstance(value, dict):
                raise ConfigError(f"{where}: {key} is an axis, so its value must be a list, not {value!r}", fix=f"write {key} = [{value!r}]")
            axes[key] = value
        else:
            sweep[key] = value
    data["sweep"], data["axes"] = sweep, axes
    return data


def load_grid(path: str | Path, *, sets: Sequence[str] = (), full: bool = False) -> Grid:
    """Parse, apply ``[full]`` (``full``) then the ``--set`` overrides, expand and validate every cell."""
    path = Path(path)
    data = read_grid_file(path)
    if full:
        if "full" not in data:
            raise UsageError(f"{path} has no [full] table", fix="drop --full, or add a [full] table with the full-size knobs")
        data = apply_overrides(data, dict(data["full"]).items(), f"{path} [full]")
    data = apply_overrides(data, [parse_override(s) for s in sets], "--set")
    sweep = dict(data.get("sweep") or {})
    name = sweep.pop("name", None)
    name = _grid_name(name, path) + ("-full" if full and "name" not in data.get("full", {}) else "")
    fixed = check_knobs(sweep, f"{path} [sweep]")
    axes = parse_axes(data.get("axes") or {}, path)
    cells = expand_cells(fixed, axes, _excludes(data.get("exclude") or [], axes, path))
    grid = Grid(name, path, [a.name for a in axes], cells, full)
    for cell in cells:
        cell.settings = cell_settings(cell.given, where=f"{path} cell {cell.id}", base=path.parent)
    return grid


def _grid_name(name: Any, path: Path) -> str:
    from uniflow_cli.paths import is_valid_id

    name = path.stem if name is None else name
    if not is_valid_id(name):
        raise ConfigError(f"{path} [sweep]: name={name!r} is not a plain name", fix="write name = \"table4\" (letters, digits, _ . -)")
    return name


@dataclass(frozen=True)
class Axis:
    name: str
    values: list[tuple[Any, dict[str, Any]]]  # (the value or variant name, the knobs it sets)
    named: bool  # a table of named variants (else a knob's list of values)


def parse_axes(table: Mapping[str, Any], path: Path) -> list[Axis]:
    """Each axis: a knob with a list of values, or a table of named variants (each a table of knobs)."""
    from uniflow_cli.paths import is_valid_id

    axes: list[Axis] = []
    for name, spec in table.items():
        where = f"{path} [axes] {name}"
        if isinstance(spec, list):
            knob = next(iter(check_knobs({name: None}, f"{path} [axes]")))
            values, named = [(v, {knob: v}) for v in spec], False
        elif isinstance(spec, dict):
            for variant in spec:
                if not is_valid_id(variant):
                    raise ConfigError(f"{where}: variant {variant!r} is not a plain name", fix="name variants with letters, digits, _ . -")
            values, named = [(variant, check_knobs(knobs, f"{path} [axes.{name}.{variant}]")) for variant, knobs in spec.items()], True
        else:
            raise ConfigError(f"{where} must be a list of values or a table of named variants, not {spec!r}", fix=f"write {name} = [...]")
        if not values:
            raise ConfigError(f"{where} is empty", fix="give it at least one value, or remove the axis")
        labels = [json.dumps(v, sort_keys=True) for v, _ in values]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"{where} lists a value twice", fix="give each value once")
        axes.append(Axis(name, values, named))
    return axes


def _excludes(entries: Any, axes: list[Axis], path: Path) -> list[dict[str, Any]]:
    if not isinstance(entries, list) or not all(isinstance(e, dict) and e for e in entries):
        raise ConfigError(f"{path}: exclude must be an array of tables ([[exclude]] method = \"svd\" ...)", fix="see examples/paper/table4-snli.toml")
    names = [a.name for a in axes]
    for entry in entries:
        for key in entry:
            if key not in names:
                raise ConfigError(f"{path} [[exclude]]: {key!r} is not an axis", fix=f"name one of the axes: {', '.join(names)}")
    return entries


def expand_cells(fixed: dict[str, Any], axes: list[Axis], excludes: list[dict[str, Any]]) -> list[Cell]:
    """The cartesian product of the axes in order (the last varies fastest), less the excluded cells."""
    used = [0] * len(excludes)
    cells: list[Cell] = []
    for combo in itertools.product(*(axis.values for axis in axes)):
        knobs = {axis.name: label for axis, (label, _) in zip(axes, combo)}
        hit = [i for i, e in enumerate(excludes) if all(knobs.get(k) == v for k, v in e.items())]
        for i in hit:
            used[i] += 1
        if hit:
            continue
        given = dict(fixed)
        setters: dict[str, str] = {}
        for axis, (_, values) in zip(axes, combo):
            for knob, value in values.items():
                if knob in setters and setters[knob] != axis.name:
                    raise ConfigError(f"axes {setters[knob]} and {axis.name} both set {_toml_key(knob)}", fix="let one axis set each knob")
                setters[knob] = axis.name
                given[knob] = value
        cells.append(Cell(len(cells), "", knobs, given))
    for entry, n in zip(excludes, used):
        if n == 0:
            raise ConfigError(f"[[exclude]] {entry} matches no cell", fix="check its values against the axes (variant names for named axes)")
    _name_cells(cells, named={axis.name for axis in axes if axis.named})
    return cells


SELF_NAMED = ("method", "adapter", "dataset")  # axes whose values read alone in an id (fedA2, vera, snli)


def _part(axis: str, value: Any, named: bool) -> str:
    text = "+".join(map(str, value)) if isinstance(value, list) else str(value)
    if axis == "seed" and not named:
        text = f"s{text}"
    elif not named and axis not in SELF_NAMED:
        text = f"{_toml_key(axis)}-{text}"  # lambda-0.01, ridge-auto, r-4
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in text)


def cell_id(knobs: Mapping[str, Any], named: Iterable[str] = ()) -> str:
    """A readable, deterministic id from the cell's axis values (``named``: axes of named variants, whose
    names stand alone); a hash keeps a long one within 64 characters."""
    named = set(named)
    parts = [_part(axis, value, axis in named) for axis, value in knobs.items()]
    text = "_".join(p for p in parts if p) or "cell"
    text = text.lstrip("._-") or "cell"
    if len(text) > 64:
        digest = hashlib.sha256(json.dumps(knobs, sort_keys=True).encode()).hexdigest()[:8]
        text = f"{text[:55]}-{digest}"
    return text


def _name_cells(cells: list[Cell], named: set[str]) -> None:
    seen: dict[str, Cell] = {}
    for cell in cells:
        cell.id = cell_id(cell.knobs, named)
        if cell.id in seen:
            raise ConfigError(f"cells {seen[cell.id].knobs} and {cell.knobs} get the same id {cell.id!r}", fix="give the axes' values distinct names")
        seen[cell.id] = cell


# --------------------------------------------------------------------------------------------------
# One cell's settings: the tables uniflow init writes, the partition request, the run
# --------------------------------------------------------------------------------------------------
@dataclass
class RunSettings:
    seed: int = 0
    rounds: int = 0
    eval_every: int | None = None  # None: the last round only
    eval_limit: int | None = None
    eval_batch_size: int = 8
    max_new_tokens: int = 16
    fraction: float | None = None
    train_clients: list[str] | None = None  # None: every client
    warm_start: float = 0.0
    fidelity: bool = False  # each round's function-space gap (uniflow_cli.fidelity): the rows' loss_* and gap_* fields

    @property
    def warm_rounds(self) -> int:
        """Rounds FedIT trains before the cell's method (⌊w·R + ½⌋)."""
        return math.floor(self.warm_start * self.rounds + 0.5) if self.warm_start else 0


@dataclass
class CellSettings:
    model: Any  # ModelSettings
    lora: Any  # LoraSettings
    train: Any  # TrainSettings
    aggregate: Any  # AggregateSettings
    partition: Any  # PartitionRequest
    run: RunSettings
    adapter: str  # lora | rslora | vera, as the grid names it
    dataset: list[str]  # as the grid names them (relative paths: to the grid file)

    def record(self) -> dict[str, Any]:
        """The cell's config as plain JSON (what the rows and cell.json carry)."""
        from uniflow_cli.settings import aggregate_table, lora_table, train_table

        p = self.partition
        part = {"dataset": self.dataset, "clients": ",".join(f"{k}:{n}" for k, n in p.clients), "scheme": p.scheme,
                "alpha": p.alpha if p.scheme != "iid" else None, "train_per_client": p.train_per_client,
                "test_per_modality": p.test_per_modality, "label_column": p.label_column}
        return {"model": self.model.to_dict(), "lora": lora_table(self.lora), "train": train_table(self.train),
                "aggregate": aggregate_table(self.aggregate), "partition": part, "run": _run_record(self.run)}


def _run_record(run: RunSettings) -> dict[str, Any]:
    """The run knobs as recorded; ``fidelity`` only when on (cells recorded before the knob existed stay equal)."""
    record = dataclasses.asdict(run)
    if not record["fidelity"]:
        del record["fidelity"]
    return record


def _split(given: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    parts = knob_tables()
    return {part: {k: given[k] for k in names if k in given} for part, names in parts.items()}


def cell_settings(given: Mapping[str, Any], *, where: str, base: Path = Path(".")) -> CellSettings:
    """Every setting of a cell, validated as ``uniflow init``, ``partition`` and ``simulate`` would (a bad
    value is one ConfigError naming the key and ``where``)."""
    from uniflow_cli.aggregation.registry import check_family

    parts = _split(given)
    run = _run_settings(parts["run"], where)
    try:
        model = _model_settings(parts["model"], parts["partition"].get("dataset"))
        lora, adapter = _lora_settings(parts["lora"], model, run.seed)
        train = _train_settings(parts["train"], model, run.seed)
        aggregate = _aggregate_settings(parts["aggregate"])
    except ConfigError as exc:
        raise _in_grid_terms(exc, where) from None
    try:
        check_family(aggregate.method, lora.adapter)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc.problem}", fix=f"leave the cell out: [[exclude]] method = \"{aggregate.method}\", adapter = \"{adapter}\"") from None
    dataset, request = _partition_request(parts["partition"], model, run.seed, where, base)
    _check_warm_start(run, aggregate.method, train, where)
    return CellSettings(model, lora, train, aggregate, request, run, adapter, dataset)


def _in_grid_terms(exc: ConfigError, where: str) -> ConfigError:
    if exc.field is None:
        return ConfigError(f"{where}: {exc.problem}", fix=exc.fix)
    return exc.renamed(_toml_key(exc.field), style="toml", where=where)


def _model_settings(knobs: dict[str, Any], dataset: Any) -> Any:
    """``[model]`` as ``uniflow init`` builds it; a classifier on one built-in dataset gets its labels by default."""
    from uniflow_cli.models.settings import ModelSettings
    from uniflow_cli.models.task import builtin_labels, parse_labels

    knobs = dict(knobs)
    task = knobs.get("task", "qa")
    knobs.setdefault("preset", "minilm" if task == "classify" else "smol")
    if task == "classify":
        knobs.setdefault("modalities", [])
        if isinstance(dataset, str) and dataset in builtin_labels():
            knobs.setdefault("labels", dataset)
    if isinstance(knobs.get("labels"), str):  # a built-in's name (snli) or "a,b,c", as init --labels
        knobs["labels"] = parse_labels(knobs["labels"])
    return ModelSettings(**knobs)


def _lora_settings(knobs: dict[str, Any], model: Any, seed: int) -> tuple[Any, str]:
    """``[lora]`` as ``uniflow init`` builds it: ``adapter = "rslora"`` is LoRA with α/√r, VeRA's
    projections come from the seed, a classifier's LoRA sits on the encoder's query/value."""
    from uniflow_cli.settings import LoraSettings

    knobs = dict(knobs)
    adapter = knobs.pop("adapter", "lora")
    if adapter == "rslora":
        knobs.update(adapter="lora", use_rslora=True)
    elif adapter == "vera":
        knobs.update(adapter="vera", projection_prng_key=seed)
    else:
        knobs["adapter"] = adapter  # LoraSettings names the families if it is none of them
    if model.is_classify:
        knobs.setdefault("llm_target_modules", [])
        knobs.setdefault("encoder_target_modules", ["query", "value"])
    return LoraSettings(**knobs), adapter


def _train_settings(knobs: dict[str, Any], model: Any, seed: int) -> Any:
    from uniflow_cli.models.task import check_train_settings
    from uniflow_cli.settings import TrainSettings

    knobs = dict(knobs)
    if "epochs" in knobs and "steps" not in knobs:
        knobs["steps"] = None  # the grid gave epochs instead of the default steps
    if model.is_classify:
        knobs.setdefault("stages", "joint")  # a classifier trains in one stage (as init --task classify)
    train = TrainSettings(**knobs, seed=seed)
    check_train_settings(model, train)
    return train


def _aggregate_settings(knobs: dict[str, Any]) -> Any:
    from uniflow_cli.settings import AggregateSettings

    return AggregateSettings(**knobs)


def _whole(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _run_settings(knobs: dict[str, Any], where: str) -> RunSettings:
    def bad(key: str, rule: str, example: Any) -> ConfigError:
        return ConfigError.invalid(key, knobs[key], rule, example=example).renamed(key, style="toml", where=where)

    if "rounds" not in knobs:
        raise ConfigError(f"{where}: no rounds", fix="write rounds = 10 in [sweep] (the rounds each cell publishes)")
    for key, minimum, example in (("seed", 0, 0), ("rounds", 1, 10), ("eval_every", 1, 1), ("eval_limit", 1, 200),
                                  ("eval_batch_size", 1, 8), ("max_new_tokens", 1, 16)):
        if key in knobs and not _whole(knobs[key], minimum):
            raise bad(key, f"must be a whole number >= {minimum}", example)
    fraction = knobs.get("fraction")
    if fraction is not None and not (isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0 < fraction <= 1):
        raise bad("fraction", "must be in (0, 1] (the share of clients each round trains)", 0.5)
    warm = knobs.get("warm_start", 0.0)
    if isinstance(warm, bool) or not isinstance(warm, (int, float)) or not 0 <= warm < 1:
        raise bad("warm_start", "must be in [0, 1) (the share of rounds FedIT trains first)", 0.2)
    if not isinstance(knobs.get("fidelity", False), bool):
        raise bad("fidelity", "must be true or false", True)
    clients = knobs.get("train_clients")
    if clients is not None:
        clients = _train_clients(clients, bad)
    return RunSettings(**{**knobs, "train_clients": clients, "warm_start": float(warm)})


def _train_clients(value: Any, bad: Callable[[str, str, Any], ConfigError]) -> list[str] | None:
    items = [value] if isinstance(value, (str, int)) and not isinstance(value, bool) else value
    if not isinstance(items, list) or not items or not all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in items):
        raise bad("train_clients", "must be client ids or kinds (image, audio, text, mixed), or \"all\"", ["image"])
    items = [str(x) for x in items]
    if items == ["all"]:
        return None
    wrong = [x for x in items if x not in CLIENT_KINDS and not x.isdigit()]
    if wrong:
        raise bad("train_clients", f"names {wrong[0]!r}, neither a client id nor a kind ({', '.join(CLIENT_KINDS)})", ["image"])
    return items


def _partition_request(knobs: dict[str, Any], model: Any, seed: int, where: str, base: Path) -> tuple[list[str], Any]:
    """The PartitionRequest ``uniflow partition`` would build (datasets checked by name, nothing read)."""
    from uniflow_cli.data.build import PartitionRequest
    from uniflow_cli.data.builtin import BUILTINS
    from uniflow_cli.data.partition import parse_clients

    knobs = dict(knobs)
    dataset = knobs.pop("dataset", None)
    names = [dataset] if isinstance(dataset, str) else dataset
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"{where}: dataset={dataset!r} must name a dataset or a list of them", fix=f"write dataset = \"{BUILTINS[0]}\" (or a path)")
    paths = [n if n in BUILTINS else str((base / n).resolve()) for n in names]
    for name, resolved in zip(names, paths):
        if name not in BUILTINS and not Path(resolved).exists():
            raise ConfigError(f"{where}: dataset {name!r} is neither a built-in nor a file or directory (relative to the grid file)",
                              fix=f"use one of {', '.join(BUILTINS)} or a path")
    _check_partition_types(knobs, where)
    spec = knobs.pop("clients", None)
    if not isinstance(spec, str):
        raise ConfigError(f"{where}: clients={spec!r} must be a string such as \"text:3\" or \"image:4,audio:4\"", fix="write clients = \"text:3\"")
    try:
        clients = parse_clients(spec)
        request = PartitionRequest(datasets=paths, clients=clients, seed=seed, labels=list(model.labels) if model.is_classify else None, **knobs)
    except ConfigError as exc:
        raise _in_grid_terms(exc, where) from None
    except UsageError as exc:
        raise ConfigError(f"{where}: clients={json.dumps(spec)}: {exc.problem.replace('--clients', 'clients')}", fix=exc.fix) from None
    return names, request


_PARTITION_TYPES = {"scheme": (str, "a string", "dirichlet"), "alpha": ((int, float), "a number", 0.5),
                    "train_per_client": (int, "an integer", 200), "test_per_modality": (int, "an integer", 200),
                    "label_column": (str, "a string", "answer")}


def _check_partition_types(knobs: Mapping[str, Any], where: str) -> None:
    for key, (kind, what, example) in _PARTITION_TYPES.items():
        value = knobs.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
            raise ConfigError.invalid(key, value, f"must be {what}", example=example).renamed(key, style="toml", where=where)


def _check_warm_start(run: RunSettings, method: str, train: Any, where: str) -> None:
    """FedIT first, then the method: both upload A and B and keep nothing between rounds (a method with
    client state or history would start from rounds it did not train)."""
    from uniflow_cli.aggregation.registry import method_spec

    if not run.warm_start:
        return
    spec = method_spec(method)
    if not (spec.needs_A and spec.needs_B and spec.pads and not spec.keeps_client_state and not spec.folds_history):
        raise ConfigError(f"{where}: warm_start with method {method}: FedIT's globals are not a start {method} defines "
                          "(it keeps client state, folds history or shares one factor)", fix="use warm_start with fedA2 or svd")
    if not 1 <= run.warm_rounds < run.rounds:
        raise ConfigError(f"{where}: warm_start={run.warm_start:g} of rounds={run.rounds} gives {run.warm_rounds} FedIT rounds",
                          fix="choose warm_start and rounds so that FedIT trains at least one round and fewer than all")
    if train.stage_by == "round" and train.stages in ("two-stage", "reverse"):
        raise ConfigError(f"{where}: warm_start with stage_by = \"round\": each phase would stage its own rounds", fix="use stage_by = \"step\"")


# --------------------------------------------------------------------------------------------------
# The plan: where everything goes, each cell's state (nothing is written)
# --------------------------------------------------------------------------------------------------
@dataclass
class CellState:
    cell: Cell
    root: Path  # the cell's workspace
    status: str  # done | partial | new
    round: int = 0  # the latest published round (partial)


@dataclass
class SweepPlan:
    grid: Grid
    out: Path
    rows: Path
    states: list[CellState]

    def todo(self) -> list[CellState]:
        return [s for s in self.states if s.status != "done"]


def default_out(grid: Grid) -> Path:
    return Path("sweeps") / grid.name


def plan_sweep(grid: Grid, out: str | Path | None = None, rows: str | Path | None = None, *, force: bool = False) -> SweepPlan:
    """Each cell's state under ``out`` (default ``sweeps/<name>``) and the rows file (default ``out/<name>.jsonl``);
    a cell recorded with another config, or a rows file that is not this grid's, is an error (``force``: redo / replace)."""
    out = Path(out) if out is not None else default_out(grid)
    rows_path = Path(rows) if rows is not None else out / f"{grid.name}.jsonl"
    states = [cell_state(cell, out / "runs" / cell.id, force=force) for cell in grid.cells]
    check_rows_target(rows_path, grid, states, force=force)
    return SweepPlan(grid, out, rows_path, states)


def _cell_record(cell: Cell, grid_name: str) -> dict[str, Any]:
    assert cell.settings is not None
    return {"format_version": ROWS_FORMAT, "grid": grid_name, "cell": cell.id, "knobs": cell.knobs, "config": cell.settings.record()}


def cell_state(cell: Cell, root: Path, *, force: bool) -> CellState:
    from uniflow_cli.workspace import Workspace

    meta = root / CELL_DIR / "cell.json"
    if not root.exists():
        return CellState(cell, root, "new")
    if not meta.is_file():
        raise WorkspaceError(f"{root} exists but is not a sweep cell (no {CELL_DIR}/cell.json)", fix="move it away, or choose another --out")
    recorded = _read_json(meta)
    wanted = json.loads(json.dumps(cell.settings.record() if cell.settings else {}))
    if recorded.get("config") != wanted:
        if not force:
            raise WorkspaceError(f"cell {cell.id} in {root} was run with another config ({_first_difference(recorded.get('config'), wanted)})",
                                 fix="use another --out for the changed grid, or pass --force to redo the changed cells")
        return CellState(cell, root, "redo")
    if (root / CELL_DIR / "rows.jsonl").is_file():
        return CellState(cell, root, "done")
    ws = Workspace(root)
    return CellState(cell, root, "partial", ws.latest_global_round() if ws.config_path.is_file() else 0)


def _first_difference(old: Any, new: Any, prefix: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
    return f"{prefix.rstrip('.')}: {json.dumps(old)} then, {json.dumps(new)} now"


def _read_json(path: Path) -> dict[str, Any]:
    from uniflow_cli.errors import DataError
    from uniflow_cli.paths import read_regular

    try:
        data = json.loads(read_regular(path).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc})", fix="move the cell away and run it again") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} is not a JSON object", fix="move the cell away and run it again")
    return data


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file (one object per line), each line checked."""
    from uniflow_cli.errors import DataError
    from uniflow_cli.paths import read_regular

    rows = []
    for n, line in enumerate(read_regular(Path(path), limit=ROWS_MAX_BYTES, follow=True).decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{path} line {n} is not JSON ({exc})", fix="regenerate the file with uniflow sweep run") from None
        if not isinstance(row, dict) or "grid" not in row or "cell" not in row:
            raise DataError(f"{path} line {n} is not a sweep row (no grid and cell)", fix="name a file uniflow sweep wrote")
        rows.append(row)
    return rows


def _rows_grid(path: Path) -> str | None:
    """The grid a rows file belongs to (None: not a sweep rows file)."""
    try:
        rows = read_rows(path)
    except (OSError, UniflowError, UnicodeDecodeError):
        return None
    grids = {r["grid"] for r in rows}
    return grids.pop() if len(grids) == 1 else None


def check_rows_target(path: Path, grid: Grid, states: list[CellState], *, force: bool) -> None:
    """The rows file is this grid's (or absent); it must not hold cells the run would drop (another --out)."""
    from uniflow_cli.atomic import check_writable_target

    if not path.exists():
        check_writable_target(path, force=False)
        return
    owner = _rows_grid(path) if path.stat().st_size else grid.name
    if owner != grid.name:
        if not force:
            raise WorkspaceError(f"{path} is not the rows file of grid {grid.name} ({'grid ' + owner if owner else 'not a sweep rows file'})",
                                 fix="choose another --rows, or pass --force to replace it")
        check_writable_target(path, force=True, replaces=lambda p: _rows_grid(p) is not None, kind="sweep rows file")
        return
    if path.stat().st_size == 0:
        return
    done = {s.cell.id for s in states if s.status == "done"}
    lost = [cell for cell in dict.fromkeys(r["cell"] for r in read_rows(path)) if cell not in done]
    if lost and not force:
        raise WorkspaceError(f"{path} holds rows of cell {lost[0]} (and {len(lost) - 1} more), which is not in this grid or not under the --out runs",
                             fix="pass the --out it was run with, or --force to rewrite the file from this grid's cells")


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepEvent:
    """For a progress bar: ``start`` (``total`` cells to run), ``cell`` (cell ``index`` starts, ``done`` finished
    so far), ``simulate`` (``event``: simulate's SimulationEvent), ``finished`` (a cell's rows are written)."""

    kind: str
    cell: str | None = None
    done: int = 0
    total: int = 0
    event: Any = None


@dataclass
class SweepOutcome:
    grid: str
    out: Path
    rows: Path
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    rows_written: int = 0
    seconds: float = 0.0


def run_sweep(plan: SweepPlan, *, jobs: int = 1, device: str = "auto", threads: int | None = None,
              on_event: Callable[[SweepEvent], None] | None = None) -> SweepOutcome:
    """Run every cell not done (in grid order; ``jobs`` > 1: that many worker processes), rebuilding the rows
    file after each; returns what ran. ``threads``: per process (default: the cores / jobs)."""
    emit = on_event or (lambda _e: None)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError.invalid("jobs", jobs, "must be a whole number >= 1", example=1)
    started = time.perf_counter()
    todo = plan.todo()
    outcome = SweepOutcome(plan.grid.name, plan.out, plan.rows, skipped=[s.cell.id for s in plan.states if s.status == "done"])
    with one_sweep_at_a_time(plan.out):  # two sweeps in one OUT would run the same cells into the same workspaces
        emit(SweepEvent("start", total=len(todo)))
        if todo:
            (_run_parallel if jobs > 1 else _run_serial)(plan, todo, outcome, jobs=jobs, device=device, threads=threads, emit=emit)
        outcome.rows_written = publish_rows(plan)
    outcome.seconds = time.perf_counter() - started
    return outcome


LOCK_NAME = ".sweep.lock"


@contextmanager
def one_sweep_at_a_time(out: Path) -> Iterator[None]:
    """Hold an exclusive OS lock (``flock``) on ``OUT/.sweep.lock`` while a sweep runs there: a second sweep into the
    same OUT stops with one line naming the holder. The OS drops the lock when its process ends, however it ends,
    so a killed sweep leaves no stale lock to clear (the file stays; it is only a handle). Where the OS has no
    ``flock`` (Windows) no lock is taken."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - POSIX here
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
            raise UsageError(f"another uniflow sweep is running in {out} ({holder or 'its pid unknown'})",
                             fix="wait for it to finish, or give this one another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        yield
    finally:
        os.close(fd)


def _run_serial(plan: SweepPlan, todo: list[CellState], outcome: SweepOutcome, *, jobs: int, device: str, threads: int | None,
                emit: Callable[[SweepEvent], None]) -> None:
    from uniflow_cli.compute import set_threads

    set_threads(threads)
    for i, state in enumerate(todo):
        emit(SweepEvent("cell", state.cell.id, done=i, total=len(todo)))
        run_cell(state, plan.grid.name, device=device, on_progress=lambda e, c=state.cell.id: emit(SweepEvent("simulate", c, event=e)))
        outcome.ran.append(state.cell.id)
        publish_rows(plan)
        emit(SweepEvent("finished", state.cell.id, done=i + 1, total=len(todo)))


def _run_parallel(plan: SweepPlan, todo: list[CellState], outcome: SweepOutcome, *, jobs: int, device: str, threads: int | None,
                  emit: Callable[[SweepEvent], None]) -> None:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from uniflow_cli.compute import default_threads

    per_job = threads or max(1, default_threads() // jobs)
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))
    try:
        pending = {pool.submit(_cell_worker, state, plan.grid.name, device, per_job): state for state in todo}
        for state in todo[:jobs]:
            emit(SweepEvent("cell", state.cell.id, done=0, total=len(todo)))
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                state = pending.pop(future)
                future.result()  # a cell's error stops the sweep (the finished cells keep their rows)
                outcome.ran.append(state.cell.id)
                publish_rows(plan)
                emit(SweepEvent("finished", state.cell.id, done=len(outcome.ran), total=len(todo)))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on an error, the cells not started never start


def _cell_worker(state: CellState, grid_name: str, device: str, threads: int) -> str:
    from uniflow_cli.compute import set_threads

    set_threads(threads)
    run_cell(state, grid_name, device=device)
    return state.cell.id


def run_cell(state: CellState, grid_name: str, *, device: str = "auto", on_progress: Callable[[Any], None] | None = None) -> list[dict[str, Any]]:
    """One cell: record its config, ``uniflow init``, ``uniflow partition``, ``uniflow simulate`` (each skipped
    when done, simulate resuming), then its rows, published atomically."""
    from uniflow_cli.atomic import write_file_atomic
    from uniflow_cli.workspace import Workspace

    cell, root = state.cell, state.root
    assert cell.settings is not None
    began = time.perf_counter()
    if state.status == "redo":
        shutil.rmtree(root)  # its cell.json says it is a sweep cell of another config (--force)
    meta = root / CELL_DIR / "cell.json"
    if not meta.is_file():
        root.mkdir(parents=True, exist_ok=True)
        write_file_atomic(meta, (json.dumps(_cell_record(cell, grid_name), indent=2, sort_keys=True) + "\n").encode())
    ws = Workspace(root.resolve())
    init_cell(ws, cell.settings)
    partition_cell(ws, cell.settings)
    simulate_cell(ws, cell.settings, device=device, on_progress=on_progress)
    from uniflow_cli.compute import resolve_device

    rows = cell_rows(cell, ws, grid_name, seconds=time.perf_counter() - began, device=str(resolve_device(device)))
    write_file_atomic(root / CELL_DIR / "rows.jsonl", rows_bytes(rows))
    return rows


def init_cell(ws: Any, s: CellSettings) -> None:
    """``uniflow init`` (skipped when round 0 and uniflow.toml are there; a round 0 left without its config is redone)."""
    from uniflow_cli.models.workspace_init import init_workspace

    if ws.config_path.is_file() and ws.global_dir(0).is_dir():
        return
    init_workspace(ws.root, s.model, s.lora, seed=s.run.seed, force=ws.global_dir(0).exists(), train=s.train, aggregate=s.aggregate)


def partition_cell(ws: Any, s: CellSettings) -> None:
    """``uniflow partition --workspace`` (skipped when data/partition.json is there: it is published whole)."""
    from uniflow_cli.data.build import partition

    if not (ws.data_dir / "partition.json").is_file():
        partition(s.partition, ws.data_dir)


def resolve_train_clients(ws: Any, wanted: list[str] | None) -> list[str] | None:
    """Client ids from ids and kinds (``image``: every client of that kind in data/partition.json)."""
    if wanted is None:
        return None
    from uniflow_cli.data.build import read_partition_info

    info = read_partition_info(ws.data_dir / "partition.json")
    ids: list[str] = []
    for item in wanted:
        matches = [str(c["id"]) for c in info["clients"] if c.get("kind") == item] if item in CLIENT_KINDS else [item]
        if not matches:
            raise ConfigError(f"train_clients names kind {item!r}, but {ws.data_dir / 'partition.json'} has no such client",
                              fix="name a kind the clients knob makes")
        ids += [m for m in matches if m not in ids]
    return ids


def simulate_cell(ws: Any, s: CellSettings, *, device: str, on_progress: Callable[[Any], None] | None) -> None:
    """``uniflow simulate`` up to the cell's rounds (resuming); with warm_start, FedIT's rounds first, unevaluated:
    the second call evaluates them as an interrupted run's (the rows are those of one run)."""
    from uniflow_cli.evaluation import EvalOptions
    from uniflow_cli.simulate import run_simulation

    run = s.run
    options = EvalOptions(max_new_tokens=run.max_new_tokens, batch_size=run.eval_batch_size, limit=run.eval_limit, quantize=s.train.quantize)
    common = {"clients": resolve_train_clients(ws, run.train_clients), "fraction": run.fraction, "device": device, "on_progress": on_progress}
    if run.warm_rounds and ws.latest_global_round() < run.warm_rounds:
        run_simulation(ws.root, run.warm_rounds, method=WARM_START_METHOD, fidelity=run.fidelity, **common)
    run_simulation(ws.root, run.rounds, method=s.aggregate.method, eval_every=run.eval_every or run.rounds, eval_options=options,
                   fidelity=run.fidelity, **common)


# --------------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------------
TIMING_FIELDS = ("train_seconds", "cell_seconds")  # the only fields two runs of a cell may differ in


def eval_metrics(payload: Mapping[str, Any] | None, task: str) -> dict[str, Any]:
    """The row's metrics from an eval JSON (None: the round was not evaluated): ``accuracy`` (the payload's
    ``acc``: class accuracy for classify, teacher-forced token accuracy for qa) and the task's others, over
    all test samples, plus ``modalities`` (each modality's, qa) and ``n``."""
    from uniflow_cli.metrics import CLASSIFY_METRIC_KEYS, METRIC_KEYS, OVERALL

    keys = CLASSIFY_METRIC_KEYS if task == "classify" else METRIC_KEYS
    name = {"acc": "accuracy"}

    def pick(entry: Mapping[str, Any] | None) -> dict[str, Any]:
        return {name.get(k, k): (entry or {}).get(k) for k in keys}

    metrics = (payload or {}).get("metrics", {})
    overall = metrics.get(OVERALL)
    row = {**pick(overall), "n": (overall or {}).get("n")}
    if task != "classify":
        row["modalities"] = {m: pick(v) for m, v in metrics.items() if m != OVERALL}
    return row


def client_metrics(ws: Any, t: int, clients: Sequence[str], global_row: Mapping[str, Any], task: str) -> dict[str, Any]:
    """What the clients' own models score in round ``t``. FedSA and FedDPA have one model per client (simulate
    writes ``eval/clients/<k>/round-t.json``): ``personal_<metric>`` is their mean over the clients evaluated
    (None for a method without client state). ``client_<metric>`` is what a client uses: that mean where there is
    one, else the global's (every client's model). Accuracy and macro-F1 (classify) or accuracy (qa)."""
    from uniflow_cli.evaluation_io import read_eval_json

    keys = ("accuracy", "macro_f1") if task == "classify" else ("accuracy",)
    found = [eval_metrics(read_eval_json(path), task) for k in clients if (path := ws.client_eval_json(k, t)).is_file()]
    row: dict[str, Any] = {"personal_clients": len(found)}
    for key in keys:
        values = [f[key] for f in found if f.get(key) is not None]
        row[f"personal_{key}"] = round(sum(values) / len(values), 6) if values else None
        row[f"client_{key}"] = row[f"personal_{key}"] if values else global_row.get(key)
    return row


FIDELITY_FIELDS = ("loss_train", "loss_exact_train", "gap_train", "loss_test", "loss_exact_test", "gap_test")


def _fidelity_fields(ws: Any, t: int) -> dict[str, Any]:
    """Round ``t``'s function-space gap (``rounds/t/fidelity.json``, with the ``fidelity`` knob), else Nones."""
    path = ws.round_dir(t) / "fidelity.json"
    found = _read_json(path) if path.is_file() else {}
    return {key: found.get(key) for key in FIDELITY_FIELDS}


def _round_train_seconds(ws: Any, t: int) -> float | None:
    """Σ over the round's drops of their recorded training seconds (on disk: survives a resumed run)."""
    clients = ws.clients_dir(t)
    if not clients.is_dir():
        return None
    total = 0.0
    for drop in sorted(clients.iterdir()):
        meta = drop / "uniflow.json"
        if meta.is_file():
            total += float(json.loads(meta.read_text()).get("extra", {}).get("train", {}).get("seconds") or 0.0)
    return round(total, 3)


def cell_rows(cell: Cell, ws: Any, grid_name: str, *, seconds: float, device: str) -> list[dict[str, Any]]:
    """One row per published round 1..R: who the cell is, the eval metrics, the aggregation error."""
    from uniflow_cli.evaluation_io import read_eval_json

    s = cell.settings
    assert s is not None
    record = s.record()
    rows = []
    for t in range(1, s.run.rounds + 1):
        report = _read_json(ws.round_report(t)) if ws.round_report(t).is_file() else {}
        payload = read_eval_json(ws.eval_json(t)) if ws.eval_json(t).is_file() else None
        metrics = eval_metrics(payload, s.model.task)
        personal = client_metrics(ws, t, [str(c.get("client_id")) for c in report.get("clients") or [] if isinstance(c, dict)], metrics,
                                  s.model.task) if payload is not None else {}
        rows.append({
            "grid": grid_name, "cell": cell.id, "dataset": "+".join(s.dataset), "adapter": s.adapter, "method": s.aggregate.method,
            "seed": s.run.seed, "round": t, "rounds": s.run.rounds, "task": s.model.task,
            "round_method": report.get("method"),  # who fused this round (warm start: fedit first)
            **metrics, **personal,
            "rel_error": report.get("rel_error_mean"), "rel_error_max": report.get("rel_error_max"),
            **_fidelity_fields(ws, t),
            "clients": len(report.get("clients") or []), "knobs": cell.knobs, "config": record, "device": device,
            "train_seconds": _round_train_seconds(ws, t), "cell_seconds": round(seconds, 3),
        })
    return rows


def rows_bytes(rows: Iterable[Mapping[str, Any]]) -> bytes:
    """One JSON object per line, keys in the order rows are built (deterministic)."""
    return "".join(json.dumps(strict(dict(r)), ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def publish_rows(plan: SweepPlan) -> int:
    """Rewrite the rows file from the finished cells' rows, in grid order (atomic: never a half row)."""
    from uniflow_cli.atomic import write_file_atomic

    rows: list[dict[str, Any]] = []
    for state in plan.states:
        path = state.root / CELL_DIR / "rows.jsonl"
        if path.is_file():
            rows += read_rows(path)
    if not rows and not plan.rows.exists():
        return 0
    plan.rows.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(plan.rows, rows_bytes(rows), force=True, replaces=lambda p: _rows_grid(p) is not None or p.stat().st_size == 0,
                      kind="sweep rows file")
    return len(rows)


__all__ = ["Cell", "CellSettings", "CellState", "Grid", "RunSettings", "SweepEvent", "SweepOutcome", "SweepPlan", "cell_id", "cell_rows",
           "cell_settings", "eval_metrics", "load_grid", "plan_sweep", "publish_rows", "read_rows", "run_cell", "run_sweep"]
