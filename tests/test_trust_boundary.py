"""The trust boundary: every client upload, id, path and metadata field is untrusted input.

One table per class of hostile input (docs/federation.md, "Trust boundary"). Each case checks the exit
code, the one-line message, that nothing was written, and that the victim (the inputs, a directory
outside the workspace) is intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import threading
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from uniflow_cli.adapters import META_FILE, TENSORS_FILE, read_adapter
from uniflow_cli.cli.app import app
from uniflow_cli.errors import UnsafeInputError
from uniflow_cli.paths import check_id, confined, read_regular
from tests.lora_factory import lora_tensors, peft_config, write_client
from tests.workspace_factory import make_workspace

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def tree(root: Path) -> dict[str, str]:
    """Every path under ``root`` (symlinks not followed) with its kind and content hash: a snapshot."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            info = os.lstat(path)
            if stat.S_ISREG(info.st_mode):
                out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISLNK(info.st_mode):
                out[str(path.relative_to(root))] = "link:" + os.readlink(path)
            else:
                out[str(path.relative_to(root))] = oct(stat.S_IFMT(info.st_mode))
    return out


def failed(result, message: str, code: int | None = None) -> None:
    assert result.exit_code != 0, result.output
    if code is not None:
        assert result.exit_code == code, result.output
    assert message in result.output, result.output
    assert "Traceback" not in result.output
    assert result.output.count("error:") == 1, result.output


