"""uniflow_cli.compute and its options: devices, precision, threads (CPU, tiny-random, fast).

Device resolution (auto on a CPU-only machine, a bad name, an absent device: one line), fp16 on the CPU,
the thread default and its environment variables, batches moved recursively, and local-train/evaluate in
bf16: a finite adapter changing the same tensors as float32, the same bytes twice, ``[train] precision``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import REPO
from tests.workspace_factory import make_workspace
from uniflow_cli import compute
from uniflow_cli.adapters import TENSORS_FILE, read_adapter
from uniflow_cli.cli.app import app
from uniflow_cli.compute import (PRECISIONS, autocast, check_precision, default_threads, precision_dtype, resolve_device, set_threads,
                                 to_device)
from uniflow_cli.errors import ConfigError
from uniflow_cli.settings import TrainSettings, resolve_train
from uniflow_cli.workspace import dumps_config, load_config

runner = CliRunner()
CPU_ONLY = not torch.cuda.is_available() and not compute._mps_available()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, text
    return " ".join(lines[0].split())


@pytest.fixture
def no_accelerator(monkeypatch):
    """This machine as a CPU-only one, whatever it has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(compute, "_mps_available", lambda: False)


# ---------------------------------------------------------------------------------------------- devices
@pytest.mark.skipif(not CPU_ONLY, reason="this machine has an accelerator")
def test_auto_is_the_cpu_on_this_machine():
    assert resolve_device("auto") == torch.device("cpu") == resolve_device()


def test_auto_without_accelerators_is_the_cpu(no_accelerator):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu") and resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:1"])
def test_absent_cuda_is_one_line_naming_the_device(no_accelerator, name):
    with pytest.raises(ConfigError) as info:
        resolve_device(name)
    message = one_line(str(info.value))
    assert message.startswith(f'device="{name}" is not available: ') and "Fix: set device = \"auto\"" in message
    assert info.value.field == "device"


def test_a_cuda_index_beyond_the_devices_names_them(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r'^device="cuda:2" is not available: this machine has 2 CUDA device\(s\), cuda:0\.\.cuda:1'):
        resolve_device("cuda:2")


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "tpu", "", "mps:1"])
def test_an_unknown_device_lists_the_choices(name):
    with pytest.raises(ConfigError) as info:
        resolve_device(name)
    assert one_line(str(info.value)) == f'device="{name}" is not one of auto, cpu, cuda, cuda:N, mps. Fix: set device = "auto"'


@pytest.mark.parametrize("command", ["local-train", "evaluate"])
def test_the_cli_names_the_device_flag(tmp_path, command):
    args = ["--client", 0] if command == "local-train" else ["--base"]
    result = run(command, *args, "-w", tmp_path, "--device", "gpu")
    assert result.exit_code == 2
    assert one_line(result.output) == "error: --device 'gpu' is not one of auto, cpu, cuda, cuda:N, mps. Fix: use --device auto"


# ---------------------------------------------------------------------------------------------- precision
def test_precisions_and_their_dtypes():
    assert PRECISIONS == ("fp32", "bf16", "fp16")
    assert [precision_dtype(p) for p in PRECISIONS] == [torch.float32, torch.bfloat16, torch.float16]
    with pytest.raises(ConfigError, match=r'^precision="fp8" is not one of fp32, bf16, fp16'):
        precision_dtype("fp8")


def test_fp16_on_the_cpu_is_one_line_and_bf16_is_fine():
    with pytest.raises(ConfigError) as info:
        check_precision("fp16", torch.device("cpu"))
    assert one_line(str(info.value)) == 'precision="fp16" needs a CUDA device (this run computes on cpu); on the CPU use bf16. Fix: set precision = "bf16"'
    check_precision("bf16", torch.device("cpu"))
    check_precision("fp32", "cpu")


