"""User datasets: JSONL/JSON/CSV/parquet files, ``save_to_disk`` directories, image/audio folders.

Tables are read with ``datasets``; a row needs a question and an answer column, has at most one media
column (image or audio) and, for sentence pairs (NLI), may carry a ``text_pair`` column (the second
text). Media paths are relative to the file (or folder) that names them. Audio is never decoded by
``datasets`` (that needs torchcodec): it is read with soundfile and stored as 16 kHz mono WAV. Only
the rows a partition selects are read, so one unreadable file elsewhere does not stop a partition; a
selected one stops it with the file and row.

A dataset is untrusted: its media paths, resolved (symlinks followed), must lie under the dataset's
directory or an ``allow_media_outside`` root, and name regular files (a FIFO would hang the reader,
a device never ends), so ``../../home/me/.ssh/id_rsa`` is never embedded into a shard.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from uniflow_cli.data.schema import make_row
from uniflow_cli.data.source import EITHER, TEST, TRAIN, Progress, Source
from uniflow_cli.errors import DataError, UnsafeInputError
from uniflow_cli.paths import read_regular, regular_file_problem

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
AUDIO_EXTS = {".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif"}
TABLE_EXTS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_SPLIT_ROLES = {"train": TRAIN, "test": TEST, "validation": TEST, "valid": TEST, "eval": TEST}
MAX_MEDIA_BYTES = 256 * 1024 * 1024  # one image or clip; anything larger is a mistake, not a sample
MAX_TEXT_CHARS = 1 << 20  # one question or text_pair (~a book chapter); anything larger is a mistake, not a sample


@dataclass
class Columns:
    """Column names of a user dataset (``--question-column`` etc.)."""

    question: str = "question"
    answer: str = "answer"
    media: str | None = None  # None: "image", else "audio", else "file_name" (folders), else text-only
    text_pair: str = "text_pair"  # the second text of a sentence pair; optional (absent: None in every row)


@dataclass
class _Part:
    role: int
    ds: Any  # datasets.Dataset
    base: Path  # relative media paths resolve against this directory
    origin: str  # file name used in error messages


def _read_table(path: Path):
    import datasets

    datasets.disable_progress_bars()
    kind = TABLE_EXTS[path.suffix.lower()]
    try:
        # keep_in_memory: no cache files written into ~/.cache/huggingface for a one-off read
        if kind == "json":
            return datasets.Dataset.from_json(str(path), keep_in_memory=True)
        if kind == "csv":
            return datasets.Dataset.from_csv(str(path), keep_in_memory=True)
        return datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
    except Exception as exc:  # datasets wraps parser errors in many types; the message is what matters
        msg = str(exc).lower()
        if "empty" in msg or "no data" in msg or not path.read_bytes().strip():
            raise DataError(f"dataset {path} is empty (0 rows)", fix="add rows with question and answer") from exc
        raise DataError(f"cannot read {path}: {str(exc).splitlines()[0]}", fix=f"check that it is valid {kind}") from exc


def _folder_parts(root: Path) -> list[_Part] | None:
    """imagefolder/audiofolder layout: metadata.{jsonl,csv,parquet} beside the files (or in train/, test/)."""

    def meta(d: Path) -> Path | None:
        for name in ("metadata.jsonl", "metadata.csv", "metadata.parquet"):
            if (d / name).is_file():
                return d / name
        return None

    if meta(root):
        m = meta(root)
        return [_Part(EITHER, _read_table(m), root, str(m))]
    parts = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and p.name in _SPLIT_ROLES):
        m = meta(sub)
        if m:
            parts.append(_Part(_SPLIT_ROLES[sub.name], _read_table(m), sub, str(m)))
    return parts or None


def _parts(path: Path) -> tuple[list[_Part], bool]:
    """The tables of a dataset path and whether it is a media folder (media column ``file_name``)."""
    import datasets

    if path.is_file():
        if path.suffix.lower() not in TABLE_EXTS:
            raise DataError(
                f"unsupported dataset file {path}", fix="use .jsonl, .json, .csv or .parquet, or a save_to_disk directory"
            )
        return [_Part(EITHER, _read_table(path), path.parent, str(path))], False
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            return [_Part(_SPLIT_ROLES.get(k, EITHER), v, path, f"{path} [{k}]") for k, v in loaded.items()], False
        return [_Part(EITHER, loaded, path, str(path))], False
    folder = _folder_parts(path)
    if folder:
        return folder, True
    raise DataError(
        f"{path} is neither a save_to_disk dataset nor a folder with metadata.jsonl/csv/parquet",
        fix="add a metadata.jsonl (file_name, question, answer) or pass a .jsonl/.csv/.parquet file",
    )


def _modality_of(part: _Part, column: str) -> str:
    import datasets

    feat = part.ds.features[column]
    if isinstance(feat, datasets.Image):
        return "image"
    if isinstance(feat, datasets.Audio):
        return "audio"
    for value in part.ds[column]:
        name = value.get("path") if isinstance(value, dict) else value
        if name is None or name == "" or isinstance(name, (bytes, bytearray)):
            continue
        if not isinstance(name, str):
            raise DataError(f"media column {column!r} of {part.origin} holds {name!r}, not a file name", fix="write file paths as strings")
        ext = Path(name).suffix.lower()
        if ext in IMAGE_EXTS:
            return "image"
        if ext in AUDIO_EXTS:
            return "audio"
        raise DataError(
            f"media column {column!r} of {part.origin} holds {name!r}, neither an image nor an audio file",
            fix=f"use image files ({', '.join(sorted(IMAGE_EXTS))}) or audio files ({', '.join(sorted(AUDIO_EXTS))})",
        )
    raise DataError(f"media column {column!r} of {part.origin} is empty in every row", fix="fill it or drop --media-column")


def _undecoded(part: _Part, column: str) -> None:
    import datasets

    feat = part.ds.features[column]
    if isinstance(feat, datasets.Image) and feat.decode:
        part.ds = part.ds.cast_column(column, datasets.Image(decode=False))
    elif isinstance(feat, datasets.Audio) and feat.decode:
        part.ds = part.ds.cast_column(column, datasets.Audio(decode=False))


@dataclass
class _Media:
    """Where the media of a dataset may come from: its modality, and the resolved allowed roots."""

    modality: str
    roots: list[Path]  # first: the dataset's own directory

    def fail(self, value: Any, part: _Part, r: int, problem: str, fix: str) -> DataError:
        return DataError(f"unreadable {self.modality} {value!r} (row {r + 1} of {part.origin}): {problem}", fix=fix)

    def file(self, value: Any, part: _Part, r: int) -> Path:
        """The regular file a path names, resolved and confined to ``roots`` (checked before any read)."""
        if not value or not isinstance(value, str):
            raise self.fail(value, part, r, "no media file name", fix="fill the media column or drop the row")
        try:
            real = (Path(value) if Path(value).is_absolute() else part.base / value).resolve()
        except (OSError, RuntimeError, ValueError) as exc:  # symlink loop, NUL byte
            raise self.fail(value, part, r, f"cannot be resolved ({exc})", fix="fix the path or drop the row") from None
        if not any(real.is_relative_to(root) for root in self.roots):
            raise DataError(
                f"{self.modality} path {value!r} (row {r + 1} of {part.origin}) resolves to {real}, "
                f"outside the dataset directory {self.roots[0]}",
                fix=f"move the file under {self.roots[0]}, or pass --allow-media-outside {real.parent} if you trust that directory",
            )
        problem = regular_file_problem(real, follow=True)
        if problem == "is missing":
            raise self.fail(value, part, r, "No such file or directory", fix="fix the path (relative to the dataset file) or drop the row")
        if problem:
            raise self.fail(value, part, r, f"{real} {problem}", fix="replace it by a regular file or drop the row")
        return real

    def read(self, value: Any, part: _Part, r: int) -> tuple[bytes, str]:
        """(bytes, where) of a path / bytes / {"bytes","path"} media value."""
        if isinstance(value, dict):
            if value.get("bytes") is not None:
                return bytes(value["bytes"]), str(value.get("path") or "embedded bytes")
            value = value.get("path")
        if isinstance(value, (bytes, bytearray)):
            return bytes(value), "embedded bytes"
        real = self.file(value, part, r)
        try:  # O_NONBLOCK + fstat again: the file may have been swapped for a FIFO or symlink since file()
            return read_regular(real, limit=MAX_MEDIA_BYTES), str(real)
        except UnsafeInputError as exc:
            raise self.fail(value, part, r, exc.problem, fix="replace it by a regular file or drop the row") from None
        except OSError as exc:
            raise self.fail(value, part, r, exc.strerror or str(exc), fix="fix the path or drop the row") from None

    def check(self, value: Any, part: _Part, r: int) -> None:
        """What :meth:`read` checks before reading, without reading (embedded bytes need no check)."""
        if isinstance(value, dict):
            if value.get("bytes") is not None:
                return
            value = value.get("path")
        if not isinstance(value, (bytes, bytearray)):
            self.file(value, part, r)


def load_user(path: str | Path, columns: Columns | None = None, *, allow_media_outside: Sequence[Path] = ()) -> Source:
    """Load a user dataset as a :class:`Source` (checks columns and emptiness; media read on fetch).

    Media paths must resolve under the dataset's directory (a file's parent, a folder itself) or one of
    ``allow_media_outside``; ``Source.check`` verifies that for chosen rows before anything is written."""
    columns = columns or Columns()
    path = Path(path)
    roots = [p.resolve() for p in (path.parent if path.is_file() else path, *map(Path, allow_media_outside))]
    parts, is_folder = _parts(path)
    media = _media_column(parts, columns, is_folder)
    _check_columns(parts, columns, media)
    if sum(len(p.ds) for p in parts) == 0:
        raise DataError(f"dataset {path} is empty (0 rows)", fix="add rows with question and answer")
    modality = "text"
    if media is not None:
        for part in parts:
            _undecoded(part, media)
        modality = _modality_of(next(p for p in parts if len(p.ds)), media)
    rows = _collect_rows(parts, columns, media)
    name = path.stem if path.is_file() else path.name
    access = _Media(modality, roots)

    def check(indices: Sequence[int]) -> None:
        for i in indices:
            pi, r = rows.where[int(i)]
            access.check(parts[pi].ds[r][media], parts[pi], r)

    return Source(
        name=name,
        modality=modality,
        kind="user",
        questions=rows.questions,
        answers=rows.answers,
        roles=np.array(rows.roles, dtype=np.int8),
        fetch=_fetcher(name, modality, parts, media, rows, access),
        label_columns=rows.extra,
        path=str(path),
        check=check if modality != "text" else None,
    )


def _media_column(parts: Sequence[Any], columns: Columns, is_folder: bool) -> str | None:
    """The media column: as given, else ``image``/``audio`` if present, else a folder's ``file_name``."""
    present = list(parts[0].ds.column_names)
    media = columns.media or next((c for c in ("image", "audio") if c in present), None)
    return "file_name" if media is None and is_folder else media