def within(seconds: float, fn, *args):
    """Run ``fn`` in a daemon thread; fail (instead of hanging the suite) if it does not return in time."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{fn} hung for more than {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("tpl") / "fed", {"0": "image", "1": "image"}, test=("image",))


@pytest.fixture
def ws(template, tmp_path) -> Path:
    dst = tmp_path / "fed"
    shutil.copytree(template, dst)
    return dst


def train(ws: Path, client: str, *extra: str):
    result = run("local-train", "--client", client, "-w", ws, "--steps", "1", "--batch-size", "2", *extra)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def drops(tmp_path: Path) -> list[Path]:
    return [write_client(tmp_path / "in", k, lora_tensors(k, dtype=torch.float32), num_examples=10 * (k + 1)) for k in range(3)]


# ---------------------------------------------------------------------------------------------- 1. ids and paths
@pytest.mark.parametrize("bad", ["../../../victim/data/clients/0", "..", "a/b", "/abs", ".hidden", "", "x" * 65, "a..b", "0\n"])
def test_check_id_refuses_everything_but_plain_names(bad):
    with pytest.raises(UnsafeInputError, match="is not a plain name"):
        check_id(bad)


@pytest.mark.parametrize("good", ["0", "17", "client-3", "site_a.v2", 4])
def test_check_id_accepts_plain_names(good):
    assert check_id(good) == str(good)


def test_confined_refuses_a_symlink_that_leads_out(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "root" / "rounds").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UnsafeInputError, match="outside"):
        confined(tmp_path / "root", "rounds", "1")
    assert confined(tmp_path / "root", "data", "x") == tmp_path / "root" / "data" / "x"


@pytest.mark.parametrize(
    "args",
    [
        ("local-train", "--client", "../../victim/data/clients/0", "--method", "fedsa"),
        ("local-train", "--client", "../../victim", "--steps", "1"),
        ("local-train", "--client", "/tmp", "--steps", "1"),
        ("local-train", "--client", "0/../../../victim", "--round", "3"),
    ],
)
def test_a_hostile_client_id_is_one_line_and_touches_nothing(ws, tmp_path, args):
    victim = tmp_path / "victim" / "data" / "clients" / "0"
    victim.mkdir(parents=True)
    (victim / "keep.txt").write_text("precious")
    before_ws, before_victim = tree(ws), tree(tmp_path / "victim")
    failed(run(*args, "-w", ws), "is not a plain name")
    assert tree(ws) == before_ws and tree(tmp_path / "victim") == before_victim


def test_a_symlinked_rounds_directory_is_refused(ws, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copytree(ws / "rounds", outside / "rounds")
    shutil.rmtree(ws / "rounds")
    (ws / "rounds").symlink_to(outside / "rounds")
    before = tree(outside)
    failed(run("local-train", "--client", "0", "-w", ws, "--steps", "1"), "outside")
    assert tree(outside) == before


# ---------------------------------------------------------------------------------------------- drops as files
def _drop_then(ws: Path, mutate) -> Path:
    train(ws, "0")
    drop = ws / "rounds" / "1" / "clients" / "0"
    mutate(drop)
    return drop


def _to_link(drop: Path) -> None:
    real = drop.parent.parent.parent.parent / "elsewhere-drop"
    shutil.move(drop, real)
    drop.symlink_to(real)


def _fifo_meta(drop: Path) -> None:
    (drop / META_FILE).unlink()
    os.mkfifo(drop / META_FILE)


def _fifo_tensors(drop: Path) -> None:
    (drop / TENSORS_FILE).unlink()
    os.mkfifo(drop / TENSORS_FILE)


def _linked_tensors(drop: Path) -> None:
    target = drop.parent.parent / "tensors-elsewhere"
    shutil.move(drop / TENSORS_FILE, target)
    (drop / TENSORS_FILE).symlink_to(target)


def _other_round(drop: Path) -> None:
    meta = json.loads((drop / META_FILE).read_text())
    (drop / META_FILE).write_text(json.dumps({**meta, "round": 7}))


def _other_client(drop: Path) -> None:
    meta = json.loads((drop / META_FILE).read_text())
    (drop / META_FILE).write_text(json.dumps({**meta, "client_id": "1"}))


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (_to_link, "is a symlink"),
        (_fifo_meta, "FIFO"),
        (_fifo_tensors, "FIFO"),
        (_linked_tensors, "is a symlink"),
        (_other_round, "says round 7"),
        (_other_client, "must be client '0'"),
    ],
)
def test_a_bad_drop_is_never_fused_and_never_hangs(ws, mutate, reason):
    _drop_then(ws, mutate)
    status = within(20, run, "status", "-w", ws, "--json")
    assert status.exit_code == 0, status.output
    assert reason in status.output
    result = within(30, run, "aggregate", "--round", "1", "-w", ws, "--wait", "--timeout", "1", "--poll", "0.2")
    failed(result, "0 valid drop(s)")
    assert not (ws / "rounds" / "1" / "global").exists()


def test_read_regular_refuses_a_fifo_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(UnsafeInputError, match="FIFO"):
        within(5, read_regular, tmp_path / "pipe")


# ---------------------------------------------------------------------------------------------- 2. outputs apart from inputs
@pytest.mark.parametrize(
    "out_of, message",
    [
        (lambda d: d[1], "is the input"),
        (lambda d: d[0].parent, "contains the input"),
        (lambda d: d[2] / "global", "lies inside the input"),
    ],
)
def test_out_never_touches_the_inputs(drops, tmp_path, out_of, message):
    out = out_of(drops)
    before = tree(tmp_path / "in")
    failed(run("aggregate", *drops, "--out", out, "--force"), message, code=2)
    assert tree(tmp_path / "in") == before


@pytest.mark.parametrize(
    "report_of, message",
    [
        (lambda d, out: out, "is the output"),
        (lambda d, out: out / "report.json", "lies inside the output"),
        (lambda d, out: d[0] / "report.json", "the input"),
        (lambda d, out: d[0] / META_FILE, "the input"),
    ],
)
def test_report_never_overlaps_out_or_inputs(drops, tmp_path, report_of, message):
    out = tmp_path / "g"
    before = tree(tmp_path / "in")
    failed(run("aggregate", *drops, "--out", out, "--report", report_of(drops, out), "--force"), message, code=2)
    assert not out.exists() and tree(tmp_path / "in") == before


@pytest.mark.parametrize("make_victim", ["dataset", "client-drop", "plain-file", "symlink"])
def test_force_replaces_only_an_earlier_output_of_the_same_kind(drops, tmp_path, make_victim):
    victim = tmp_path / "victim"
    if make_victim == "dataset":
        victim.mkdir()
        (victim / "state.json").write_text("{}")
    elif make_victim == "client-drop":
        write_client(tmp_path, "victim", lora_tensors(9, dtype=torch.float32))
    elif make_victim == "plain-file":
        victim.write_text("precious")
    else:
        (tmp_path / "real").mkdir()
        victim.symlink_to(tmp_path / "real")
    before = tree(tmp_path)
    failed(run("aggregate", *drops, "--out", victim, "--force"), "refusing to replace it, even with --force")
    assert tree(tmp_path) == before


def test_force_replaces_an_earlier_global_and_an_earlier_report(drops, tmp_path):
    out, report = tmp_path / "g", tmp_path / "r.json"
    assert run("aggregate", "--method", "fedit", *drops, "--out", out, "--report", report).exit_code == 0
    result = run("aggregate", "--method", "fedA2", *drops, "--out", out, "--report", report, "--force")
    assert result.exit_code == 0, result.output
    assert read_adapter(out).meta.method == "fedA2" and json.loads(report.read_text())["method"] == "fedA2"
    failed(run("aggregate", *drops, "--out", tmp_path / "g2", "--report", drops[0] / ".." / ".." / "in" / "0" / META_FILE, "--force"), "input")


# ---------------------------------------------------------------------------------------------- 3. weights and metadata as numbers
def _set_meta(drop: Path, **fields) -> None:
    meta = json.loads((drop / META_FILE).read_text())
    (drop / META_FILE).write_text(json.dumps({**meta, **fields}))


def test_huge_explicit_weights_normalise_correctly(drops, tmp_path):
    result = run("aggregate", "--method", "fedit", *drops, "--out", tmp_path / "g", "--weights", "1e308,1e308,1e308", "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r.json").read_text())["weights"] == pytest.approx([1 / 3] * 3)
    assert all(bool(t.any()) for t in read_adapter(tmp_path / "g").tensors.values())


def test_huge_num_examples_at_the_limit_normalise_correctly(drops, tmp_path):
    for drop in drops:
        _set_meta(drop, num_examples=2**53)
    assert run("aggregate", *drops, "--out", tmp_path / "g", "--report", tmp_path / "r.json").exit_code == 0
    assert json.loads((tmp_path / "r.json").read_text())["weights"] == pytest.approx([1 / 3] * 3)


@pytest.mark.parametrize(
    "weights, message",
    [("nan,1,1", "must be a finite number > 0"), ("inf,1,1", "must be a finite number > 0"), ("0,1,1", "must be a finite number > 0"),
     ("-1,1,1", "must be a finite number > 0"), ("1e-320,1e308,1", "do not normalise"), ("1e-300,1e-300,1e-300", None)],
)
def test_explicit_weights_are_checked(drops, tmp_path, weights, message):
    result = run("aggregate", *drops, "--out", tmp_path / "g", "--weights", weights)
    if message is None:
        assert result.exit_code == 0, result.output
    else:
        failed(result, message)
        assert not (tmp_path / "g").exists()


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"num_examples": 10**308}, "num_examples="),
        ({"num_examples": 10**400}, "num_examples="),
        ({"num_examples": True}, "num_examples=True"),
        ({"num_examples": 2.5}, "num_examples=2.5"),
        ({"num_examples": "10"}, "num_examples='10'"),
        ({"round": True}, "round=True"),
        ({"round": "1"}, "round='1'"),
        ({"modalities": 3}, "modalities=3"),
        ({"modalities": "image"}, "modalities='image'"),
        ({"modalities": ["smell"]}, "modalities=['smell']"),
        ({"client_id": "../x"}, "client_id='../x'"),
        ({"client_id": ["0"]}, "client_id=['0']"),
        ({"base_fingerprint": 5}, "base_fingerprint=5"),
        ({"extra": []}, "extra=[]"),
        ({"sha256": 1}, "sha256=1"),
    ],
)
def test_uniflow_json_fields_are_type_checked(drops, tmp_path, fields, message):
    _set_meta(drops[1], **fields)
    failed(run("aggregate", *drops, "--out", tmp_path / "g"), message)
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize(
    "config, message",
    [
        ({"lora_alpha": 0}, "lora_alpha=0 must be a finite number > 0"),
        ({"lora_alpha": "16"}, "lora_alpha='16'"),
        ({"lora_alpha": True}, "lora_alpha=True"),
        ({"alpha_pattern": {"q_proj(": 4}}, "is not a valid regex"),
        ({"alpha_pattern": {"q_proj": "x"}}, "alpha_pattern"),
        ({"alpha_pattern": [1]}, "alpha_pattern=[1]"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
        ({"r": True}, "r=True"),
        ({"use_rslora": "yes"}, "use_rslora='yes'"),
        ({"target_modules": 3}, "target_modules=3"),
    ],
)
def test_adapter_config_values_are_type_checked(tmp_path, config, message):
    # The first client's config is the one the math reads first: a bad value there must be one line too.
    first = write_client(tmp_path / "in", 0, lora_tensors(0, dtype=torch.float32))
    cfg = {**peft_config(), **config}
    (first / "adapter_config.json").write_text(json.dumps(cfg))
    second = write_client(tmp_path / "in", 1, lora_tensors(1, dtype=torch.float32))
    failed(run("aggregate", first, second, "--out", tmp_path / "g"), message)
    assert not (tmp_path / "g").exists()


def test_an_all_zero_global_is_never_published(tmp_path):
    zeros = {k: torch.zeros_like(v) for k, v in lora_tensors(0, dtype=torch.float32).items()}
    inputs = [write_client(tmp_path / "in", k, zeros) for k in range(2)]
    failed(run("aggregate", "--method", "fedit", *inputs, "--out", tmp_path / "g"), "every tensor of the fused global is zero")
    assert not (tmp_path / "g").exists()


def test_a_non_finite_global_is_never_published(tmp_path):
    big = {k: torch.full_like(v, 3e38) for k, v in lora_tensors(0, dtype=torch.float32).items()}
    inputs = [write_client(tmp_path / "in", k, big) for k in range(2)]
    failed(run("aggregate", "--method", "fedex", *inputs, "--out", tmp_path / "g"), "is not finite")
    assert not (tmp_path / "g").exists()


# ---------------------------------------------------------------------------------------------- 5. nothing fails after publish
def test_an_unwritable_report_fails_before_any_work(drops, tmp_path):
    (tmp_path / "afile").write_text("x")
    failed(run("aggregate", *drops, "--out", tmp_path / "g", "--report", tmp_path / "afile" / "r.json"), "is not a directory")
    assert not (tmp_path / "g").exists()


def test_a_report_that_cannot_be_written_leaves_no_global(drops, tmp_path, monkeypatch):
    import uniflow_cli.server as server

    class Full(server.StagedFile):
        def __init__(self, *args, **kwargs):
            raise OSError(28, "No space left on device", str(args[0]))

    monkeypatch.setattr(server, "StagedFile", Full)
    failed(run("aggregate", *drops, "--out", tmp_path / "g", "--report", tmp_path / "r.json"), "No space left on device")
    assert not (tmp_path / "g").exists() and not (tmp_path / "r.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_enospc_while_writing_an_adapter_is_one_line_and_leaves_nothing(drops, tmp_path, monkeypatch):
    import safetensors.torch

    def full(*_args, **_kwargs):
        raise safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    failed(run("aggregate", *drops, "--out", tmp_path / "g", "--report", tmp_path / "r.json"), "no space left on device")
    assert not (tmp_path / "g").exists() and not (tmp_path / "r.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_stale_temps_of_killed_runs_are_cleaned_and_live_ones_kept(drops, tmp_path):
    import fcntl

    old, young, locked = (tmp_path / f".g.tmp-{name}" for name in ("old", "young", "locked"))
    for path in (old, young, locked):
        path.mkdir()
        (path / "x").write_text("half-written")
    long_ago = time.time() - 3600
    os.utime(old, (long_ago, long_ago))
    os.utime(locked, (long_ago, long_ago))
    fd = os.open(locked, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a live writer
    try:
        assert run("aggregate", *drops, "--out", tmp_path / "g").exit_code == 0
    finally:
        os.close(fd)
    assert not old.exists() and young.exists() and locked.exists()


# ---------------------------------------------------------------------------------------------- 8. modes, recorded paths, init
def test_published_files_follow_the_umask(drops, tmp_path):
    previous = os.umask(0o027)
    try:
        assert run("aggregate", *drops, "--out", tmp_path / "g").exit_code == 0
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "g").iterdir()}
    assert set(modes.values()) == {0o640}, modes
    assert stat.S_IMODE((tmp_path / "g").stat().st_mode) == 0o750


def test_a_drop_records_no_absolute_path_of_the_client(ws):
    train(ws, "0")
    text = (ws / "rounds" / "1" / "clients" / "0" / META_FILE).read_text()
    assert json.loads(text)["extra"]["train"]["started_from"] == "rounds/0/global"
    assert str(ws) not in text and str(ws.resolve()) not in text


def test_init_force_refuses_while_later_rounds_exist(ws):
    train(ws, "0")
    assert run("aggregate", "--round", "1", "-w", ws).exit_code == 0
    before = tree(ws)
    failed(run("init", ws, "--preset", "tiny-random", "--modalities", "image", "--force"), "re-initialising would orphan them")
    assert tree(ws) == before


# ---------------------------------------------------------------------------------------------- 6. options that used to traceback
@pytest.mark.parametrize(
    "args, message",
    [
        (("aggregate", "--round", "1", "--wait", "--timeout", "nan"), "--timeout nan"),
        (("aggregate", "--round", "1", "--wait", "--timeout", "-1"), "--timeout -1"),
        (("aggregate", "--round", "1", "--wait", "--poll", "-1"), "--poll -1"),
        (("aggregate", "--round", "1", "--wait", "--poll", "nan"), "--poll nan"),
        (("aggregate", "--round", "1", "--poll", "0"), "--poll 0"),
        (("local-train", "--client", "0", "--wait", "--timeout", "nan"), "--timeout nan"),
        (("local-train", "--client", "0", "--wait", "--timeout", "inf"), "--timeout inf"),
    ],
)
def test_bad_wait_options_are_one_line(ws, args, message):
    before = tree(ws)
    failed(within(20, run, *args, "-w", ws), message)
    assert tree(ws) == before


# ---------------------------------------------------------------------------------------------- no output leaves its root
def test_a_round_writes_nothing_outside_its_workspace(ws, tmp_path):
    """A whole round — two clients, the server, status, evaluate — changes nothing outside the workspace."""
    sibling = tmp_path / "sibling"
    sibling.mkdir()
    (sibling / "data.txt").write_text("untouched")

    def outside() -> dict[str, str]:
        return {k: v for k, v in tree(tmp_path).items() if not k.startswith("fed")}

    before = outside()
    train(ws, "0", "--method", "fedsa")
    train(ws, "1", "--method", "fedsa")
    assert run("aggregate", "--round", "1", "-w", ws, "--method", "fedsa").exit_code == 0
    assert run("status", "-w", ws).exit_code == 0
    assert outside() == before


def test_partition_out_never_replaces_its_dataset_or_a_foreign_directory(tmp_path):
    data = tmp_path / "mine"
    data.mkdir()
    (data / "qa.jsonl").write_text("".join(json.dumps({"question": f"q{i}?", "answer": f"a{i}"}) + "\n" for i in range(12)))
    before = tree(tmp_path)
    base = ("partition", "-d", data / "qa.jsonl", "--clients", "text:2", "--train-per-client", "2", "--test-per-modality", "2", "--force")
    failed(run(*base, "--out", data), "contains the dataset")
    failed(run(*base, "--out", tmp_path), "contains the dataset")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("precious")
    before = tree(tmp_path)
    failed(run(*base, "--out", tmp_path / "foreign"), "refusing to replace it, even with --force")
    assert tree(tmp_path) == before
    assert run(*base, "--out", tmp_path / "parts").exit_code == 0
    assert run(*base, "--out", tmp_path / "parts").exit_code == 0  # an earlier partition is replaced


def test_report_out_never_replaces_a_run(ws):
    before = tree(ws)
    failed(run("report", ws, "--out", ws, "--force"), "is or contains the run")
    failed(run("report", ws, "--out", ws.parent, "--force"), "is or contains the run")
    assert tree(ws) == before


@pytest.mark.parametrize("out_of", [lambda g, d: d, lambda g, d: g, lambda g, d: g / "sub", lambda g, d: d.parent])
def test_local_train_out_never_touches_its_inputs(ws, tmp_path, out_of):
    g, d = ws / "rounds" / "0" / "global", ws / "data" / "clients" / "0"
    before = tree(ws)
    result = run("local-train", "--global", g, "--data", d, "--out", out_of(g, d), "-w", ws, "--steps", "1", "--force")
    failed(result, "--out", code=2)
    assert tree(ws) == before


def test_local_train_force_replaces_only_a_client_drop(ws, tmp_path):
    g, d = ws / "rounds" / "0" / "global", ws / "data" / "clients" / "0"
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("precious")
    before = tree(tmp_path / "foreign")
    failed(run("local-train", "--global", g, "--data", d, "--out", tmp_path / "foreign", "-w", ws, "--steps", "1", "--force"), "even with --force")
    assert tree(tmp_path / "foreign") == before
    for _ in range(2):  # the second run replaces the first run's drop
        result = run("local-train", "--global", g, "--data", d, "--out", tmp_path / "drop", "-w", ws, "--steps", "1", "--force")
        assert result.exit_code == 0, result.output
