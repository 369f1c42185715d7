"""File-drop federation: quorum, the round lock, no-op reruns, faults, and an end-to-end run of real processes."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from uniflow_cli.adapters import TENSORS_FILE, read_adapter
from uniflow_cli.cli.app import app
from uniflow_cli.federation import LOCK_NAME, QuorumError, RoundLock, wait_for_drops
from uniflow_cli.workspace import Workspace, find_workspace
from tests.workspace_factory import make_workspace

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("tpl") / "fed", {"0": "image", "1": "text", "2": "image"}, test=("image", "text"))


@pytest.fixture
def ws(template, tmp_path) -> Path:
    dst = tmp_path / "fed"
    shutil.copytree(template, dst)
    return dst


def train(ws: Path, client: str, *extra: str):
    result = run("local-train", "--client", client, "-w", ws, "--steps", "2", "--batch-size", "2", *extra)
    assert result.exit_code == 0, result.output
    return result


# ---------------------------------------------------------------------------------------------- waiting and quorum
class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += max(seconds, 0.5)


def test_quorum_at_timeout(ws):
    train(ws, "0")
    train(ws, "1")
    clock, log = FakeClock(), []
    scan = wait_for_drops(find_workspace(ws), 1, expected=["0", "1", "2"], min_clients=2, timeout=10, poll=1,
                          log=log.append, clock=clock, sleep=clock.sleep)
    assert [p.name for p in scan.valid] == ["0", "1"] and scan.missing == ["2"]
    assert clock.now >= 10 and any("missing clients 2" in m for m in log)


def test_below_quorum_fails_at_timeout(ws):
    train(ws, "0")
    clock = FakeClock()
    with pytest.raises(QuorumError, match=r"round 1: 1 valid drop\(s\) after 5 s, quorum is 2 \(missing clients 1, 2\)"):
        wait_for_drops(find_workspace(ws), 1, expected=["0", "1", "2"], min_clients=2, timeout=5, clock=clock, sleep=clock.sleep)


def test_all_expected_returns_at_once(ws):
    for c in ("0", "1", "2"):
        train(ws, c)
    clock = FakeClock()
    scan = wait_for_drops(find_workspace(ws), 1, expected=["0", "1", "2"], min_clients=3, timeout=600, clock=clock, sleep=clock.sleep)
    assert len(scan.valid) == 3 and clock.now == 0


# ---------------------------------------------------------------------------------------------- the lock
def test_live_lock_blocks_a_second_server(ws):
    train(ws, "0")
    lock = RoundLock(ws / "rounds" / "1" / ".aggregate.lock")
    assert lock.try_acquire()
    try:
        result = run("aggregate", "--round", "1", "-w", ws)
        assert result.exit_code == 1 and "another server is aggregating round 1" in result.output
        assert not (ws / "rounds" / "1" / "global").exists()
    finally:
        lock.release()


def test_server_killed_mid_aggregate_leaves_a_stale_lock_and_a_rerun_publishes(ws):
    train(ws, "0")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    lock = ws / "rounds" / "1" / ".aggregate.lock"
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "started": 0}))
    (ws / "rounds" / "1" / ".global.tmp-deadbeef").mkdir()  # its half-written output: hidden, never read
    result = run("aggregate", "--round", "1", "-w", ws)
    assert result.exit_code == 0, result.output
    assert "removed stale lock" in result.output
    assert read_adapter(ws / "rounds" / "1" / "global").meta.round == 1
    assert not lock.exists()


def _dead_lock(path: Path) -> None:
    """A lock whose server (on this host) is gone: stale."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "started": 0}))


def _race_after_judging_stale(monkeypatch, rival: RoundLock) -> list[tuple[bool, bytes]]:
    """Let ``rival`` take the lock over (completely) right after the next server judged the lock stale.

    That is the window of the race: two servers both see the dead server's lock, the rival replaces it
    with its fresh lock first, and the slower one then acts on its now outdated verdict. Records whether
    the rival got the lock and the bytes of the lock it wrote."""
    real, raced = RoundLock._is_stale, []

    def judged(self, *args, **kwargs):
        verdict = real(self, *args, **kwargs)
        if verdict and self is not rival and not raced:
            raced.append((rival.try_acquire(), rival.path.read_bytes()))
        return verdict

    monkeypatch.setattr(RoundLock, "_is_stale", judged)
    return raced


