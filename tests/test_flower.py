"""uniflow under Flower: settings, records, the strategy and the ClientApp, a simulation and a loopback deployment.

The central check: the global adapter Flower produces equals, byte for byte, what the file-drop path
(`uniflow local-train` + `uniflow aggregate`) produces for the same partition, seeds and method.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from uniflow_cli.adapters import TENSORS_FILE, read_adapter  # noqa: E402
from uniflow_cli.cli.app import app  # noqa: E402
from uniflow_cli.errors import AdapterError, ConfigError, DataError, OutputExistsError, UniflowError  # noqa: E402
from uniflow_cli.flower.client import run_client_round  # noqa: E402
from uniflow_cli.flower.records import HISTORY_KEY, REPLY_KEY, record_to_tensors, tensors_to_record  # noqa: E402
from uniflow_cli.flower.server import build_strategy, evaluation_hook, run_server  # noqa: E402
from uniflow_cli.flower.settings import RUN_CONFIG_KEYS, FlowerRunSettings  # noqa: E402
from uniflow_cli.workspace import find_workspace  # noqa: E402

pytestmark = pytest.mark.flower
runner = CliRunner()
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
STEPS = 2
SIZES = {"0": 4, "1": 5, "2": 6}  # unequal shards: the num_examples weights matter


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


# ---------------------------------------------------------------------------------------------- a tiny workspace
def _png(seed: int) -> bytes:
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    buf = io.BytesIO()
    Image.fromarray((torch.rand(32, 32, 3, generator=gen) * 255).to(torch.uint8).numpy()).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    from uniflow_cli.data.schema import make_row, rows_to_dataset

    ws = tmp_path_factory.mktemp("tpl") / "fed"
    run("init", ws, "--preset", "tiny-random", "--modalities", "image")
    for k, n in SIZES.items():
        rows = [make_row(id=f"c{k}-{i}", modality="image", question=f"What is {i} plus {k}?", answer=str(i + int(k)), image_bytes=_png(10 * int(k) + i))
                for i in range(n)]
        rows_to_dataset(rows).save_to_disk(str(ws / "data" / "clients" / k))
    test_rows = [make_row(id=f"t-{i}", modality="image", question=f"What is {i} plus 1?", answer=str(i + 1), image_bytes=_png(900 + i))
                 for i in range(3)]
    rows_to_dataset(test_rows).save_to_disk(str(ws / "data" / "test" / "image"))
    return ws


def copy_of(template: Path, dst: Path) -> Path:
    shutil.copytree(template, dst)
    return dst


def file_drop(ws: Path, method: str, rounds: int, clients) -> dict[int, bytes]:
    """The file-drop federation through the CLI: local-train per client, then aggregate, per round."""
    for t in range(1, rounds + 1):
        for k in clients:
            run("local-train", "--client", k, "-w", ws, "--steps", STEPS, "--method", method)
        run("aggregate", "--round", t, "-w", ws, "--method", method)
    return {t: (ws / "rounds" / str(t) / "global" / TENSORS_FILE).read_bytes() for t in range(1, rounds + 1)}


@pytest.fixture(scope="module")
def fedA2_drop_ws(template, tmp_path_factory) -> Path:
    """The file-drop federation of the 3 clients, 2 rounds of fedA2 (its client drops are kept)."""
    ws = copy_of(template, tmp_path_factory.mktemp("drop") / "fed")
    file_drop(ws, "fedA2", 2, SIZES)
    return ws


@pytest.fixture(scope="module")
def fedA2_file_drop(fedA2_drop_ws) -> dict[int, bytes]:
    return {t: (fedA2_drop_ws / "rounds" / str(t) / "global" / TENSORS_FILE).read_bytes() for t in (1, 2)}


# ---------------------------------------------------------------------------------------------- an in-process driver
class FakeGrid:
    """Enough of Flower's Grid for FedAvg's sampling: the node ids."""

    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return self.nodes


def drive(ws: Path, run_config: dict, partitions: dict[int, str], *, fail=(), tamper=None, before_round=None, log=None, node_workspaces=None):
    """Run the strategy and the ClientApp's round function in this process, message by message.

    A UniflowError raised by the ClientApp becomes an error reply, as Flower makes it. ``log`` (a list)
    receives (round, node, earlier-global rounds whose arrays came with the message, error or None).
    """
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    settings = FlowerRunSettings.from_run_config(run_config)
    strategy, inner = build_strategy(settings, find_workspace(ws))
    arrays = tensors_to_record(inner.current.tensors)
    for server_round in range(1, settings.num_server_rounds + 1):
        if before_round is not None:
            before_round(server_round)
        replies = []
        for msg in strategy.configure_train(server_round, arrays, ConfigRecord(), FakeGrid(partitions)):
            node = msg.metadata.dst_node_id
            sent = sorted({int(k.split("/")[0]) for k in msg.content.array_records[HISTORY_KEY].keys()}) if HISTORY_KEY in msg.content.array_records else []
            error = "ClientApp raised" if node in fail else None
            if error is None:
                try:
                    node_config = {"partition-id": partitions[node], **({"workspace": str(node_workspaces[node])} if node_workspaces else {})}
                    content = run_client_round(msg.content, run_config, node_config)
                except UniflowError as exc:
                    error = str(exc)
            if log is not None:
                log.append((server_round, node, sent, error))
            if error is not None:
                replies.append(Message(Error(code=0, reason=error), reply_to=msg))
                continue
            if tamper is not None:
                tamper(node, content)
            replies.append(Message(content=content, reply_to=msg))
        new, _ = strategy.aggregate_train(server_round, replies)
        arrays = new if new is not None else arrays
    return inner


def cfg(ws: Path, method: str, rounds: int = 2, **extra) -> dict:
    return {"workspace": str(ws), "method": method, "num-server-rounds": rounds, "steps": STEPS, **extra}


# ---------------------------------------------------------------------------------------------- settings and records
@pytest.mark.parametrize("run_config, message", [
    ({"rounds": 2}, r"unknown run-config key\(s\) \['rounds'\]"),
    ({"num-server-rounds": 0}, "num-server-rounds=0 must be >= 1"),
    ({"tau": "a lot"}, "tau='a lot' must be a number"),
    ({"steps": 2.5}, "steps=2.5 must be an integer"),
    ({"dp": "yes"}, "dp='yes' must be true or false"),
    ({"eval-rounds": "first"}, "eval-rounds entry 'first'"),
    ({"stages": "two_stage"}, "stages='two_stage'"),
    ({"stage-by": "epoch"}, "stage-by='epoch'"),
    ({"eval-rounds": "1,3"}, r"eval-rounds \[3\] outside the run's rounds 1..2"),
    ({"min-train-nodes": 3, "min-available-nodes": 2}, "min-train-nodes=3"),
])
def test_run_config_is_validated(run_config, message):
    with pytest.raises(ConfigError, match=message):
        FlowerRunSettings.from_run_config(run_config)


def test_workspace_must_be_named_and_dp_needs_aligned_replies(template, tmp_path):
    with pytest.raises(ConfigError, match="names no workspace"):
        FlowerRunSettings.from_run_config({}).workspace_path()
    ws = find_workspace(template)
    with pytest.raises(ConfigError, match="dp=true with method 'ffa'"):
        build_strategy(FlowerRunSettings.from_run_config(cfg(template, "ffa", dp=True)), ws)
    with pytest.raises(ConfigError, match="preset='smol' but"):
        build_strategy(FlowerRunSettings.from_run_config(cfg(template, "fedA2", preset="smol")), ws)


def test_a_workspace_robust_sum_needs_enough_nodes(template, tmp_path):
    """[aggregate] robust from the workspace (not the run config) is checked against min-train-nodes before any round."""
    import shutil

    ws_dir = tmp_path / "ws"
    shutil.copytree(template, ws_dir)
    text = (ws_dir / "uniflow.toml").read_text().replace("[aggregate]\n", '[aggregate]\nrobust = "median"\n', 1)
    (ws_dir / "uniflow.toml").write_text(text)
    with pytest.raises(ConfigError, match=r"robust=\W?median\W? needs at least 3 clients .*; 2 given"):
        build_strategy(FlowerRunSettings.from_run_config(cfg(ws_dir, "fedA2", **{"min-train-nodes": 2})), find_workspace(ws_dir))


def test_records_round_trip_exactly_and_refuse_other_dtypes():
    import numpy as np

    tensors = {"b.lora_B.weight": torch.randn(3, 2), "a.lora_A.weight": torch.randn(2, 5)}
    record = tensors_to_record(tensors)
    assert list(record.keys()) == sorted(tensors)  # replies line up with the global position by position
    back = record_to_tensors(record)
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    with pytest.raises(AdapterError, match="is float16, uniflow exchanges float32"):
        record_to_tensors(ArrayRecord({"x": Array(np.zeros(2, dtype=np.float16))}))


# ---------------------------------------------------------------------------------------------- byte identity, in process
@pytest.mark.parametrize("method", ["fedsa", "feddpa", "fedex", "flora", "ffa", "rolora", "encoders=fedsa,llm=fedA2"])
def test_every_method_matches_the_file_drop_path(template, tmp_path, method):
    """Three rounds, two clients: fedsa's private B, feddpa's local adapter, fedex's residual history, flora's merge
    history, ffa's frozen A, rolora's alternating B, A, B rounds."""
    clients = {"0": 4, "1": 5}
    expected = file_drop(copy_of(template, tmp_path / "drop"), method, 3, clients)
    ws = copy_of(template, tmp_path / "flower")
    log = []
    inner = drive(ws, cfg(ws, method, rounds=3), {101: "0", 102: "1"}, log=log)
    assert [r for r, _ in inner.history] == [1, 2, 3] and all(not h.tensors and h.residual is None for _, h in inner.history)  # read when sent, not held
    for t in (1, 2, 3):
        assert (ws / "rounds" / str(t) / "global" / TENSORS_FILE).read_bytes() == expected[t], f"{method} round {t}"
    sent = sorted((r, node, rounds) for r, node, rounds, error in log)
    if method in ("fedex", "flora"):  # each earlier global reaches a node once; round 3 reuses round 1's from the node's cache
        assert sent == [(1, 101, []), (1, 102, []), (2, 101, [1]), (2, 102, [1]), (3, 101, [2]), (3, 102, [2])]
        cached = read_adapter(ws / "state" / "flower" / "0" / "globals" / "1")
        published = read_adapter(ws / "rounds" / "1" / "global")
        assert cached.tensors.keys() == published.tensors.keys() and all(torch.equal(cached.tensors[k], published.tensors[k]) for k in published.tensors)
        assert (cached.residual is None) == (method == "flora")
    else:
        assert all(rounds == [] for _, _, rounds in sent)
    if method == "fedsa":  # B stayed on the node and never entered the global
        assert all(k.endswith("lora_B.weight") for k in read_adapter(ws / "state" / "clients" / "0").tensors)
        assert not any(k.endswith("lora_B.weight") for k in read_adapter(ws / "rounds" / "2" / "global").tensors)
    if method == "feddpa":  # the local adapter stayed on the node, the same bytes as the file-drop client's
        local = read_adapter(ws / "state" / "clients" / "0")
        assert local.meta.round == 3 and local.tensors and not any("projectors" in k for k in local.tensors)


def test_nodes_with_their_own_workspace_need_only_the_config_and_their_shard(template, tmp_path):
    """--node-config "workspace=..." on every node: a directory with uniflow.toml and data/clients/<k> only. fedex over
    3 rounds gives the same globals as nodes sharing the server's workspace, the nodes' copies of earlier globals stay
    in their own directories, and nothing of a node is written into the server's workspace."""
    shared = copy_of(template, tmp_path / "shared")
    drive(shared, cfg(shared, "fedex", rounds=3), {101: "0", 102: "1"})
    server = copy_of(template, tmp_path / "server")
    nodes = {}
    for node, k in ((101, "0"), (102, "1")):
        own = tmp_path / f"node-{k}"
        shutil.copytree(template / "data" / "clients" / k, own / "data" / "clients" / k)
        shutil.copy(template / "uniflow.toml", own / "uniflow.toml")
        nodes[node] = own
    drive(server, cfg(server, "fedex", rounds=3), {101: "0", 102: "1"}, node_workspaces=nodes)
    for t in (1, 2, 3):
        assert (server / "rounds" / str(t) / "global" / TENSORS_FILE).read_bytes() == (shared / "rounds" / str(t) / "global" / TENSORS_FILE).read_bytes()
    assert not (server / "state").exists()
    assert sorted(p.name for p in (nodes[102] / "state" / "flower" / "1" / "globals").iterdir()) == ["1", "2"]
    assert sorted(p.name for p in nodes[101].iterdir()) == ["data", "state", "uniflow.toml"]  # no rounds/, no other client


