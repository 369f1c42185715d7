"""File-drop federation over shared storage: waiting for drops, quorum, the round lock, and status.

Everything here is plain files in the workspace, so any shared file system (NFS, SMB, a synced folder)
works: drops are published atomically by clients (hidden temp dir → rename), the server accepts only
complete drops whose sha256 matches, and a lock file ``rounds/<t>/.aggregate.lock`` makes sure exactly
one server publishes a round.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uniflow_cli.adapters import META_FILE, open_adapter, scan_adapter_dirs
from uniflow_cli.errors import AdapterError, ConfigError, UniflowError, UnsafeInputError, WorkspaceError
from uniflow_cli.global_info import GlobalInfo
from uniflow_cli.paths import ID_RULE, is_valid_id, open_regular, read_regular
from uniflow_cli.workspace import Workspace

LOCK_NAME = ".aggregate.lock"
DEFAULT_STALE_SECONDS = 3600.0


class QuorumError(UniflowError):
    """Not enough valid client drops arrived before the timeout."""


class LockedError(UniflowError):
    """Another server holds the round's lock."""


def expected_clients(ws: Workspace) -> list[str]:
    """Client ids the partition created (``data/partition.json``); empty when unknown."""
    path = ws.partition_json
    if not os.path.lexists(path):
        return []
    fix = "re-run 'uniflow partition --force'"
    try:
        info = json.loads(read_regular(path).decode("utf-8"))
    except UnsafeInputError as exc:
        raise WorkspaceError(exc.problem, fix=fix) from None
    except (OSError, ValueError, RecursionError) as exc:
        raise WorkspaceError(f"{path} is unreadable ({str(exc)[:120]})", fix=fix) from None
    clients = info.get("clients", []) if isinstance(info, dict) else None
    if not isinstance(clients, list):
        raise WorkspaceError(f"{path}: 'clients' must be a list", fix=fix)
    ids = []
    for entry in clients:
        raw = entry.get("id") if isinstance(entry, dict) else entry
        if not (isinstance(raw, str) and is_valid_id(raw)) and not (isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0):
            raise WorkspaceError(f"{path}: client id {str(raw)[:40]!r} is not a plain name ({ID_RULE})", fix=fix)
        ids.append(str(raw))
    return ids