def test_a_stale_lock_taken_over_by_two_servers_at_once_has_one_holder(tmp_path, monkeypatch):
    path = tmp_path / "rounds" / "1" / LOCK_NAME
    _dead_lock(path)
    slow, rival = RoundLock(path), RoundLock(path)
    raced = _race_after_judging_stale(monkeypatch, rival)
    assert not slow.try_acquire()  # it judged the dead lock stale, but by then the rival's fresh lock was there
    [(rival_won, rival_lock)] = raced
    assert rival_won and rival.held and not slow.held
    assert path.read_bytes() == rival_lock  # the rival's fresh lock survived, in place
    assert [p.name for p in path.parent.iterdir()] == [LOCK_NAME]  # nothing set aside is left behind
    rival.release()
    assert not path.exists() and slow.try_acquire()  # once free, the lock is taken normally
    slow.release()


def test_a_server_whose_lock_was_taken_over_does_not_remove_the_new_holders_lock(tmp_path):
    path = tmp_path / "rounds" / "1" / LOCK_NAME
    first = RoundLock(path)
    assert first.try_acquire()
    # Its lock was judged stale (e.g. it ran longer than stale_after on another host) and replaced.
    path.unlink()
    newer = json.dumps({"pid": 1, "host": "other-host", "started": 123.0, "token": "newer"})
    path.write_text(newer)
    first.release()
    assert path.read_text() == newer and not first.held


def test_a_lock_moved_aside_by_mistake_never_replaces_one_created_meanwhile(tmp_path, monkeypatch):
    """The slow server moved a fresh lock aside; before it could put it back, a third server locked."""
    import uniflow_cli.federation as federation

    path = tmp_path / LOCK_NAME
    _dead_lock(path)
    stale = federation.read_lock(path)
    path.unlink()
    path.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": 1.0, "token": "fresh"}))
    third, third_lock = RoundLock(path), []
    real_read = federation.read_lock

    def read(p):
        if p != path and not third.held:
            assert third.try_acquire()  # the lock's name is free for a moment: the third server takes it
            third_lock.append(path.read_bytes())
        return real_read(p)

    monkeypatch.setattr(federation, "read_lock", read)
    assert federation.remove_if_unchanged(path, stale) is False
    assert third.held and [path.read_bytes()] == third_lock
    assert [p.name for p in tmp_path.iterdir()] == [LOCK_NAME]


def test_rerun_of_a_published_round_is_a_no_op_that_reports_late_drops(ws):
    train(ws, "0")
    assert run("aggregate", "--round", "1", "-w", ws).exit_code == 0
    before = (ws / "rounds" / "1" / "global" / TENSORS_FILE).read_bytes()
    # A late client: its drop lands after the round closed (only possible by writing the drop by hand,
    # since local-train refuses to train for a closed round).
    late = ws / "rounds" / "1" / "clients" / "5"
    shutil.copytree(ws / "rounds" / "1" / "clients" / "0", late)
    meta = json.loads((late / "uniflow.json").read_text())
    (late / "uniflow.json").write_text(json.dumps({**meta, "client_id": "5"}))  # a drop names its own client
    result = run("aggregate", "--round", "1", "-w", ws)
    assert result.exit_code == 0 and "already published" in result.output and "late drops" in result.output
    assert (ws / "rounds" / "1" / "global" / TENSORS_FILE).read_bytes() == before