@pytest.mark.parametrize("damage, message", [
    ("wiped", r"the global of round 1 came neither with the message nor is it in this node's cache .*state/flower/1/globals/1"),
    ("other-global", r"globals/1 holds another global of round 1 than the server's"),
])
def test_a_node_that_lost_its_copies_of_earlier_globals_gets_them_again(template, tmp_path, damage, message):
    """fedex: before round 3, client 1's copy of round 1's global is lost (or replaced by another): its ClientApp
    refuses to train on a wrong base (one error reply naming the copy), round 3 fuses client 0, and round 4 sends
    node 102 every earlier global again, after which it trains."""
    ws = copy_of(template, tmp_path / "fed")
    cache = ws / "state" / "flower" / "1" / "globals"

    def lose_round_1(server_round):
        if server_round == 3:
            shutil.rmtree(cache / "1")
            if damage == "other-global":  # e.g. a copy left from another federation in the same place
                shutil.copytree(ws / "rounds" / "2" / "global", cache / "1")

    log = []
    inner = drive(ws, cfg(ws, "fedex", rounds=4, **{"min-train-nodes": 1}), {101: "0", 102: "1"}, before_round=lose_round_1, log=log)
    by = {(r, node): (rounds, error) for r, node, rounds, error in log}
    assert by[(3, 102)][0] == [2] and re.search(message, by[(3, 102)][1]), by[(3, 102)]
    assert by[(3, 101)] == ([2], None)
    assert by[(4, 102)] == ([1, 2, 3], None) and by[(4, 101)] == ([3], None)
    assert inner.published == [1, 2, 3, 4]
    assert [c["client_id"] for c in read_adapter(ws / "rounds" / "3" / "global").meta.extra["clients"]] == ["0"]
    assert [c["client_id"] for c in read_adapter(ws / "rounds" / "4" / "global").meta.extra["clients"]] == ["0", "1"]