def _seconds(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_wait_options(timeout: float, poll: float) -> None:
    """``timeout`` finite and >= 0 (NaN would never time out), ``poll`` finite and > 0 (no busy loop).

    Library terms (the fields ``timeout``/``poll``): the CLI tells them as its ``--timeout``/``--poll``."""
    if not (_seconds(timeout) and timeout >= 0):
        raise ConfigError.invalid("timeout", timeout, "must be a finite number of seconds >= 0", example=600)
    if not (_seconds(poll) and poll > 0):
        raise ConfigError.invalid("poll", poll, "must be a finite number of seconds > 0", example=2)


# --------------------------------------------------------------------------------------------------
# The round lock
# --------------------------------------------------------------------------------------------------
LOCK_LIMIT = 4096  # bytes: a lock of ours is ~120; anything larger is not one


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class LockFile:
    """One lock file as read: its inode and bytes (what a takeover must find unchanged), and its age."""

    dev: int
    ino: int
    data: bytes
    mtime: float

    def same_file(self, other: LockFile | None) -> bool:
        # The bytes carry pid, host, start time and a random token, so a new lock never matches an old
        # one even where the file system reuses the inode number at once (ext4 does).
        return other is not None and (self.dev, self.ino, self.data) == (other.dev, other.ino, other.data)


def read_lock(path: Path) -> LockFile | None:
    """The lock at ``path``, or None when there is none. A symlink, FIFO or oversized file is an
    UnsafeInputError (never a lock a server of ours wrote); other OSErrors pass."""
    try:
        fd = open_regular(path)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        data = os.read(fd, LOCK_LIMIT + 1)
    finally:
        os.close(fd)
    if len(data) > LOCK_LIMIT:
        raise UnsafeInputError(f"{path} is larger than {LOCK_LIMIT} bytes: not a round lock", fix="remove it by hand")
    return LockFile(st.st_dev, st.st_ino, data, st.st_mtime)


def _read_quietly(path: Path) -> LockFile | None:
    try:
        return read_lock(path)
    except (OSError, UniflowError):
        return None


def _put_back(aside: Path, path: Path) -> None:
    """Return a lock moved aside by mistake to ``path`` without ever replacing a lock created meanwhile.

    A hard link is the no-clobber move. Where the file system has none (some SMB mounts) a rename
    after a check is the best left. If a third server locked ``path`` in between, its lock stands;
    the one moved aside is dropped (its holder's ``release`` then finds the lock is not its own)."""
    try:
        try:
            os.link(aside, path, follow_symlinks=False)
        except FileExistsError:
            pass
        except OSError:
            if not os.path.lexists(path):
                os.replace(aside, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(aside)


def remove_if_unchanged(path: Path, seen: LockFile) -> bool | None:
    """Remove the lock at ``path`` only if it is still the file ``seen``: True when removed, False when
    another lock had replaced it (that one is put back), None when nothing was there any more.

    Checking and then unlinking ``path`` would remove whatever lies there *after* the check — another
    server's fresh lock. A rename moves exactly the file that is there at that instant to a name only
    we know; what we moved is then compared with what we judged, at leisure."""
    aside = path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}.aside")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return None
    if seen.same_file(_read_quietly(aside)):
        os.unlink(aside)
        return True
    _put_back(aside, path)
    return False


def lock_is_stale(lock: LockFile, stale_after: float, now: float) -> bool:
    """Its holder ran on this host and is gone, or it is older than ``stale_after`` seconds."""
    try:
        info = json.loads(lock.data or b"{}")
    except ValueError:
        return True  # unreadable lock content: a half-written lock from a killed server
    if not isinstance(info, dict):
        return True
    pid = info.get("pid")
    if info.get("host") == socket.gethostname() and isinstance(pid, int) and not isinstance(pid, bool):
        return not _pid_alive(pid)
    return now - lock.mtime > stale_after


@dataclass
class RoundLock:
    """An exclusive lock file (O_CREAT|O_EXCL works on local and NFSv3+ file systems).

    A lock is stale when its holder ran on this host and is gone, or when it is older than
    ``stale_after`` seconds (a holder on another host that died); a stale lock is taken over with
    :func:`remove_if_unchanged`, so two servers that both judged it stale never remove each other's
    fresh lock: the slower one finds a fresh lock where the stale one was and backs off.
    """

    path: Path
    stale_after: float = DEFAULT_STALE_SECONDS
    notices: list[str] = field(default_factory=list)
    held: bool = False
    _mine: LockFile | None = field(default=None, repr=False)

    def _is_stale(self, lock: LockFile) -> bool:
        return lock_is_stale(lock, self.stale_after, time.time())

    def _take_over_stale(self) -> bool:
        """True when the lock is gone (a stale one removed, or its holder released it): try again."""
        try:
            seen = read_lock(self.path)
        except UnsafeInputError:
            return False  # a FIFO/symlink is not a lock a server of ours wrote: never removed, never read
        except OSError:
            return False  # a lock we cannot read cannot be checked after the move either: leave it
        if seen is None:
            return True
        if not self._is_stale(seen):
            return False
        removed = remove_if_unchanged(self.path, seen)
        if removed:
            self.notices.append(f"removed stale lock {self.path} (its server is gone)")
        return removed is not False

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        data = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "token": uuid.uuid4().hex}).encode()
        try:
            os.write(fd, data)  # one write: a reader sees the lock empty (fresh by its age) or whole
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(self.path)  # only just created, empty or partial (fresh by its age): nobody else's
            raise
        os.close(fd)
        self._mine = LockFile(st.st_dev, st.st_ino, data, st.st_mtime)
        self.held = True
        return True

    def try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            if self._create():
                return True
            if not self._take_over_stale():
                return False
        return False

    def release(self) -> None:
        """Remove our lock — only ours: a lock another server took over (ours looked stale) stays."""
        if not self.held:
            return
        self.held = False
        mine, self._mine = self._mine, None
        # The look first spares the rename dance (and its instant without a lock) when it is plainly not ours.
        if mine is not None and mine.same_file(_read_quietly(self.path)):
            remove_if_unchanged(self.path, mine)


# --------------------------------------------------------------------------------------------------
# Waiting for drops
# --------------------------------------------------------------------------------------------------
@dataclass
class DropScan:
    valid: list[Path]
    rejected: list[tuple[Path, str]]
    missing: list[str]
    unexpected: list[str]


