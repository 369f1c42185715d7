"""File-drop federation over shared storage: waiting for drops, quorum, the round lock, and status.

Everything here is plain files in the workspace, so any shared file system (NFS, SMB, a synced folder)
works: drops are published atomically by clients (hidden temp dir → rename), the server accepts only
complete drops whose sha256 matches, and a lock file ``rounds/<t>/.aggregate.lock`` makes sure exactly
one server publishes a round.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uniflow_cli.adapters import META_FILE, open_adapter, scan_adapter_dirs
from uniflow_cli.errors import AdapterError, UniflowError, UnsafeInputError, UsageError, WorkspaceError
from uniflow_cli.paths import ID_RULE, is_valid_id, read_regular
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


def check_wait_options(timeout: float, poll: float) -> None:
    """``timeout`` finite and >= 0 (NaN would never time out), ``poll`` finite and > 0 (no busy loop)."""
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout >= 0):
        raise UsageError(f"--timeout {timeout} must be a finite number of seconds >= 0", fix="use --timeout 600")
    if not (isinstance(poll, (int, float)) and math.isfinite(poll) and poll > 0):
        raise UsageError(f"--poll {poll} must be a finite number of seconds > 0", fix="use --poll 2")


# --------------------------------------------------------------------------------------------------
# The round lock
# --------------------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class RoundLock:
    """An exclusive lock file (O_CREAT|O_EXCL works on local and NFSv3+ file systems).

    A lock is stale when its holder ran on this host and is gone, or when it is older than
    ``stale_after`` seconds (a holder on another host that died); a stale lock is taken over.
    """

    path: Path
    stale_after: float = DEFAULT_STALE_SECONDS
    notices: list[str] = field(default_factory=list)
    held: bool = False

    def _is_stale(self) -> bool:
        try:
            age = time.time() - os.lstat(self.path).st_mtime
            info = json.loads(read_regular(self.path, limit=4096) or b"{}")
        except FileNotFoundError:
            return False
        except UnsafeInputError:
            return False  # a FIFO/symlink is not a lock a server of ours wrote: never removed, never read
        except (OSError, ValueError):
            return True  # unreadable lock content: a half-written lock from a killed server
        if not isinstance(info, dict):
            return True
        if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int) and not isinstance(info.get("pid"), bool):
            return not _pid_alive(info["pid"])
        return age > self.stale_after

    def try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._is_stale():
                    self.notices.append(f"removed stale lock {self.path} (its server is gone)")
                    try:
                        self.path.unlink()
                    except FileNotFoundError:
                        pass
                    continue
                return False
            with os.fdopen(fd, "w") as fh:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}, fh)
            self.held = True
            return True
        return False

    def release(self) -> None:
        if self.held:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            self.held = False


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
    if min_clients < 1:
        raise UsageError(f"--min-clients {min_clients} must be >= 1", fix="use --min-clients 1 or more")
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
                fix="wait for more clients (--timeout) or lower --min-clients",
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
    rows = meta.extra.get("clients", []) if meta is not None else []
    return [str(row.get("client_id")) for row in rows if isinstance(row, dict)] if isinstance(rows, list) else []


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
                entry["method"] = meta.method
                entry["clients"] = fused_clients(meta)
                summary = meta.extra.get("aggregation")
                entry["rel_error_mean"] = summary.get("rel_error_mean") if isinstance(summary, dict) else None
                engine = meta.extra.get("engine")
                entry["engine"] = str(engine.get("name", "file-drop")) if isinstance(engine, dict) else "file-drop"
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
