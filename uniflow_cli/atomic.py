"""Publish a directory atomically: build it in a hidden sibling, fsync, then rename into place.

Readers of shared storage must never see a half-written result, and a failure must leave nothing
behind and overwrite nothing. Any command that writes an output directory goes through
:func:`publish_dir`. Hidden (dot-prefixed) directories are by convention unfinished and ignored.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from uniflow_cli.errors import OutputExistsError, UniflowError, worded

# A hidden temp sibling older than this whose writer no longer holds its lock was left by a killed run.
STALE_TEMP_SECONDS = 60.0
Replaces = Callable[[Path], bool]


def check_writable_target(final: Path, *, force: bool, replaces: Replaces | None = None, kind: str = "uniflow output") -> None:
    """Fail early (before any work) if ``final`` exists and may not be replaced, or its parent is unusable.

    ``--force`` replaces only what ``replaces(final)`` recognises as an earlier output of the same kind
    (e.g. a global adapter); anything else — a dataset, an input, a symlink — is never replaced.
    """
    final = Path(final)
    if os.path.lexists(final):
        if not force:
            raise worded(OutputExistsError, "output {path} already exists", "choose another output or pass {force} to replace it", path=final)
        if final.is_symlink() or (replaces is not None and not replaces(final)):
            raise OutputExistsError(
                f"output {final} exists and is not a {kind}; refusing to replace it, even with --force",
                fix="choose another output path",
            )
    parent = _nearest_existing(final.parent)
    if not parent.is_dir():
        raise UniflowError(f"cannot write {final}: {parent} is not a directory", fix="choose another output path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UniflowError(f"cannot write {final}: {parent} is not writable", fix="choose another output path or fix its permissions")


def _nearest_existing(path: Path) -> Path:
    path = Path(path)
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would briefly change it for every thread)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_umask(root: Path) -> None:
    """Give every file 0666 and every directory 0777 less the umask (some writers create files 0600)."""
    mask = _umask()
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o666 & ~mask)


def _lock(fd: int) -> None:
    with contextlib.suppress(OSError):  # file systems without flock: stale cleanup then relies on age alone
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def clean_stale_temps(final: Path, *, older_than: float = STALE_TEMP_SECONDS) -> list[Path]:
    """Remove the hidden temp siblings of ``final`` (``.name.tmp-*``, ``.name.old-*``) that a killed run left.

    A temp is stale when it is older than ``older_than`` seconds and no live writer holds its lock.
    Only real files/directories directly beside ``final`` are touched; symlinks are left alone.
    """
    final = Path(final)
    removed: list[Path] = []
    try:
        entries = list(final.parent.iterdir())
    except OSError:
        return removed
    prefixes = (f".{final.name}.tmp-", f".{final.name}.old-")
    for entry in entries:
        if not entry.name.startswith(prefixes):
            continue
        try:
            info = os.lstat(entry)
        except OSError:
            continue
        if stat.S_ISLNK(info.st_mode) or time.time() - info.st_mtime < older_than:
            continue
        try:
            fd = os.open(entry, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live writer holds it
            except OSError:
                pass
            if stat.S_ISDIR(info.st_mode):
                shutil.rmtree(entry, ignore_errors=True)
            elif stat.S_ISREG(info.st_mode):
                entry.unlink(missing_ok=True)
            removed.append(entry)
        finally:
            os.close(fd)
    return removed


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
def publish_dir(final: Path, *, force: bool = False, replaces: Replaces | None = None, kind: str = "uniflow output") -> Iterator[Path]:
    """Yield a hidden temporary directory next to ``final``; on success move it to ``final``.

    On any exception the temporary directory is removed and ``final`` is untouched. With ``force`` an
    existing ``final`` is replaced only after the new content is complete (moved aside, then deleted),
    and only if ``replaces`` recognises it (see :func:`check_writable_target`). Temp dirs that earlier
    killed runs left beside ``final`` are removed first.
    """
    final = Path(final)
    check_writable_target(final, force=force, replaces=replaces, kind=kind)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UniflowError(
            f"cannot create {final.parent}: {exc.strerror}", fix="check that the directory is writable"
        ) from exc
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:12]}"
    clean_stale_temps(final)
    try:
        tmp.mkdir()
    except OSError as exc:
        raise UniflowError(
            f"cannot write into {final.parent}: {exc.strerror}", fix="check that the directory is writable"
        ) from exc
    lock_fd = os.open(tmp, os.O_RDONLY)
    _lock(lock_fd)  # tells a concurrent run's stale-temp cleanup that this temp is alive
    try:
        yield tmp
        _apply_umask(tmp)
        _fsync_tree(tmp)
        if os.path.lexists(final):
            if not force:  # somebody else published while we worked: never overwrite
                raise worded(OutputExistsError,
                    "output {path} appeared while writing", "another process published it; use {force} to replace", path=final
                )
            check_writable_target(final, force=force, replaces=replaces, kind=kind)
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:12]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        os.close(lock_fd)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


class StagedFile:
    """A file written completely (fsynced) into a hidden temp beside ``path``, renamed into place by
    :meth:`commit`. Lets a command prepare every output first and publish with renames only, so nothing
    after the first publish can fail for lack of space or permissions."""

    def __init__(self, path: Path, data: bytes, *, force: bool = False, replaces: Replaces | None = None, kind: str = "uniflow output") -> None:
        self.path, self.force, self.replaces, self.kind = Path(path), force, replaces, kind
        check_writable_target(self.path, force=force, replaces=replaces, kind=kind)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(self.path)
        self.tmp = self.path.parent / f".{self.path.name}.tmp-{uuid.uuid4().hex[:12]}"
        self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            _lock(self._fd)
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
        except BaseException:
            self.discard()
            raise

    def commit(self) -> None:
        if os.path.lexists(self.path):
            if not self.force:
                self.discard()
                raise worded(OutputExistsError, "output {path} appeared while writing", "another process wrote it; use {force} to replace", path=self.path)
            check_writable_target(self.path, force=True, replaces=self.replaces, kind=self.kind)
        os.replace(self.tmp, self.path)
        self._close()
        _fsync_dir(self.path.parent)

    def discard(self) -> None:
        self._close()
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def write_file_atomic(path: Path, data: bytes, *, force: bool = False, replaces: Replaces | None = None, kind: str = "uniflow output") -> None:
    """Write a single file atomically (temp file in the same directory, fsync, rename)."""
    staged = StagedFile(path, data, force=force, replaces=replaces, kind=kind)
    try:
        staged.commit()
    except BaseException:
        staged.discard()
        raise