def scan_round(ws: Workspace, t: int, expected: list[str]) -> DropScan:
    valid, rejected = scan_adapter_dirs(ws.clients_dir(t), round_=t)
    names = [p.name for p in valid]
    return DropScan(
        valid=valid,
        rejected=rejected,
        missing=[c for c in expected if c not in names],
        unexpected=[n for n in names if expected and n not in expected],
    )


def wait_for_drops(
    ws: Workspace,
    t: int,
    *,
    expected: list[str],
    min_clients: int,
    timeout: float,
    poll: float = 2.0,
    log: Callable[[str], None] = lambda _m: None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> DropScan:
    """Poll ``rounds/t/clients`` until every expected client dropped, or until ``timeout`` with at least
    ``min_clients`` valid drops (quorum). Invalid drops are logged once with their reason."""
    if not (isinstance(min_clients, int) and not isinstance(min_clients, bool) and min_clients >= 1):
        raise ConfigError.invalid("min_clients", min_clients, "must be >= 1", example=1)
    check_wait_options(timeout, poll)
    deadline = clock() + timeout
    reported: set[tuple[str, str]] = set()
    while True:
        scan = scan_round(ws, t, expected)
        for path, reason in scan.rejected:
            if (path.name, reason) not in reported:
                reported.add((path.name, reason))
                log(f"ignoring drop {path}: {reason}")
        if expected and not scan.missing:
            return scan
        if clock() >= deadline:
            if len(scan.valid) >= min_clients:
                if scan.missing:
                    log(f"timeout: aggregating {len(scan.valid)} drops at quorum; missing clients {', '.join(scan.missing)}")
                return scan
            raise QuorumError(
                f"round {t}: {len(scan.valid)} valid drop(s) after {timeout:g} s, quorum is {min_clients}"
                + (f" (missing clients {', '.join(scan.missing)})" if scan.missing else ""),
                fix="wait longer for more clients (timeout) or lower the quorum (min_clients)",
            )
        sleep(min(poll, max(0.0, deadline - clock())))


def round_published(ws: Workspace, t: int) -> bool:
    return (ws.global_dir(t) / META_FILE).is_file()


def late_drops(ws: Workspace, t: int) -> list[str]:
    """Client drops of a published round that its global does not include (they arrived too late)."""
    meta = open_adapter(ws.global_dir(t), strict=True).meta
    included = set(fused_clients(meta))
    valid, _ = scan_adapter_dirs(ws.clients_dir(t), round_=t)
    return [p.name for p in valid if p.name not in included]


def fused_clients(meta: Any) -> list[str]:
    """The client ids a global's ``uniflow.json`` says it fused (entries of another shape are skipped)."""
    return GlobalInfo.of(meta).client_ids


# --------------------------------------------------------------------------------------------------
# Status
# --------------------------------------------------------------------------------------------------
def workspace_status(ws: Workspace) -> dict[str, Any]:
    """Rounds, who dropped what, what was published, and the metrics evaluated so far."""
    expected = expected_clients(ws)
    rounds = []
    for t in ws.rounds():
        entry: dict[str, Any] = {"round": t, "published": round_published(ws, t)}
        if t > 0:
            scan = scan_round(ws, t, expected)
            entry["dropped"] = [p.name for p in scan.valid]
            entry["invalid"] = [{"client": p.name, "reason": r} for p, r in scan.rejected]
            entry["missing"] = scan.missing
        if entry["published"]:
            try:
                meta = open_adapter(ws.global_dir(t), strict=True).meta
            except AdapterError as exc:
                entry["error"] = str(exc)
                meta = None
            if meta is not None:
                info = GlobalInfo.of(meta)
                entry["method"] = meta.method
                entry["clients"] = info.client_ids
                entry["rel_error_mean"] = info.rel_error_mean
                entry["engine"] = info.engine_name
                if entry["engine"] == "flower" and not entry.get("dropped"):
                    # Flower carried the uploads (nothing was dropped here): missing = not fused into the global.
                    entry["missing"] = [c for c in expected if c not in entry["clients"]]
        eval_path = ws.eval_json(t)
        if os.path.lexists(eval_path):
            try:
                data = json.loads(read_regular(eval_path).decode("utf-8"))
                entry["metrics"] = data.get("metrics") if isinstance(data, dict) else None
            except (OSError, ValueError, UniflowError, RecursionError):
                entry["metrics"] = None
        lock = ws.round_dir(t) / LOCK_NAME
        entry["locked"] = lock.exists()
        rounds.append(entry)
    return {"workspace": str(ws.root), "expected_clients": expected, "rounds": rounds}
