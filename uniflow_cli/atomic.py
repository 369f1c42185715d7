"""Publish a directory atomically: build it in a hidden sibling, fsync, then rename into place.

Readers of shared storage must never see a half-written result, and a failure must leave nothing
behind and overwrite nothing. Any command that writes an output directory goes through
:func:`publish_dir`. Hidden (dot-prefixed) directories are by convention unfinished and ignored.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from uniflow_cli.errors import OutputExistsError, UniflowError


def check_writable_target(final: Path, *, force: bool) -> None:
    """Fail early (before any work) if ``final`` exists and ``force`` is off, or its parent is unusable."""
    final = Path(final)
    if final.exists() and not force:
        raise OutputExistsError(
            f"output {final} already exists", fix="choose another --out or pass --force to replace it"
        )
    parent = final.parent
    if parent.exists() and not parent.is_dir():
        raise UniflowError(f"cannot write {final}: {parent} is not a directory", fix="choose another output path")


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories; durability is best effort there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # fsync on a directory is unsupported on some network filesystems; rename is still atomic
    finally:
        os.close(fd)


@contextlib.contextmanager
def publish_dir(final: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary directory next to ``final``; on success move it to ``final``.

    On any exception the temporary directory is removed and ``final`` is untouched. With ``force`` an
    existing ``final`` is replaced only after the new content is complete (moved aside, then deleted).
    """
    final = Path(final)
    check_writable_target(final, force=force)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UniflowError(
            f"cannot create {final.parent}: {exc.strerror}", fix="check that the directory is writable"
        ) from exc
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        tmp.mkdir()
    except OSError as exc:
        raise UniflowError(
            f"cannot write into {final.parent}: {exc.strerror}", fix="check that the directory is writable"
        ) from exc
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists():
            if not force:  # somebody else published while we worked: never overwrite
                raise OutputExistsError(
                    f"output {final} appeared while writing", fix="another process published it; use --force to replace"
                )
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:12]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_file_atomic(path: Path, data: bytes, *, force: bool = False) -> None:
    """Write a single file atomically (temp file in the same directory, fsync, rename)."""
    path = Path(path)
    check_writable_target(path, force=force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
