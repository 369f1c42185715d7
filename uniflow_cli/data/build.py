"""Partition datasets into client shards and test splits, and read shards back.

Three steps, each testable alone: :func:`resolve_sources` (names/paths → :class:`Source`, cheap),
:func:`plan_partition` (pure: indices only, via :func:`partition_indices`), :func:`write_partition`
(materialise the chosen rows and publish the whole ``data/`` directory atomically).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from uniflow_cli.data.partition import SCHEMES, even_sizes, label_entropy, label_histogram, partition_indices
from uniflow_cli.data.schema import COLUMNS, MODALITIES, OPTIONAL_COLUMNS
from uniflow_cli.data.source import EITHER, TEST, TRAIN, Source
from uniflow_cli.data.userdata import Columns
from uniflow_cli.errors import ConfigError, DataError, UnsafeInputError, UsageError, worded
from uniflow_cli.paths import ID_RULE, check_id, overlap, read_regular

FORMAT_VERSION = 1
Progress = Callable[[int], None]


@dataclass
class PartitionRequest:
    """What ``uniflow partition`` asks for (validated before any data is read)."""

    datasets: list[str]
    clients: list[tuple[str, int]]  # e.g. [("image", 5), ("audio", 5), ("mixed", 3)]
    scheme: str = "iid"
    alpha: float = 0.5
    train_per_client: int | None = None  # None: every training row, split evenly
    test_per_modality: int = 200
    seed: int = 0
    label_column: str | None = None  # None: the answer
    columns: Columns = field(default_factory=Columns)
    allow_media_outside: list[Path] = field(default_factory=list)  # extra trusted roots for user media paths
    labels: list[str] | None = None  # a classify workspace's labels: every chosen row must be text with one of them as answer

    def __post_init__(self) -> None:
        if not self.datasets:
            from uniflow_cli.data.builtin import BUILTINS

            raise ConfigError.invalid("dataset", ConfigError.NO_VALUE, "names no dataset", fix=f"name {', '.join(BUILTINS)}, a file or a directory")
        if self.scheme not in SCHEMES:
            raise ConfigError.invalid("scheme", self.scheme, f"is not one of {', '.join(SCHEMES)}", example="iid")
        if self.scheme != "iid" and not (isinstance(self.alpha, (int, float)) and np.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError.invalid("alpha", self.alpha, "must be a finite number > 0 (smaller = more skew)", example=0.5)
        if self.train_per_client is not None and self.train_per_client < 1:
            raise ConfigError.invalid("train_per_client", self.train_per_client, "must be >= 1", example=2000)
        if self.test_per_modality < 1:
            raise ConfigError.invalid("test_per_modality", self.test_per_modality, "must be >= 1", example=200)
        self.allow_media_outside = [Path(p) for p in self.allow_media_outside]
        for root in self.allow_media_outside:
            if not root.is_dir():
                raise ConfigError.invalid("allow_media_outside", str(root), "is not a directory", fix="name an existing directory that holds media files")


def resolve_source(
    name: str, *, columns: Columns | None = None, seed: int = 0, allow_media_outside: Sequence[Path] = ()
) -> Source:
    """A built-in name (``easy-vqa``, ``spoken-qa``, ``text-qa``, ``snli``, ``rotten-tomatoes``) or a path to a user dataset (whose media
    paths must stay under its directory or one of ``allow_media_outside``)."""
    from uniflow_cli.data.builtin import BUILTINS, load_builtin

    if name in BUILTINS:
        return load_builtin(name, seed)
    path = Path(name)
    if not path.exists():
        raise UsageError(
            f"unknown dataset {name!r}: not a built-in and no such file or directory",
            fix=f"use one of {', '.join(BUILTINS)} or a path to a .jsonl/.csv/.parquet file or dataset directory",
        )
    from uniflow_cli.data.userdata import load_user

    return load_user(path, columns, allow_media_outside=allow_media_outside)


def resolve_sources(request: PartitionRequest) -> list[Source]:
    seen: set[str] = set()
    out = []
    for name in request.datasets:
        if name in seen:
            raise ConfigError.invalid("dataset", name, "is given twice", fix="name each dataset once")
        seen.add(name)
        out.append(resolve_source(name, columns=request.columns, seed=request.seed, allow_media_outside=request.allow_media_outside))
    return out


@dataclass
class ClientPlan:
    id: int
    kind: str  # image | audio | text | mixed
    modalities: list[str]
    picks: dict[str, list[tuple[int, int]]]  # modality -> [(source index, row index)]

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.picks.values())


@dataclass
class Plan:
    request: PartitionRequest
    sources: list[Source]
    clients: list[ClientPlan]
    test: dict[str, list[tuple[int, int]]]
    pool_rows: dict[str, int]

    def label(self, s: int, i: int) -> str:
        return self.sources[s].labels(self.request.label_column)[i]

    @property
    def total_rows(self) -> int:
        return sum(c.count for c in self.clients) + sum(len(v) for v in self.test.values())


def _sub_seed(seed: int, *salt: int) -> int:
    # Independent, reproducible streams per modality and purpose (test draw vs. client split).
    return int(np.random.SeedSequence([seed, *salt]).generate_state(1)[0])


def plan_partition(request: PartitionRequest, sources: list[Source]) -> Plan:
    """Choose test rows and client shards (indices only; no media read). Deterministic in the seed."""
    present = [m for m in MODALITIES if any(s.modality == m for s in sources)]
    clients: list[ClientPlan] = []
    for kind, count in request.clients:
        if kind == "mixed":
            mods = present
        elif kind not in present:
            hint = {"image": "easy-vqa", "audio": "spoken-qa", "text": "text-qa"}[kind]
            raise UsageError(
                f"--clients asks for {kind} clients but no {kind} dataset is given (have: {', '.join(present)})",
                fix=f"add --dataset {hint} or drop {kind}:{count} from --clients",  # (partition is a CLI-only command)
            )
        else:
            mods = [kind]
        for _ in range(count):
            clients.append(ClientPlan(id=len(clients), kind=kind, modalities=list(mods), picks={m: [] for m in mods}))
    used = [m for m in present if any(m in c.modalities for c in clients)]
    test: dict[str, list[tuple[int, int]]] = {}
    pool_rows: dict[str, int] = {}
    for mi, m in enumerate(used):
        entries = [(si, i, int(r)) for si, s in enumerate(sources) if s.modality == m for i, r in enumerate(s.roles)]
        names = ", ".join(s.name for s in sources if s.modality == m)
        if not entries:
            raise DataError(f"the {m} datasets ({names}) are empty", fix="check the dataset paths")
        for si in {e[0] for e in entries}:
            sources[si].labels(request.label_column)  # fail now on a missing --label-column
        cand = [k for k, e in enumerate(entries) if e[2] in (TEST, EITHER)]
        if request.test_per_modality > len(cand):
            raise DataError(
                f"--test-per-modality {request.test_per_modality} but the {m} data ({names}) has only {len(cand)} test candidates",
                fix=f"use --test-per-modality {len(cand)} or less",
            )
        rng = np.random.default_rng(_sub_seed(request.seed, 1, mi))
        chosen = set(np.sort(rng.choice(cand, size=request.test_per_modality, replace=False)).tolist())
        test[m] = [(entries[k][0], entries[k][1]) for k in sorted(chosen)]
        train = [e for k, e in enumerate(entries) if k not in chosen and e[2] in (TRAIN, EITHER)]
        pool_rows[m] = len(train)
        holders = [c for c in clients if m in c.modalities]
        if request.train_per_client is None:
            sizes = None
        else:  # a mixed client spreads its quota evenly over its modalities
            sizes = [even_sizes(request.train_per_client, len(c.modalities))[c.modalities.index(m)] for c in holders]
            if min(sizes) < 1:
                raise UsageError(
                    f"--train-per-client {request.train_per_client} is too small to give mixed clients every modality",
                    fix=f"use --train-per-client {len(present)} or more",
                )
        labels = [sources[si].labels(request.label_column)[i] for si, i, _r in train]
        try:
            parts = partition_indices(
                labels, len(holders), scheme=request.scheme, alpha=request.alpha, sizes=sizes, seed=_sub_seed(request.seed, 2, mi)
            )
        except DataError as exc:
            raise DataError(f"{m} training data ({names}, {len(train)} rows after the test split): {exc.problem}", fix=exc.fix) from exc
        for c, idx in zip(holders, parts):
            c.picks[m] = [(train[k][0], train[k][1]) for k in idx.tolist()]
    return Plan(request=request, sources=sources, clients=clients, test=test, pool_rows=pool_rows)


def _by_source(picks: list[tuple[int, int]]) -> dict[int, list[int]]:
    by_source: dict[int, list[int]] = {}
    for s, i in picks:
        by_source.setdefault(s, []).append(i)
    return by_source


def _check_media(plan: Plan) -> None:
    """Every chosen media path confined and a regular file, before anything is written (fetch re-checks)."""
    picks = [p for rows in plan.test.values() for p in rows] + [p for c in plan.clients for rows in c.picks.values() for p in rows]
    for s, idx in _by_source(picks).items():
        if plan.sources[s].check is not None:
            plan.sources[s].check(idx)


def _materialise(plan: Plan, picks: list[tuple[int, int]], progress: Progress | None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for s, idx in _by_source(picks).items():  # one fetch per source: spoken-qa synthesises a batch in parallel
        for i, row in zip(idx, plan.sources[s].fetch(idx, progress)):
            row["label"] = plan.label(s, i)
            rows.append(row)
    return rows


def summary(plan: Plan) -> dict[str, Any]:
    """The content of ``partition.json`` (no timestamps: same inputs and seed → same bytes)."""
    req = plan.request
    clients = []
    for c in plan.clients:
        labels = [plan.label(s, i) for m in c.modalities for s, i in c.picks[m]]
        arr = np.arange(len(labels))
        clients.append(
            {
                "id": c.id,
                "kind": c.kind,
                "dir": f"clients/{c.id}",
                "modalities": c.modalities,
                "count": c.count,
                "counts": {m: len(c.picks[m]) for m in c.modalities},
                "label_entropy_bits": round(label_entropy(labels, arr), 4),
                "label_histogram": label_histogram(labels, arr),
            }
        )
    modalities = {
        m: {
            "datasets": [s.name for s in plan.sources if s.modality == m],
            "clients": [c.id for c in plan.clients if m in c.modalities],
            "train_rows": sum(len(c.picks.get(m, [])) for c in plan.clients),
            "train_pool_rows": plan.pool_rows[m],
            "test_dir": f"test/{m}",
            "test_rows": len(rows),
        }
        for m, rows in plan.test.items()
    }
    return {
        "format_version": FORMAT_VERSION,
        "scheme": req.scheme,
        "alpha": req.alpha if req.scheme != "iid" else None,
        "seed": req.seed,
        "label_column": req.label_column or "answer",
        "train_per_client": req.train_per_client,
        "test_per_modality": req.test_per_modality,
        "clients_spec": ",".join(f"{k}:{n}" for k, n in req.clients),
        "sources": [s.describe() for s in plan.sources],
        "modalities": modalities,
        "clients": clients,
    }


# partition.json is read back by the server (expected clients) and may have been edited or replaced by
# anyone with access to the workspace: the fields readers use are checked, one line per problem.
_FIX_PARTITION = "re-run 'uniflow partition --force' (or restore the file)"


def _bad(where: str, name: str, value: Any, rule: str) -> DataError:
    return DataError(f"{where}: {name}={value!r} {rule}", fix=_FIX_PARTITION)


def _count(where: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _bad(where, name, value, "must be an integer >= 0")


def _modalities(where: str, name: str, value: Any) -> None:
    if not isinstance(value, list) or not all(isinstance(m, str) and m in MODALITIES for m in value):
        raise _bad(where, name, value, f"must be a list of modality names ({', '.join(MODALITIES)})")


def _client_id(where: str, name: str, value: Any) -> str:
    try:
        return check_id(value)
    except UnsafeInputError:
        raise _bad(where, name, value, f"is not a client id ({ID_RULE}, or an integer >= 0)") from None


def _check_client(where: str, k: int, c: Any) -> str:
    if not isinstance(c, dict):
        raise _bad(where, f"clients[{k}]", c, "must be an object with an id")
    cid = _client_id(where, f"clients[{k}].id", c.get("id"))
    if "modalities" in c:
        _modalities(where, f"clients[{k}].modalities", c["modalities"])
    if "count" in c:
        _count(where, f"clients[{k}].count", c["count"])
    counts = c.get("counts", {})
    if not isinstance(counts, dict):
        raise _bad(where, f"clients[{k}].counts", counts, "must be an object {modality: rows}")
    for m, n in counts.items():
        _modalities(where, f"clients[{k}].counts key", [m])
        _count(where, f"clients[{k}].counts.{m}", n)
    return cid


def _check_modality(where: str, m: Any, d: Any) -> None:
    _modalities(where, "modalities key", [m])
    if not isinstance(d, dict):
        raise _bad(where, f"modalities.{m}", d, "must be an object")
    for name in ("train_rows", "train_pool_rows", "test_rows"):
        if name in d:
            _count(where, f"modalities.{m}.{name}", d[name])
    ids = d.get("clients", [])
    if not isinstance(ids, list):
        raise _bad(where, f"modalities.{m}.clients", ids, "must be a list of client ids")
    for j, cid in enumerate(ids):
        _client_id(where, f"modalities.{m}.clients[{j}]", cid)


def check_partition_info(info: Any, where: str = "partition.json") -> dict[str, Any]:
    """``info`` (a parsed ``partition.json``) if the fields readers use are well typed, else DataError.

    ``clients``: objects with a plain, unique ``id`` (a string or an int >= 0), known ``modalities`` and
    counts >= 0; ``modalities``: known names with client ids and row counts. The rest is descriptive."""
    if not isinstance(info, dict):
        raise DataError(f"{where} holds a JSON {type(info).__name__}, not an object", fix=_FIX_PARTITION)
    clients = info.get("clients", [])
    if not isinstance(clients, list):
        raise _bad(where, "clients", clients, "must be a list of objects")
    seen: set[str] = set()
    for k, c in enumerate(clients):
        cid = _check_client(where, k, c)
        if cid in seen:
            raise _bad(where, f"clients[{k}].id", c["id"], "is listed twice")
        seen.add(cid)
    modalities = info.get("modalities", {})
    if not isinstance(modalities, dict):
        raise _bad(where, "modalities", modalities, "must be an object keyed by modality")
    for m, d in modalities.items():
        _check_modality(where, m, d)
    return info


def read_partition_info(path: Path) -> dict[str, Any]:
    """A ``partition.json`` read safely (regular file, size-capped) and checked by :func:`check_partition_info`."""
    try:
        info = json.loads(read_regular(Path(path)))
    except FileNotFoundError:
        raise DataError(f"no partition summary at {path}", fix="run 'uniflow partition' first") from None
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or UTF-8
        raise DataError(f"{path} is unreadable ({exc})", fix=_FIX_PARTITION) from None
    return check_partition_info(info, str(path))


def write_partition(
    plan: Plan, out: Path, *, force: bool = False, plot: bool = False, progress: Progress | None = None
) -> dict[str, Any]:
    """Materialise the plan into ``out`` (``clients/<k>/``, ``test/<modality>/``, ``partition.json``
    and, with ``plot``, ``partition.png``), published in one atomic rename. Returns the summary."""
    import datasets

    from uniflow_cli.atomic import publish_dir
    from uniflow_cli.data.schema import rows_to_dataset

    datasets.disable_progress_bars()
    info = check_partition_info(summary(plan))  # the ids and names we write are the ones readers accept
    _check_media(plan)
    with publish_dir(Path(out), force=force, replaces=is_partition_dir, kind="uniflow partition (a directory with partition.json)") as tmp:
        for m, picks in plan.test.items():
            rows_to_dataset(_materialise(plan, picks, progress)).save_to_disk(str(tmp / "test" / m))
        for c in plan.clients:
            picks = [p for m in c.modalities for p in c.picks[m]]
            rows_to_dataset(_materialise(plan, picks, progress)).save_to_disk(str(tmp / "clients" / str(c.id)))
        (tmp / "partition.json").write_text(json.dumps(info, indent=2) + "\n")
        if plot:
            from uniflow_cli.data.plot import plot_label_shares

            plot_label_shares(info, tmp / "partition.png")
    return info


def is_partition_dir(path: Path) -> bool:
    """What ``partition --force`` may replace: an earlier partition's directory (it holds partition.json)."""
    from uniflow_cli.paths import is_real_dir, regular_file_problem

    return is_real_dir(path) and regular_file_problem(Path(path) / "partition.json") is None