# ---------------------------------------------------------------------------------------------- faults, in process
def test_wrong_base_reply_is_rejected_and_the_round_proceeds(template, tmp_path, caplog):
    ws = copy_of(template, tmp_path / "fed")

    def other_base(node, content):
        if node == 103:
            content[REPLY_KEY]["base-fingerprint"] = "another-base-0123456789"

    with caplog.at_level("WARNING"):
        inner = drive(ws, cfg(ws, "fedA2", rounds=1), {101: "0", 102: "1", 103: "2"}, tamper=other_base)
    assert inner.published == [1]
    meta = read_adapter(ws / "rounds" / "1" / "global").meta
    assert [c["client_id"] for c in meta.extra["clients"]] == ["0", "1"]
    assert "trained on base another-base-012" in meta.extra["engine"]["rejected"][0]
    assert "rejected the reply of node 103" in caplog.text
    (ws / "data" / "partition.json").write_text(json.dumps({"clients": [{"id": k} for k in SIZES]}))  # as uniflow partition writes it
    status = json.loads(run("status", "-w", ws, "--json").output)["rounds"][1]  # Flower carried the uploads: no drops here
    assert (status["engine"], status["dropped"], status["clients"], status["missing"]) == ("flower", [], ["0", "1"], ["2"])
    assert "flower: 0, 1" in run("status", "-w", ws).output