def test_the_round_keeps_its_report_and_a_redone_round_replaces_it(ws):
    """rounds/t/report.json is written beside every round's global; after the global is removed to redo the
    round, the stale report is replaced (it described a global that is gone); a user's own file is not."""
    train(ws, "0")
    assert run("aggregate", "--round", "1", "-w", ws).exit_code == 0
    report = ws / "rounds" / "1" / "report.json"
    first = json.loads(report.read_text())
    assert first["layers"] and first["rel_error_mean"] is not None  # the per-round fidelity, kept beside the global
    shutil.rmtree(ws / "rounds" / "1" / "global")
    result = run("aggregate", "--round", "1", "-w", ws)
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text()) == first  # the same drops: the same report, rewritten
    shutil.rmtree(ws / "rounds" / "1" / "global")
    report.write_text("my notes\n")
    result = run("aggregate", "--round", "1", "-w", ws)
    assert result.exit_code != 0 and "report.json" in result.output and report.read_text() == "my notes\n"
    assert not (ws / "rounds" / "1" / "global").exists()


def test_two_servers_on_one_round_publish_once(ws):
    for c in ("0", "1", "2"):
        train(ws, c)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "uniflow_cli.cli.app", "aggregate", "--round", "1", "-w", str(ws), "--wait", "--timeout", "60", "--poll", "0.2"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert sum("published" in o and "already published" not in o for o in outputs) == 1, outputs
    assert sum("already published" in o for o in outputs) == 1, outputs


# ---------------------------------------------------------------------------------------------- client-side faults
def test_a_client_cannot_drop_twice(ws):
    train(ws, "0")
    before = (ws / "rounds" / "1" / "clients" / "0" / TENSORS_FILE).read_bytes()
    result = run("local-train", "--client", "0", "-w", ws, "--steps", "2", "--round", "1")
    assert result.exit_code == 1 and "already exists" in result.output
    assert (ws / "rounds" / "1" / "clients" / "0" / TENSORS_FILE).read_bytes() == before


def test_training_for_a_closed_round_is_refused(ws):
    train(ws, "0")
    assert run("aggregate", "--round", "1", "-w", ws).exit_code == 0
    result = run("local-train", "--client", "1", "-w", ws, "--round", "1", "--force")
    assert result.exit_code == 2 and "round 1 is already closed" in result.output


def test_local_train_waits_for_the_next_global(ws):
    train(ws, "0")  # dropped round 1; the round-1 global is not published
    result = run("local-train", "--client", "0", "-w", ws, "--wait", "--timeout", "0.5", "--steps", "1")
    assert result.exit_code == 1 and "round 1's global was not published within 0.5 s" in result.output


def test_shared_directory_missing(tmp_path):
    result = run("aggregate", "--round", "1", "-w", tmp_path / "mnt" / "fed")
    assert result.exit_code == 1 and "has no uniflow.toml" in result.output


def test_shared_directory_read_only(ws, monkeypatch):
    """The share turned read-only: creating the round lock fails with EROFS, told as one line, nothing written."""
    train(ws, "0")
    lock = ws / "rounds" / "1" / LOCK_NAME
    real_open, refused = os.open, []

    def read_only(path, flags, *args, **kwargs):
        # Only the lock's creation fails (the first write a server makes); every read goes through.
        if Path(path) == lock and flags & os.O_CREAT:
            refused.append(Path(path))
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    before = sorted(p.relative_to(ws) for p in ws.rglob("*"))
    result = run("aggregate", "--round", "1", "-w", ws)
    monkeypatch.undo()
    assert refused == [lock], result.output  # the lock was the call that failed, once
    assert result.exit_code == 1, result.output
    assert result.output.strip() == f"error: Read-only file system ({lock})"
    assert sorted(p.relative_to(ws) for p in ws.rglob("*")) == before  # no global, no lock, no temp dir


def test_wait_options_are_checked_in_library_terms(tmp_path):
    """The library names its settings (timeout, poll, min_clients); only the CLI speaks of --flags."""
    from uniflow_cli.errors import ConfigError

    for kwargs, field, message in [
        ({"timeout": float("nan")}, "timeout", "timeout=nan must be a finite number of seconds >= 0. Fix: set timeout = 600"),
        ({"poll": 0}, "poll", "poll=0 must be a finite number of seconds > 0. Fix: set poll = 2"),
        ({"min_clients": 0}, "min_clients", "min_clients=0 must be >= 1. Fix: set min_clients = 1"),
    ]:
        with pytest.raises(ConfigError) as caught:
            wait_for_drops(Workspace(tmp_path), 1, **{"expected": [], "min_clients": 1, "timeout": 1, **kwargs})
        assert caught.value.field == field and str(caught.value) == message