def check_plan_labels(plan: Plan, labels: list[str]) -> None:
    """A classify workspace's partition: every chosen row (shards and test sets) is text, its answer one of
    ``labels`` (the model's classes); else one line before anything is written."""
    known = set(labels)
    picks = [pick for c in plan.clients for rows in c.picks.values() for pick in rows] + [p for rows in plan.test.values() for p in rows]
    for s, i in sorted(set(picks)):
        source = plan.sources[s]
        answer = source.answers[i].strip()
        if source.modality != "text" or answer not in known:
            what = f"is {source.modality}" if source.modality != "text" else f"has label {answer!r}"
            raise DataError(f"dataset {source.name}: row {i} {what}, but the workspace's classify model reads text labelled "
                            f"{', '.join(labels)}", fix="partition a text dataset with these labels (--answer-column names the class column), "
                            f"or initialise a workspace whose --labels include {answer!r}")


def partition(
    request: PartitionRequest, out: Path, *, force: bool = False, plot: bool = False, progress_factory=None
) -> dict[str, Any]:
    """The whole ``uniflow partition``: check the target, load, plan, write. ``progress_factory(total)``
    returns an ``advance(n)`` callback (the CLI's rich progress bar)."""
    from uniflow_cli.atomic import check_writable_target
    from uniflow_cli.errors import OutputExistsError

    if Path(out).exists() and not force:  # existing data is an error before any work
        raise OutputExistsError(
            f"data directory {out} already exists (an earlier partition)",
            fix="replace it (--force), or choose another output directory",
        )
    for name in [*request.datasets, *request.allow_media_outside]:
        relation = overlap(out, name) if Path(name).exists() else None
        if relation in ("is", "contains"):  # replacing the output would delete the dataset it is made from
            raise worded(UsageError, "{out} {path} {relation} the dataset {name}", "write the partition to its own directory", path=out, relation=relation, name=name)
    check_writable_target(Path(out), force=force, replaces=is_partition_dir, kind="uniflow partition (a directory with partition.json)")
    plan = plan_partition(request, resolve_sources(request))
    if request.labels is not None:
        check_plan_labels(plan, request.labels)
    progress = progress_factory(plan.total_rows) if progress_factory else None
    return write_partition(plan, out, force=force, plot=plot, progress=progress)