def test_autocast_runs_matmuls_in_the_precision(monkeypatch):
    monkeypatch.setenv("UNIFLOW_BF16_MATH", "native")  # bf16 kernels, whatever this CPU has (see test_upcast)
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast(torch.device("cpu"), "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with autocast("cpu", "fp32"):
        assert (a @ b).dtype == torch.float32


def test_train_settings_take_a_precision_in_library_terms():
    assert TrainSettings().precision == "fp32" and TrainSettings(precision="bf16").precision == "bf16"
    with pytest.raises(ConfigError, match=r'^precision="half" is not one of fp32, bf16, fp16') as info:
        TrainSettings(precision="half")
    assert "--" not in str(info.value)


# ---------------------------------------------------------------------------------------------- threads
@pytest.fixture
def threads_env(monkeypatch):
    """No thread variables; torch's thread count restored afterwards."""
    before = torch.get_num_threads()
    monkeypatch.delenv(compute.THREADS_ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    yield monkeypatch
    torch.set_num_threads(before)


def test_default_threads_reads_the_variables_then_the_cores(threads_env):
    import os

    cores = compute.available_cores()
    assert 1 <= cores <= len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores >= 1
    assert default_threads() == cores
    threads_env.setenv("OMP_NUM_THREADS", "2")
    assert default_threads() == 2
    threads_env.setenv(compute.THREADS_ENV, " 1 ")
    assert default_threads() == 1  # UNIFLOW_THREADS first
    assert set_threads(None) == 1 and torch.get_num_threads() == 1
    assert set_threads(2) == 2 and torch.get_num_threads() == 2  # an explicit count wins over the variables


@pytest.mark.parametrize("value", ["0", "-2", "four", "1.5"])
def test_a_bad_thread_variable_is_one_line(threads_env, value):
    threads_env.setenv(compute.THREADS_ENV, value)
    with pytest.raises(ConfigError) as info:
        default_threads()
    assert one_line(str(info.value)) == f"UNIFLOW_THREADS={value!r} is not a whole number >= 1. Fix: set UNIFLOW_THREADS=1 (or more), or unset it for the default"


def test_omp_num_threads_is_read_as_openmp_does(threads_env):
    threads_env.setenv("OMP_NUM_THREADS", "1,2")  # nested levels: the first one counts
    assert default_threads() == 1
    threads_env.setenv("OMP_NUM_THREADS", "many")  # not uniflow's variable to refuse: the cores decide
    assert default_threads() == compute.available_cores()


@pytest.mark.parametrize("threads", [0, -1])
def test_set_threads_below_one_is_in_library_terms(threads_env, threads):
    with pytest.raises(ConfigError, match=rf"^threads={threads} must be >= 1\. Fix: set threads = 1$") as info:
        set_threads(threads)
    assert info.value.field == "threads"


def test_a_bad_thread_variable_stops_the_cli_in_one_line(threads_env, tmp_path):
    threads_env.setenv(compute.THREADS_ENV, "lots")
    result = run("local-train", "--client", 0, "-w", tmp_path)
    assert result.exit_code == 1 and one_line(result.output).startswith("error: UNIFLOW_THREADS='lots' is not a whole number >= 1")


def test_compute_and_settings_import_no_torch():
    code = "import sys, uniflow_cli.compute, uniflow_cli.settings, uniflow_cli.cli.options; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ---------------------------------------------------------------------------------------------- batches
def test_to_device_moves_every_tensor_of_a_nested_batch():
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "ids": ["a", "b"], "truncated": [False, True],
             "image": {"rows": torch.tensor([0]), "pixel_values": torch.zeros(1, 3, 4, 4)}, "pair": (torch.ones(1), 7), "none": None}
    moved = to_device(batch, torch.device("meta"))  # a device every machine has: shows what moved
    assert moved["input_ids"].is_meta and moved["image"]["rows"].is_meta and moved["image"]["pixel_values"].is_meta
    assert moved["pair"][0].is_meta and moved["pair"][1] == 7 and isinstance(moved["pair"], tuple)
    assert moved["ids"] == ["a", "b"] and moved["truncated"] == [False, True] and moved["none"] is None
    assert moved["input_ids"].dtype == torch.long and not batch["input_ids"].is_meta  # the input is left as it was
    same = to_device(batch, "cpu")
    assert same["input_ids"] is batch["input_ids"]  # already there: no copy


# ---------------------------------------------------------------------------------------------- local-train in bf16
@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("tpl") / "fed", {"0": "image", "1": "text"}, test=("text",))


@pytest.fixture
def ws(template, tmp_path) -> Path:
    dst = tmp_path / "fed"
    shutil.copytree(template, dst)
    return dst


def set_toml(ws: Path, table: str, **values) -> None:
    config = load_config(ws / "uniflow.toml")
    config[table].update(values)
    (ws / "uniflow.toml").write_text(dumps_config(config))


TRAIN = ("--steps", 3, "--lr", "5e-3", "--stages", "joint", "--threads", 1, "--device", "cpu")