def test_status_shows_drops_and_invalid_ones(ws):
    train(ws, "0")
    (ws / "rounds" / "1" / "clients" / "2").mkdir()
    result = run("status", "-w", ws, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    r1 = next(r for r in info["rounds"] if r["round"] == 1)
    assert r1["dropped"] == ["0"] and r1["missing"] == ["1", "2"] and r1["invalid"][0]["client"] == "2"


# ---------------------------------------------------------------------------------------------- end to end
def test_end_to_end_rounds_with_real_processes(ws):
    """2 rounds × 3 clients through the real CLI: round 2 loses a client and gets a corrupt drop; quorum 2."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def uniflow(*args, check=True):
        proc = subprocess.run([sys.executable, "-m", "uniflow_cli.cli.app", *map(str, args)], capture_output=True, text=True, env=env)
        if check:
            assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    common = ["-w", ws, "--steps", "2", "--batch-size", "2"]
    for c in ("0", "1", "2"):
        uniflow("local-train", "--client", c, *common)
    uniflow("aggregate", "--round", "1", "-w", ws, "--wait", "--timeout", "30", "--min-clients", "2")
    uniflow("local-train", "--client", "0", *common)
    uniflow("local-train", "--client", "1", *common)
    corrupt = ws / "rounds" / "2" / "clients" / "1" / TENSORS_FILE
    corrupt.write_bytes(corrupt.read_bytes()[:-16] + b"\0" * 16)  # client 1's upload got damaged; client 2 never came
    done = uniflow("aggregate", "--round", "2", "-w", ws, "--wait", "--timeout", "3", "--poll", "0.5", "--min-clients", "1")
    assert "ignoring drop" in done.stderr and "sha256" in done.stderr
    g2 = read_adapter(ws / "rounds" / "2" / "global")
    assert [c["client_id"] for c in g2.meta.extra["clients"]] == ["0"]
    status = json.loads(uniflow("status", "-w", ws, "--json").stdout)
    assert [r["published"] for r in status["rounds"]] == [True, True, True]
    quorum_fail = uniflow("aggregate", "--round", "2", "-w", ws, "--force", "--min-clients", "2", check=False)
    assert quorum_fail.returncode == 1 and "quorum is 2" in quorum_fail.stderr


def test_flora_carries_the_projectors_over_rounds_and_restarts_only_the_lora(ws):
    """FLoRA merges each global's LoRA into the base and starts a fresh LoRA, but the projectors (non-LoRA
    trainables) continue from the global's average, as in every other method."""
    import torch

    from uniflow_cli.adapters import read_adapter
    from uniflow_cli.aggregation.registry import method_spec
    from uniflow_cli.client_round import starting_model
    from uniflow_cli.global_info import recorded_settings
    from uniflow_cli.models import adapter_tensors
    from uniflow_cli.workspace import Workspace

    for client in ("0", "1"):
        train(ws, client, "--method", "flora", "--stages", "joint", "--lr", "5e-3")
    assert run("aggregate", "--round", "1", "-w", ws, "--method", "flora").exit_code == 0
    start = read_adapter(ws / "rounds" / "1" / "global")
    settings, lora = recorded_settings(start.meta, "round 1")
    model, _folded = starting_model(start, settings, lora, method_spec("flora"), round_=2,
                                    history=[(1, start)], started_from="round 1")
    tensors = adapter_tensors(model)
    projectors = [k for k in start.tensors if ".projectors." in k]
    initial = read_adapter(Workspace(ws).global_dir(0)).tensors
    assert projectors and all(torch.equal(tensors[k], start.tensors[k]) for k in projectors)
    assert any(not torch.equal(start.tensors[k], initial[k]) for k in projectors)  # they did train in round 1
    assert all(tuple(tensors[k].shape) != tuple(start.tensors[k].shape) for k in start.tensors if ".lora_" in k)  # LoRA restarted (rank r, not Σr)