def load_split(path: str | Path):
    """A client shard or test split written by ``uniflow partition``, as a ``datasets.Dataset``."""
    import datasets

    path = Path(path)
    if not path.is_dir():
        raise DataError(f"no dataset directory at {path}", fix="run 'uniflow partition' first, or check the path")
    if not (path / "state.json").is_file():
        raise DataError(
            f"{path} is not a saved dataset (no state.json)", fix="point to data/clients/<k> or data/test/<modality>"
        )
    datasets.disable_progress_bars()
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}/state.json is unreadable: {exc}", fix="re-create it with 'uniflow partition'") from exc
    if not state.get("_data_files"):  # datasets saves an empty dataset as zero shards
        raise DataError(f"dataset {path} is empty (0 rows)", fix="re-run 'uniflow partition' with more data per client")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # missing/corrupt arrow shards surface as many exception types
        raise DataError(f"cannot load dataset {path}: {str(exc).splitlines()[0]}", fix="re-create it with 'uniflow partition'") from exc
    missing = [c for c in COLUMNS if c not in ds.column_names and c not in OPTIONAL_COLUMNS]
    if missing:
        raise DataError(
            f"{path} lacks column(s) {', '.join(missing)} (present: {', '.join(ds.column_names)})",
            fix="re-create it with 'uniflow partition'",
        )
    if len(ds) == 0:
        raise DataError(f"dataset {path} is empty (0 rows)", fix="re-run 'uniflow partition' with more data per client")
    _check_embedded(ds, path)
    return _with_optional_columns(ds, path)