def train(ws: Path, *extra) -> Path:
    result = run("local-train", "--client", "0", "-w", ws, *TRAIN, *extra)
    assert result.exit_code == 0, result.output
    return ws / "rounds" / "1" / "clients" / "0"


def changed_keys(ws: Path, drop: Path) -> set[str]:
    start = read_adapter(ws / "rounds" / "0" / "global").tensors
    return {k for k, v in read_adapter(drop).tensors.items() if not torch.equal(v, start[k])}


def test_bf16_changes_the_same_tensors_as_float32_and_stays_finite(template, tmp_path):
    runs = {}
    for precision in ("fp32", "bf16"):
        ws = tmp_path / precision
        shutil.copytree(template, ws)
        drop = train(ws, "--precision", precision)
        adapter = read_adapter(drop)
        assert all(v.dtype == torch.float32 and bool(torch.isfinite(v).all()) for v in adapter.tensors.values())
        config = adapter.meta.extra["train"]["config"]
        assert (config["precision"], config["device"], config["gradient_checkpointing"]) == (precision, "cpu", False)
        runs[precision] = changed_keys(ws, drop), adapter.meta.extra["train"], (drop / TENSORS_FILE).read_bytes()
    assert runs["bf16"][0] == runs["fp32"][0] and runs["fp32"][0]
    assert runs["bf16"][2] != runs["fp32"][2]  # bf16 did compute in bf16 (another rounding, other bytes)
    first = runs["fp32"][1]["first_loss"], runs["bf16"][1]["first_loss"]
    assert abs(first[0] - first[1]) <= 0.05 * abs(first[0])  # the same loss up to bf16's rounding


def test_bf16_same_inputs_give_the_same_bytes(template, tmp_path):
    drops = []
    for name in ("a", "b"):
        ws = tmp_path / name
        shutil.copytree(template, ws)
        drops.append(train(ws, "--precision", "bf16"))
    assert (drops[0] / TENSORS_FILE).read_bytes() == (drops[1] / TENSORS_FILE).read_bytes()


def test_the_train_table_precision_is_honoured_and_a_flag_wins(ws):
    set_toml(ws, "train", precision="bf16")
    assert resolve_train(None, {"precision": "bf16"}).precision == "bf16"
    drop = train(ws)
    assert read_adapter(drop).meta.extra["train"]["config"]["precision"] == "bf16"
    drop = train(ws, "--precision", "fp32", "--force")
    assert read_adapter(drop).meta.extra["train"]["config"]["precision"] == "fp32"


def test_a_bad_train_table_precision_names_the_toml_key(ws):
    set_toml(ws, "train", precision="bf32")
    result = run("local-train", "--client", "0", "-w", ws, "--steps", 1)
    assert result.exit_code == 1 and 'uniflow.toml [train]: precision="bf32" is not one of fp32, bf16, fp16' in one_line(result.output)
    assert not (ws / "rounds" / "1").exists()


def test_fp16_on_the_cpu_stops_local_train_before_any_work(ws):
    result = run("local-train", "--client", "0", "-w", ws, "--steps", 1, "--device", "cpu", "--precision", "fp16")
    assert result.exit_code == 2
    assert one_line(result.output).startswith("error: --precision 'fp16' needs a CUDA device (this run computes on cpu)")
    assert not (ws / "rounds" / "1").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_absent_cuda_stops_local_train_in_one_line(ws):
    result = run("local-train", "--client", "0", "-w", ws, "--steps", 1, "--device", "cuda")
    assert result.exit_code == 2 and one_line(result.output).startswith("error: --device 'cuda' is not available: ")
    assert not (ws / "rounds" / "1").exists()


def test_gradient_checkpointing_trains_and_is_recorded(ws):
    drop = train(ws, "--gradient-checkpointing", "--precision", "bf16")
    config = read_adapter(drop).meta.extra["train"]["config"]
    assert config["gradient_checkpointing"] is True and config["precision"] == "bf16"
    assert changed_keys(ws, drop)


# ---------------------------------------------------------------------------------------------- evaluate
def test_evaluate_in_bf16_records_device_and_precision(ws):
    from uniflow_cli.evaluation_io import read_eval_json

    result = run("evaluate", "--base", "-w", ws, "--modalities", "text", "--limit", 2, "--max-new-tokens", 2, "--device", "cpu", "--precision", "bf16", "--threads", 1)
    assert result.exit_code == 0, result.output
    config = read_eval_json(ws / "eval" / "round-0.json")["config"]
    assert (config["device"], config["precision"]) == ("cpu", "bf16")