def _check_columns(parts: Sequence[Any], columns: Columns, media: str | None) -> None:
    need = [c for c in (columns.question, columns.answer, media) if c is not None]
    for part in parts:
        missing = [c for c in need if c not in part.ds.column_names]
        if missing:
            flags = {columns.question: "--question-column", columns.answer: "--answer-column", media: "--media-column"}
            raise DataError(
                f"column(s) {', '.join(repr(c) for c in missing)} missing from {part.origin} "
                f"(present: {', '.join(part.ds.column_names) or 'none'})",
                fix=" and ".join(f"pass {flags[c]} NAME" for c in missing),
            )


@dataclass
class _Rows:
    questions: list[str] = field(default_factory=list)
    pairs: list[str | None] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    roles: list[int] = field(default_factory=list)
    where: list[tuple[int, int]] = field(default_factory=list)  # local index -> (part, row)
    extra: dict[str, list[str]] = field(default_factory=dict)  # scalar columns (labels for partitioning)


def _text(value: Any, column: str, part: _Part, r: int) -> str | None:
    """A text cell as a string (None: empty), typed and size-checked: untrusted tables may hold anything."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):  # numbers: a CSV column typed by datasets
        raise DataError(f"row {r + 1} of {part.origin}: {column!r} holds a {type(value).__name__}, not text", fix="write it as a string")
    text = str(value)
    if len(text) > MAX_TEXT_CHARS:
        raise DataError(f"row {r + 1} of {part.origin}: {column!r} has {len(text):,} characters (at most {MAX_TEXT_CHARS:,})",
                        fix="shorten it or drop the row")
    return text if text.strip() else None


def _collect_rows(parts: Sequence[Any], columns: Columns, media: str | None) -> _Rows:
    """Questions, answers, text pairs and roles of every row (each needs a question and an answer), and the
    scalar columns all parts share (free text — question, text_pair — is never a label)."""
    rows = _Rows()
    present = list(parts[0].ds.column_names)
    texts = (columns.question, columns.text_pair, media)
    scalar_cols = [c for c in present if c not in texts and all(c in p.ds.column_names for p in parts)]
    for pi, part in enumerate(parts):
        qs, ans = part.ds[columns.question], part.ds[columns.answer]
        pairs = part.ds[columns.text_pair] if columns.text_pair in part.ds.column_names else [None] * len(qs)
        for r, (q, a, pair) in enumerate(zip(qs, ans, pairs)):
            q = _text(q, columns.question, part, r)
            if q is None or a is None:
                raise DataError(f"row {r + 1} of {part.origin} has no {columns.question if q is None else columns.answer!r}", fix="fill it or drop the row")
            rows.questions.append(q)
            rows.pairs.append(_text(pair, columns.text_pair, part, r))
            rows.answers.append(str(a))
            rows.roles.append(part.role)
            rows.where.append((pi, r))
        for c in scalar_cols:
            vals = part.ds[c]
            if all(v is None or isinstance(v, (str, int, float, bool)) for v in vals[:100]):
                rows.extra.setdefault(c, []).extend("" if v is None else str(v) for v in vals)
    rows.extra = {c: v for c, v in rows.extra.items() if len(v) == len(rows.questions)}
    return rows


def _fetcher(name: str, modality: str, parts: Sequence[Any], media: str | None, rows: _Rows, access: _Media) -> Callable[..., list[dict]]:
    """``fetch(indices, progress)``: the chosen rows as samples, media read (confined) and fully decoded."""
    from uniflow_cli.data.media import encode_wav, load_audio

    def fetch(indices: Sequence[int], progress: Progress | None = None) -> list[dict]:
        out = []
        for i in indices:
            pi, r = rows.where[int(i)]
            part = parts[pi]
            media_kw: dict[str, bytes] = {}
            if modality != "text":
                data, src = access.read(part.ds[r][media], part, r)
                try:
                    if modality == "image":
                        from PIL import Image

                        with Image.open(io.BytesIO(data)) as im:
                            im.load()  # full decode: a truncated file must fail here, not in training
                        media_kw["image_bytes"] = data
                    else:
                        media_kw["audio_bytes"] = encode_wav(load_audio(data))
                except Exception as exc:
                    raise DataError(
                        f"unreadable {modality} {src} (row {r + 1} of {part.origin}): {str(exc).splitlines()[0]}",
                        fix=f"replace the file with a valid {modality} or drop the row",
                    ) from exc
            out.append(make_row(id=f"{name}-{int(i)}", modality=modality, question=rows.questions[int(i)],
                                answer=rows.answers[int(i)], text_pair=rows.pairs[int(i)], **media_kw))
            if progress:
                progress(1)
        return out

    return fetch