def test_below_the_minimum_nothing_is_published(template, tmp_path):
    ws = copy_of(template, tmp_path / "fed")
    inner = drive(ws, cfg(ws, "fedA2", rounds=1, **{"min-train-nodes": 2, "min-available-nodes": 3}), {101: "0", 102: "1", 103: "2"}, fail={102, 103})
    assert inner.published == [] and not (ws / "rounds" / "1").exists()


def test_dp_publishes_the_noised_global(template, tmp_path):
    ws = copy_of(template, tmp_path / "fed")
    plain = copy_of(template, tmp_path / "plain")
    drive(plain, cfg(plain, "fedA2", rounds=1), {101: "0", 102: "1"})
    drive(ws, cfg(ws, "fedA2", rounds=1, dp=True, **{"dp-noise-multiplier": 0.5}), {101: "0", 102: "1"})
    noised, exact = read_adapter(ws / "rounds" / "1" / "global"), read_adapter(plain / "rounds" / "1" / "global")
    assert noised.tensors.keys() == exact.tensors.keys()
    assert any(not torch.equal(noised.tensors[k], exact.tensors[k]) for k in exact.tensors)


# ---------------------------------------------------------------------------------------------- server-side evaluation
def test_server_side_evaluation_is_uniflow_evaluate(template, tmp_path):
    """The ServerApp's evaluate_fn runs the evaluate core on the published global: same metrics as the CLI."""
    ws = copy_of(template, tmp_path / "fed")
    config = cfg(ws, "fedA2", rounds=2, **{"eval-rounds": "2", "eval-limit": 2})
    inner = drive(ws, config, {101: "0", 102: "1"})
    hook = evaluation_hook(FlowerRunSettings.from_run_config(config), find_workspace(ws), inner)
    assert hook(0, ArrayRecord()) is None and hook(1, ArrayRecord()) is None  # not a chosen round
    assert not (ws / "eval").exists()
    record = hook(2, ArrayRecord())
    written = json.loads((ws / "eval" / "round-2.json").read_text())
    run("evaluate", "-w", ws, "--round", 2, "--limit", 2, "--out", tmp_path / "cli.json")
    by_cli = json.loads((tmp_path / "cli.json").read_text())
    assert written["metrics"] == by_cli["metrics"] and written["metrics"]["image"]["n"] == 2
    flat = {f"{m}/{k}": float(v) for m, values in written["metrics"].items() for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert dict(record) == flat and {"image/acc", "image/bert_f1", "overall/acc"} <= set(record)


class NoGrid:
    def __getattr__(self, name):
        raise AssertionError(f"the run must stop before using the grid ({name})")


@pytest.mark.parametrize("damage, error, message", [
    ("no-test-split", DataError, "no test split in"),
    ("eval-exists", OutputExistsError, r"round-2.json already exists"),
])
def test_server_side_evaluation_is_checked_before_the_first_round(template, tmp_path, damage, error, message):
    ws = copy_of(template, tmp_path / "fed")
    if damage == "no-test-split":
        shutil.rmtree(ws / "data" / "test")
    else:
        (ws / "eval").mkdir()
        (ws / "eval" / "round-2.json").write_text("{}")
    with pytest.raises(error, match=message):
        run_server(NoGrid(), cfg(ws, "fedA2", rounds=2, **{"eval-rounds": "last"}))
    assert not (ws / "rounds" / "1").exists()
    if damage == "eval-exists":
        assert (ws / "eval" / "round-2.json").read_text() == "{}"


def test_a_bad_run_config_stops_the_server_app_with_one_clear_line(template, tmp_path, caplog):
    from flwr.app import Context

    from uniflow_cli.flower.server_app import main

    ws = copy_of(template, tmp_path / "fed")
    context = Context(run_id=1, node_id=0, node_config={}, state=None, run_config={"workspace": str(ws), "method": "fedavg"})
    with caplog.at_level("ERROR"), pytest.raises(UniflowError, match='run-config method="fedavg" is not one of'):
        main(NoGrid(), context)
    assert 'uniflow: run-config method="fedavg" is not one of fedit, ffa, fedsa, feddpa, fedex, fedA2, svd, flora, lora-fair, flexlora, hetlora, fedsvd, rolora (did you mean ' in caplog.text
    assert not (ws / "rounds" / "1").exists()


# ---------------------------------------------------------------------------------------------- the project
def test_flower_new_writes_the_example_project(template, tmp_path):
    import tomllib

    run("flower", "new", tmp_path / "app")
    assert (tmp_path / "app" / "pyproject.toml").read_text() == (REPO / "examples" / "flower" / "pyproject.toml").read_text()
    run("flower", "new", tmp_path / "mine", "--workspace", template, "--method", "fedex", "--rounds", "5")
    config = tomllib.loads((tmp_path / "mine" / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert config["workspace"] == str(template.resolve()) and config["method"] == "fedex" and config["num-server-rounds"] == 5
    FlowerRunSettings.from_run_config(config)  # every key the template writes is one the app reads ...
    concrete = {key for key, name in RUN_CONFIG_KEYS.items() if getattr(FlowerRunSettings(), name) is not None}
    assert concrete <= set(config)  # ... and every key with a fixed default is there to be overridden (--run-config)
    again = runner.invoke(app, ["flower", "new", str(tmp_path / "mine")])
    assert again.exit_code == 1 and "already exists" in again.output
    bad = runner.invoke(app, ["flower", "new", str(tmp_path / "x"), "--method", "fedavg"])
    assert bad.exit_code == 2 and "--method 'fedavg'" in bad.output and not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------- real Flower runs
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    kids = [int(p) for p in text.split()]
    return kids + [g for k in kids for g in _children(k)]


def _stop(pids) -> None:
    """SIGTERM every process we started and everything it spawned (found before the parent goes), by PID."""
    family = [p for pid in pids for p in [pid, *_children(pid)]]
    for pid in family:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    for pid in family:
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid):
            time.sleep(0.1)
        if Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid):
            os.kill(pid, signal.SIGKILL)


def _state(pid: int) -> str:
    try:
        return next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("State:"))
    except (OSError, StopIteration):
        return "zombie"