def test_evaluate_takes_the_train_table_precision(ws):
    from uniflow_cli.evaluation import EvalOptions, EvalRequest, run_evaluate

    set_toml(ws, "train", precision="bf16")
    result = run_evaluate(EvalRequest(workspace=ws, base=True, modalities=["text"]), EvalOptions(limit=1, max_new_tokens=1, device="cpu"))
    assert result.payload["config"]["precision"] == "bf16"
    with pytest.raises(ConfigError, match=r'^precision="fp16" needs a CUDA device'):
        run_evaluate(EvalRequest(workspace=ws, base=True, modalities=["text"], force=True), EvalOptions(limit=1, device="cpu", precision="fp16"))


def test_evaluate_options_check_the_precision_name():
    from uniflow_cli.evaluation import EvalOptions

    with pytest.raises(ConfigError, match=r'^precision="bf8" is not one of'):
        EvalOptions(precision="bf8")


# ---------------------------------------------------------------------------------------------- Flower
def test_flower_run_config_compute_keys():
    pytest.importorskip("flwr")
    from uniflow_cli.flower.client import node_device
    from uniflow_cli.flower.settings import FlowerRunSettings

    plain = FlowerRunSettings.from_run_config({})
    assert (plain.device_name(), plain.train_overrides()["precision"], plain.gradient_checkpointing) == ("auto", None, None)
    given = FlowerRunSettings.from_run_config({"device": "cpu", "precision": "bf16", "gradient-checkpointing": True})
    assert given.device_name() == "cpu" and given.train_overrides()["precision"] == "bf16" and given.gradient_checkpointing is True
    assert given.device_name({"device": "cuda:1"}) == "cuda:1"  # the node's own device wins
    with pytest.raises(ConfigError, match=r"^run-config gradient-checkpointing='yes' must be true or false"):
        FlowerRunSettings.from_run_config({"gradient-checkpointing": "yes"})
    with pytest.raises(ConfigError, match=r'^run-config device="gpu" is not one of auto, cpu'):
        node_device(FlowerRunSettings(device="gpu"), {})
    with pytest.raises(ConfigError, match=r'^node-config device="tpu" is not one of'):
        node_device(given, {"device": "tpu"})
    from uniflow_cli.flower.settings import in_run_config_terms

    with pytest.raises(ConfigError, match=r'^run-config precision="fp8" is not one of fp32, bf16, fp16'):
        in_run_config_terms(lambda: resolve_train(None, FlowerRunSettings(precision="fp8").train_overrides()))


# ---------------------------------------------------------------------------------------------- the documented rule
def test_the_determinism_rule_names_threads_device_and_precision():
    text = " ".join((REPO / "docs" / "federation.md").read_text().split())
    rule = text[text.index("**Determinism.**"):][:400]
    assert all(word in rule for word in ("the device", "the precision", "the number of torch threads"))


# ---------------------------------------------------------------------------------------------- fp16's grad scaler
def test_the_grad_scaler_path_trains_the_same_bytes_and_skips_steps_without_gradients(template, tmp_path, monkeypatch):
    """fp16 runs through a GradScaler (CUDA only); its path is exercised here on the CPU in float32, where
    scaling by a power of two and unscaling again is exact: the same bytes as without the scaler. Client 1's
    text shard in a two-stage round also has stage-I steps with no gradient at all (no encoder on the path),
    which the scaler must skip rather than fail on."""
    made = []

    def cpu_scaler(device, precision):
        made.append(torch.amp.GradScaler("cpu", init_scale=2.0**12))
        return made[-1]

    drops = []
    for name, scaled in (("plain", False), ("scaled", True)):
        ws = tmp_path / name
        shutil.copytree(template, ws)
        if scaled:
            monkeypatch.setattr(compute, "grad_scaler", cpu_scaler)
        result = run("local-train", "--client", "1", "-w", ws, "--steps", 4, "--stage-tau", 0.5, "--lr", "5e-3", "--threads", 1, "--device", "cpu")
        assert result.exit_code == 0, result.output
        drops.append(ws / "rounds" / "1" / "clients" / "1")
    assert len(made) == 1 and made[0].get_scale() == 2.0**12  # no overflow: the scale never shrank
    assert (drops[0] / TENSORS_FILE).read_bytes() == (drops[1] / TENSORS_FILE).read_bytes()
    assert changed_keys(tmp_path / "scaled", drops[1])