def _with_optional_columns(ds: Any, path: Path) -> Any:
    """``ds`` with ``text_pair`` checked to be strings, or added as all None to a shard written before it existed
    (so every consumer sees one schema)."""
    import datasets

    from uniflow_cli.data.schema import features

    want = features()
    for col in OPTIONAL_COLUMNS:
        feat = ds.features.get(col)
        if feat is None:
            ds = ds.add_column(col, [None] * len(ds), feature=want[col])
        elif isinstance(feat, datasets.Value) and feat.dtype == "null":  # every value None, as a hand-made shard may type it
            ds = ds.cast_column(col, want[col])
        elif feat != want[col]:
            raise DataError(f"{path}: column {col!r} is {feat!r}, not text", fix="re-create it with 'uniflow partition'")
    return ds


def _check_embedded(ds: Any, path: Path) -> None:
    """A shard embeds its media. A shard that names a path (or URL) instead would make ``datasets`` open it
    on read, so a copied or edited shard could pull in any file; and decoded audio needs torchcodec."""
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc

    for col, kind in (("image", datasets.Image), ("audio", datasets.Audio)):
        feat, column = ds.features[col], ds.data.column(col)
        if not isinstance(feat, kind) or (col == "audio" and feat.decode) or not (
            pa.types.is_struct(column.type) and column.type.get_field_index("bytes") >= 0
        ):
            raise DataError(f"{path}: column {col!r} is {feat!r}, not embedded {col} bytes", fix="re-create it with 'uniflow partition'")
        unembedded = pc.and_(pc.is_valid(column), pc.is_null(pc.struct_field(column, "bytes")))
        if pc.any(unembedded).as_py():
            row = pc.index(unembedded, True).as_py()
            raise DataError(
                f"{path}: row {row + 1} holds a path to its {col}, not the embedded bytes a shard carries", fix="re-create it with 'uniflow partition'"
            )