def _ours(marker: str) -> list[int]:
    """PIDs whose command line holds ``marker`` (our private FLWR_HOME): the SuperLink `flwr run . local` detaches."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker in proc.joinpath("cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(proc.name))
            except OSError:
                pass
    return found


@pytest.fixture
def flwr_env(tmp_path):
    home = tmp_path / "flwr-home"
    home.mkdir()
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port())}
    started: list[int] = []
    yield env, home, started
    _stop(started + _ours(str(home)))


def _flwr_run(env, app_dir: Path, connection: str, run_config: str, log: Path) -> str:
    with open(log, "w") as fh:
        proc = subprocess.run([str(BIN / "flwr"), "run", str(app_dir), connection, "--stream", "--run-config", run_config],
                              env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=300)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    return text


def test_simulation_matches_the_file_drop_path_and_survives_a_failing_client(template, tmp_path, flwr_env, fedA2_file_drop):
    """`flwr run . local`, 4 simulated nodes; node 3 has no shard, so its ClientApp raises every round:
    the rounds proceed with the other three (= min-train-nodes) and the globals equal the file-drop ones."""
    env, home, _ = flwr_env
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\noptions.num-supernodes = 4\n')
    ws = copy_of(template, tmp_path / "fed")
    app_dir = shutil.copytree(REPO / "examples" / "flower", tmp_path / "app")
    text = _flwr_run(env, app_dir, "local", f"workspace='{ws}' steps={STEPS} min-train-nodes=3 min-available-nodes=4 eval-rounds='last' eval-limit=2",
                     tmp_path / "run.log")
    assert text.count("Received 3 results and 1 failures") == 2, text[-3000:]
    assert "no dataset directory" in text
    for t in (1, 2):
        assert (ws / "rounds" / str(t) / "global" / TENSORS_FILE).read_bytes() == fedA2_file_drop[t]
    # server-side evaluation after the last round only, by the evaluate core inside the ServerApp
    assert sorted(p.name for p in (ws / "eval").iterdir()) == ["round-2.json"]
    assert json.loads((ws / "eval" / "round-2.json").read_text())["metrics"]["image"]["n"] == 2
    assert "round 2: evaluation written to" in text


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and everything below it, as a crashed machine would: no goodbye to the SuperLink."""
    for p in [pid, *_children(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Deployment:
    """A SuperLink and SuperNodes on 127.0.0.1, each logging to ``logs/<name>.log``; every PID is recorded for teardown."""

    def __init__(self, env, started: list[int], logs: Path):
        self.env, self.started, self.logs = env, started, logs
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.superlink_args = ["--host", "127.0.0.1", "--port", str(self.port), "--disable-runtime-dependency-installation"]
        logs.mkdir()

    def supernode_args(self, k: int) -> list[str]:
        return ["--superlink", self.address, "--port", str(_free_port()), "--node-config", f"partition-id={k} num-partitions=3"]

    def spawn(self, name: str, *args: str) -> int:
        fh = open(self.logs / f"{name}.log", "w")
        pid = subprocess.Popen([str(BIN / args[0]), *args[1:]], env=self.env, stdout=fh, stderr=subprocess.STDOUT).pid
        self.started.append(pid)
        return pid

    def wait_listening(self) -> None:
        deadline = time.monotonic() + 60
        while True:  # the SuperLink takes a few seconds to listen; SuperNodes retry on their own
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert time.monotonic() < deadline, (self.logs / "superlink.log").read_text()[-2000:]
                time.sleep(0.5)


def _survivors_global(drop_ws: Path, dst: Path, t: int, gone: str) -> bytes:
    """What the file-drop path publishes for round ``t`` without client ``gone``'s upload."""
    ws = copy_of(drop_ws, dst)
    shutil.rmtree(ws / "rounds" / str(t) / "global")
    shutil.rmtree(ws / "rounds" / str(t) / "clients" / gone)
    for later in ws.joinpath("rounds").iterdir():
        if later.name.isdigit() and int(later.name) > t:
            shutil.rmtree(later)
    run("aggregate", "--round", t, "-w", ws, "--method", "fedA2")
    return (ws / "rounds" / str(t) / "global" / TENSORS_FILE).read_bytes()


def test_loopback_deployment_survives_a_supernode_killed_mid_round(template, tmp_path, flwr_env, fedA2_drop_ws, fedA2_file_drop):
    """flower-superlink --insecure + 3 flower-supernodes on 127.0.0.1, then `flwr run . loopback` for 2 rounds.
    Round 1 equals the file-drop round byte for byte. In round 2 node 2 is SIGKILLed while its ClientApp trains:
    the SuperLink misses its heartbeats, answers for it with an error, and the round completes with nodes 0 and 1
    (= min-train-nodes) — equal to `uniflow aggregate` over the same two file-drop clients."""
    env, home, started = flwr_env
    link = Deployment(env, started, tmp_path / "logs")
    (home / "config.toml").write_text(f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "{link.address}"\ninsecure = true\n')
    link.spawn("superlink", "flower-superlink", "--insecure", *link.superlink_args)
    nodes = [link.spawn(f"supernode-{k}", "flower-supernode", "--insecure", *link.supernode_args(k)) for k in range(3)]
    link.wait_listening()
    ws = copy_of(template, tmp_path / "fed")
    app_dir = shutil.copytree(REPO / "examples" / "flower", tmp_path / "app")
    log = tmp_path / "run.log"
    with open(log, "w") as fh:
        run_proc = subprocess.Popen([str(BIN / "flwr"), "run", str(app_dir), "loopback", "--stream", "--run-config",
                                     f"workspace='{ws}' steps={STEPS} num-server-rounds=2 min-train-nodes=2 min-available-nodes=3"],
                                    env=env, stdout=fh, stderr=subprocess.STDOUT)
        started.append(run_proc.pid)
        node_log = link.logs / "supernode-2.log"
        deadline = time.monotonic() + 240
        # node 2 has started its round-2 ClientApp: kill it now, mid-round
        while node_log.read_text().count("Start `flwr-clientapp` process") < 2:
            assert run_proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:] + node_log.read_text()[-2000:]
            time.sleep(0.05)
        killed_at = time.monotonic()
        _kill_tree(nodes[2])
        returncode = run_proc.wait(timeout=240)
    text = log.read_text()
    assert returncode == 0, text[-3000:]
    assert "Received 3 results and 0 failures" in text and "Received 2 results and 1 failures" in text, text[-3000:]
    noticed_after = time.monotonic() - killed_at
    assert noticed_after < 120, noticed_after  # 2 missed heartbeats of 30 s at most, plus the round's own work
    assert (ws / "rounds" / "1" / "global" / TENSORS_FILE).read_bytes() == fedA2_file_drop[1]
    meta = json.loads((ws / "rounds" / "2" / "global" / "uniflow.json").read_text())
    assert meta["extra"]["engine"]["name"] == "flower" and [c["client_id"] for c in meta["extra"]["clients"]] == ["0", "1"]
    # the file-drop path fusing the same two round-2 uploads
    assert (ws / "rounds" / "2" / "global" / TENSORS_FILE).read_bytes() == _survivors_global(fedA2_drop_ws, tmp_path / "survivors", 2, gone="2")


def _tls_files(where: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 signed by it: (ca.crt, server.pem, server.key)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, server_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "uniflow test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    server = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
              .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(2)
              .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
              .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
              .sign(ca_key, hashes.SHA256()))
    files = (where / "ca.crt", where / "server.pem", where / "server.key")
    files[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    files[2].write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return files


def _node_key(where: Path, name: str) -> tuple[Path, Path]:
    """What `ssh-keygen -t ecdsa -b 384 -N "" -f <name>` writes: (private key, public key .pub)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private, public = where / name, where / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return private, public


def test_tls_deployment_with_supernode_authentication(template, tmp_path, flwr_env, fedA2_drop_ws):
    """The documented secure setup on 127.0.0.1: TLS everywhere and `--enable-supernode-auth`. Nodes 0 and 1 are
    registered with `flwr supernode register`; a third node with an unregistered key is refused and never trains."""
    env, home, started = flwr_env
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    ca, cert, key = _tls_files(secrets)
    link = Deployment(env, started, tmp_path / "logs")
    (home / "config.toml").write_text(f'[superlink]\ndefault = "secure"\n\n[superlink.secure]\naddress = "{link.address}"\nroot-certificates = "{ca}"\n')
    link.spawn("superlink", "flower-superlink", "--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
               "--enable-supernode-auth", *link.superlink_args)
    link.wait_listening()
    keys = [_node_key(secrets, f"node_{k}") for k in range(3)]
    for k in (0, 1):  # node 2 stays unregistered
        done = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(keys[k][1]), "secure"], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
    for k in range(3):
        link.spawn(f"supernode-{k}", "flower-supernode", "--root-certificates", str(ca), "--auth-supernode-private-key", str(keys[k][0]),
                   *link.supernode_args(k))
    ws = copy_of(template, tmp_path / "fed")
    app_dir = shutil.copytree(REPO / "examples" / "flower", tmp_path / "app")
    text = _flwr_run(env, app_dir, "secure", f"workspace='{ws}' steps={STEPS} num-server-rounds=1 min-train-nodes=2 min-available-nodes=2",
                     tmp_path / "run.log")
    assert "Received 2 results and 0 failures" in text, text[-3000:]
    meta = json.loads((ws / "rounds" / "1" / "global" / "uniflow.json").read_text())
    assert [c["client_id"] for c in meta["extra"]["clients"]] == ["0", "1"]
    assert (ws / "rounds" / "1" / "global" / TENSORS_FILE).read_bytes() == _survivors_global(fedA2_drop_ws, tmp_path / "survivors", 1, gone="2")
    intruder = (link.logs / "supernode-2.log").read_text()
    assert "Failed to activate SuperNode" in intruder and "Start `flwr-clientapp` process" not in intruder, intruder[-2000:]
    superlink = (link.logs / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in superlink and f"Uvicorn running on https://{link.address}" in superlink
