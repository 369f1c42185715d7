"""The one place that confines untrusted names and paths (the trust boundary of the file layout).

Everything another party wrote is untrusted: a client id on the command line or in a drop's
``uniflow.json``, a directory name under ``rounds/<t>/clients``, a file inside a drop. The rules:

* an id (client, modality, round directory) is a plain name matching :data:`ID_PATTERN`, never ``..``;
* a path derived from an id is resolved (symlinks included) and must lie under its root;
* what should be a regular file is one: opened with ``O_NONBLOCK | O_NOFOLLOW`` and checked with ``fstat``
  before a byte is read, so a FIFO never hangs a reader and a symlink never redirects it;
* reads are size-capped, so a hostile 10 GB ``uniflow.json`` cannot exhaust memory.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

from uniflow_cli.errors import UnsafeInputError

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
ID_RULE = "1-64 characters from A-Z a-z 0-9 _ . -, starting with a letter or digit, no '..'"
MAX_JSON_BYTES = 16 * 1024 * 1024  # uniflow.json / adapter_config.json / partition.json are kilobytes


def is_valid_id(value: object) -> bool:
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None and ".." not in value


def check_id(value: object, what: str = "client id") -> str:
    """``value`` as a safe id (ints are accepted and become their decimal string); else UnsafeInputError."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        value = str(value)
    if not is_valid_id(value):
        raise UnsafeInputError(f"{what} {value!r} is not a plain name", fix=f"use {ID_RULE}")
    return value  # type: ignore[return-value]


def check_round(value: object, what: str = "round") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UnsafeInputError(f"{what} {value!r} must be an integer >= 0", fix="give a round number such as 1")
    return value


def is_within(path: Path, root: Path) -> bool:
    """Whether ``path`` lies under (or is) ``root`` once both are resolved (symlinks followed)."""
    return Path(path).resolve().is_relative_to(Path(root).resolve())


def confined(root: Path, *parts: str) -> Path:
    """``root / parts`` after checking that, resolved, it stays under the resolved ``root``.

    The returned path is the unresolved join (what messages show); a symlinked component that leads
    outside ``root`` is refused before anything is read, created or removed there.
    """
    path = Path(root).joinpath(*parts)
    if not is_within(path, root):
        raise UnsafeInputError(
            f"{path} resolves to {path.resolve()}, outside {Path(root).resolve()}",
            fix="remove the symlink (or '..') that leads out of the workspace",
        )
    return path


def is_real_dir(path: Path) -> bool:
    """A directory that is not a symlink (a drop must be the directory itself, not a link to elsewhere)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def regular_file_problem(path: Path, *, follow: bool = False) -> str | None:
    """Why ``path`` is not a plain regular file (missing, symlink, FIFO, device, directory), or None."""
    try:
        mode = (os.stat if follow else os.lstat)(path).st_mode
    except FileNotFoundError:
        return "is missing"
    except OSError as exc:
        return f"cannot be examined ({exc.strerror})"
    if stat.S_ISLNK(mode):
        return "is a symlink (refused: it could point anywhere)"
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode) else "a device or socket"
        return f"is {kind}, not a regular file"
    return None


def open_regular(path: Path, *, follow: bool = False) -> int:
    """An fd of ``path`` opened read-only without blocking, guaranteed to be a regular file.

    ``O_NONBLOCK`` makes opening a FIFO return at once (then ``fstat`` refuses it); ``O_NOFOLLOW``
    refuses a symlink unless ``follow``. Raises UnsafeInputError or FileNotFoundError.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | (0 if follow else getattr(os, "O_NOFOLLOW", 0))
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeInputError(f"{path} is a symlink (refused: it could point anywhere)", fix="replace it by the file itself") from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        problem = regular_file_problem(path, follow=True) or "is not a regular file"
        raise UnsafeInputError(f"{path} {problem}", fix="replace it by a regular file")
    os.set_blocking(fd, True)
    return fd


def read_regular(path: Path, *, limit: int = MAX_JSON_BYTES, follow: bool = False) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (see :func:`open_regular`)."""
    fd = open_regular(path, follow=follow)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise UnsafeInputError(f"{path} is {size} bytes, more than the {limit} this file may have", fix="re-create it")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            total += len(chunk)
            if total > limit:  # grew while we read it
                raise UnsafeInputError(f"{path} is larger than {limit} bytes", fix="re-create it")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def overlap(a: Path, b: Path) -> str | None:
    """How two paths overlap once resolved: "is", "lies inside", "contains", or None when apart."""
    ra, rb = Path(a).resolve(), Path(b).resolve()
    if ra == rb:
        return "is"
    if ra.is_relative_to(rb):
        return "lies inside"
    if rb.is_relative_to(ra):
        return "contains"
    return None
