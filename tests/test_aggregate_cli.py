"""`uniflow aggregate` and `uniflow inspect` end to end: the adapter format, PEFT interop, and every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from uniflow_cli.adapters import META_FILE, TENSORS_FILE, read_adapter
from uniflow_cli.cli.app import app
from uniflow_cli.aggregation.linalg import fedA2_B_dense
from tests.lora_factory import MODULES, PREFIX, delta, lora_tensors, peft_config, write_client, write_plain_peft

runner = CliRunner()
Q = "model.layers.0.self_attn.q_proj"


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def drops(tmp_path: Path) -> list[Path]:
    return [write_client(tmp_path / "drops", k, lora_tensors(k, dtype=torch.float32), num_examples=10 * (k + 1)) for k in range(3)]


def assert_failed(result, message: str, code: int = 1, out: Path | None = None):
    assert result.exit_code == code, result.output
    assert message in result.output, result.output
    assert "Traceback" not in result.output
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


# ---------------------------------------------------------------------------------------------- happy paths
@pytest.mark.parametrize("method", ["fedit", "fedA2", "fedex", "svd", "flora", "lora-fair", "flexlora", "hetlora"])
def test_aggregate_writes_a_valid_global(drops, tmp_path, method):
    out = tmp_path / "global"
    result = run("aggregate", "--method", method, *drops, "--out", out, "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    loaded = read_adapter(out)
    assert loaded.meta.role == "global" and loaded.meta.method == method
    assert loaded.meta.num_examples == 60 and loaded.meta.base_fingerprint == "base-abc"
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["weights"] == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    assert len(report["layers"]) == len(MODULES)
    assert (out / "residual.safetensors").exists() == (method == "fedex")


def test_same_inputs_give_identical_bytes(drops, tmp_path):
    for name in ("a", "b"):
        assert run("aggregate", "--method", "fedA2", *drops, "--out", tmp_path / name).exit_code == 0
    assert (tmp_path / "a" / TENSORS_FILE).read_bytes() == (tmp_path / "b" / TENSORS_FILE).read_bytes()
    assert (tmp_path / "a" / "adapter_config.json").read_bytes() == (tmp_path / "b" / "adapter_config.json").read_bytes()


@pytest.mark.parametrize("weighting, flags, expected", [
    ("examples", [], [1 / 6, 2 / 6, 3 / 6]),
    ("uniform", ["--weighting", "uniform"], [1 / 3] * 3),
    ("explicit", ["--weights", "1,1,2"], [0.25, 0.25, 0.5]),
])
def test_weighting(drops, tmp_path, weighting, flags, expected):
    out = tmp_path / "g"
    assert run("aggregate", "--method", "fedit", *drops, "--out", out, *flags).exit_code == 0
    got = read_adapter(out)
    w = torch.tensor(expected, dtype=torch.float64)
    key = PREFIX + Q + ".lora_A.weight"
    expected_A = sum(wk * read_adapter(d).tensors[key].double() for wk, d in zip(w.tolist(), drops))
    assert torch.allclose(got.tensors[key].double(), expected_A, atol=1e-6)


def test_plain_peft_inputs_use_uniform_weights_with_a_notice(tmp_path):
    dirs = [write_plain_peft(tmp_path, f"p{k}", lora_tensors(k, dtype=torch.float32)) for k in range(2)]
    result = run("aggregate", "--method", "fedit", *dirs, "--out", tmp_path / "g")
    assert result.exit_code == 0, result.output
    assert "uniform weights" in result.output


def test_bfloat16_output_halves_the_bytes(drops, tmp_path):
    assert run("aggregate", *drops, "--out", tmp_path / "f32").exit_code == 0
    assert run("aggregate", *drops, "--out", tmp_path / "bf16", "--dtype", "bfloat16").exit_code == 0
    def payload(d):  # the tensor bytes (at these tiny shapes the JSON header would dominate the file size)
        return sum(t.numel() * t.element_size() for t in load_file(str(d / TENSORS_FILE)).values())

    assert payload(tmp_path / "bf16") * 2 == payload(tmp_path / "f32")
    assert read_adapter(tmp_path / "bf16").tensors[PREFIX + Q + ".lora_A.weight"].dtype == torch.bfloat16


def test_inspect_shows_layers(drops):
    result = run("inspect", drops[0])
    assert result.exit_code == 0, result.output
    assert "q_proj" in result.output and "v_proj" in result.output and "client" in result.output
    as_json = json.loads(run("inspect", drops[0], "--json").output)
    layer = next(l for l in as_json["layers"] if l["module"].endswith("q_proj"))
    t = read_adapter(drops[0]).tensors
    assert layer["delta_norm"] == pytest.approx(float(delta(t, peft_config(), Q).norm()), rel=1e-5)


def test_workspace_round(tmp_path):
    ws = tmp_path / "fed"
    ws.mkdir()
    (ws / "uniflow.toml").write_text('[aggregate]\nmethod = "fedit"\n')
    for k in range(2):
        write_client(ws / "rounds" / "1" / "clients", k, lora_tensors(k, dtype=torch.float32))
    (ws / "rounds" / "1" / "clients" / ".2.tmp-x").mkdir()  # an unfinished publish: ignored silently
    broken = ws / "rounds" / "1" / "clients" / "3"
    broken.mkdir()  # no uniflow.json: an incomplete drop, ignored with a notice
    result = run("aggregate", "--round", "1", "--workspace", ws)
    assert result.exit_code == 0, result.output
    assert "ignoring drop" in result.output and "no uniflow.json" in result.output
    assert read_adapter(ws / "rounds" / "1" / "global").meta.method == "fedit"  # the workspace default


# ---------------------------------------------------------------------------------------------- PEFT interop
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("method", ["fedA2", "fedex", "flora"])
def test_output_loads_in_peft_and_merges_to_the_method_definition(tmp_path, method):
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.utils import get_peft_model_state_dict

    from uniflow_cli.adapters import AdapterMeta, write_adapter

    # Prepare: three PEFT clients with non-zero B (as after training), different seeds.
    drops = []
    for k in range(3):
        model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        torch.manual_seed(100 + k)
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data.normal_()
        cfg = model.peft_config["default"].to_dict()
        drops.append(write_adapter(tmp_path / f"c{k}", peft_config=cfg, tensors=get_peft_model_state_dict(model),
                                   meta=AdapterMeta(role="client", client_id=str(k), num_examples=k + 1)))
    # Execute
    out = tmp_path / "global"
    assert run("aggregate", "--method", method, *drops, "--out", out).exit_code == 0
    # Assert: PEFT loads it, and merged weights − base weights = the method's ΔW.
    base = tiny_llama()
    merged = PeftModel.from_pretrained(tiny_llama(), out).merge_and_unload()
    clients = [read_adapter(d) for d in drops]
    w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64) / 6
    residual = read_adapter(out).residual or {}
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"):
        U = sum(wk * delta(c.tensors, c.peft_config, name) for wk, c in zip(w.tolist(), clients))
        got = merged.state_dict()[name + ".weight"].double() - base.state_dict()[name + ".weight"].double()
        if method == "fedex":
            got = got + residual[name + ".weight"].double()
        if method == "fedA2":
            # Eq. 9 and 13 from the clients' factors alone, dense: Ā = Σ w_k A_k, B = U Āᵀ (ĀĀᵀ + λI)⁻¹,
            # ΔW = B Ā (U and B in effective terms, s·B·A). A 4×16 Ā has full row rank, so the default
            # ridge=auto takes the plain branch (λ = 0).
            A_bar = sum(wk * c.tensors[PREFIX + name + ".lora_A.weight"].double() for wk, c in zip(w.tolist(), clients))
            expected = fedA2_B_dense(A_bar, U, 0.0) @ A_bar
            assert not torch.allclose(expected, U, atol=1e-3)  # the comparison below can tell fedA2 from an exact method
            assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
        else:  # fedex (with its residual) and flora are exact
            assert torch.allclose(got, U, atol=1e-5)


# ---------------------------------------------------------------------------------------------- bad input
def test_output_exists_is_refused_and_untouched(drops, tmp_path):
    out = tmp_path / "g"
    assert run("aggregate", *drops, "--out", out).exit_code == 0
    before = (out / TENSORS_FILE).read_bytes()
    result = run("aggregate", "--method", "fedit", *drops, "--out", out)
    assert_failed(result, "already exists")
    assert (out / TENSORS_FILE).read_bytes() == before
    assert run("aggregate", "--method", "fedit", *drops, "--out", out, "--force").exit_code == 0
    assert (out / TENSORS_FILE).read_bytes() != before


def test_truncated_safetensors(tmp_path):
    d = write_plain_peft(tmp_path, "p", lora_tensors(0, dtype=torch.float32))
    data = (d / TENSORS_FILE).read_bytes()
    (d / TENSORS_FILE).write_bytes(data[: len(data) // 2])
    assert_failed(run("aggregate", d, "--out", tmp_path / "g"), "not a readable safetensors file", out=tmp_path / "g")


def test_sha256_mismatch_half_written_drop(drops, tmp_path):
    data = (drops[1] / TENSORS_FILE).read_bytes()
    (drops[1] / TENSORS_FILE).write_bytes(data[:-8] + b"\0" * 8)
    assert_failed(run("aggregate", *drops, "--out", tmp_path / "g"), "half-written or corrupted drop", out=tmp_path / "g")


def test_nan_tensors(tmp_path):
    t = lora_tensors(0, dtype=torch.float32)
    t[PREFIX + Q + ".lora_A.weight"][0, 0] = float("inf")
    d = write_plain_peft(tmp_path, "p", t)
    assert_failed(run("aggregate", d, "--out", tmp_path / "g"), "contains NaN or Inf", out=tmp_path / "g")


def test_shape_mismatch(drops, tmp_path):
    other = write_client(tmp_path / "x", 9, lora_tensors(9, modules={Q: (6, 5), "model.layers.0.self_attn.v_proj": (4, 8)}, dtype=torch.float32))
    assert_failed(run("aggregate", drops[0], other, "--out", tmp_path / "g"), "shapes differ across clients", out=tmp_path / "g")


def test_rank_mismatch_within_a_client(tmp_path):
    t = lora_tensors(0, dtype=torch.float32)
    t[PREFIX + Q + ".lora_B.weight"] = torch.ones(6, 3)
    d = write_plain_peft(tmp_path, "p", t)
    assert_failed(run("aggregate", d, "--out", tmp_path / "g"), "lora_A of rank 2 but lora_B of rank 3", out=tmp_path / "g")


def test_different_target_modules(drops, tmp_path):
    other = write_client(tmp_path / "x", 9, lora_tensors(9, modules={Q: (6, 8)}, dtype=torch.float32))
    assert_failed(run("aggregate", drops[0], other, "--out", tmp_path / "g"), "targets different modules", out=tmp_path / "g")


def test_different_base_fingerprint(drops, tmp_path):
    other = write_client(tmp_path / "x", 9, lora_tensors(9, dtype=torch.float32), fingerprint="another-base")
    assert_failed(run("aggregate", drops[0], other, "--out", tmp_path / "g"), "base_fingerprint differs", out=tmp_path / "g")


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    ('{"role": "client", "num_examples": 0, "sha256": "x"}', "num_examples=0 must be a positive integer"),
    ('{"role": "client", "num_examples": -3, "sha256": "x"}', "num_examples=-3 must be a positive integer"),
    ('{"num_examples": 3}', "has no 'role'"),
    ('{"role": "boss"}', "role='boss' is not one of"),
])
def test_malformed_uniflow_json(drops, tmp_path, content, message):
    (drops[0] / META_FILE).write_text(content)
    assert_failed(run("aggregate", *drops, "--out", tmp_path / "g"), message, out=tmp_path / "g")


def test_duplicate_client_ids(drops, tmp_path):
    twin = write_client(tmp_path / "twin", 0, lora_tensors(5, dtype=torch.float32))
    assert_failed(run("aggregate", *drops, twin, "--out", tmp_path / "g"), "client id '0' appears twice", out=tmp_path / "g")


def test_same_directory_twice(drops, tmp_path):
    assert_failed(run("aggregate", drops[0], drops[0], "--out", tmp_path / "g"), "is given twice", code=2, out=tmp_path / "g")


@pytest.mark.parametrize("flags, message", [
    (["--method", "fedavg"], "--method 'fedavg' is not one of fedit"),
    (["--lambda", "-1"], "--lambda -1.0 must be a finite number >= 0"),
    (["--ridge", "maybe"], "--ridge 'maybe' is not one of"),
    (["--weights", "1,x,2"], "--weights entry 'x' is not a number"),
    (["--weights", "1,2"], "--weights has 2 values for 3 adapters"),
    (["--weights", "1,0,2"], "client weight 0.0 must be"),
    (["--dtype", "int8"], "--dtype 'int8' is not one of"),
])
def test_usage_errors_exit_2(drops, tmp_path, flags, message):
    assert_failed(run("aggregate", *drops, "--out", tmp_path / "g", *flags), message, code=2, out=tmp_path / "g")


def test_no_inputs(tmp_path):
    assert_failed(run("aggregate", "--out", tmp_path / "g"), "no client adapters to aggregate", code=2, out=tmp_path / "g")


def test_missing_directory(tmp_path):
    assert_failed(run("aggregate", tmp_path / "nope", "--out", tmp_path / "g"), "does not exist", out=tmp_path / "g")


def test_ffa_with_trained_A_is_refused(drops, tmp_path):
    assert_failed(run("aggregate", "--method", "ffa", *drops, "--out", tmp_path / "g"), "changed the frozen", out=tmp_path / "g")


def test_traceback_only_with_debug(drops, tmp_path, monkeypatch):
    monkeypatch.setenv("UNIFLOW_DEBUG", "1")
    result = runner.invoke(app, ["aggregate", str(tmp_path / "nope"), "--out", str(tmp_path / "g")])
    assert result.exit_code == 1
    assert "Traceback" in result.output


def test_explicit_mode_ignores_a_workspace_in_the_cwd(drops, tmp_path, monkeypatch):
    """Explicit aggregation uses only what it is given: a uniflow.toml in the cwd (or $UNIFLOW_WORKSPACE)
    must not change the method; --workspace, given on purpose, does."""
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (decoy / "uniflow.toml").write_text('[aggregate]\nmethod = "fedit"\n')
    monkeypatch.chdir(decoy)
    monkeypatch.setenv("UNIFLOW_WORKSPACE", str(decoy))
    assert run("aggregate", *drops, "--out", tmp_path / "g").exit_code == 0
    assert read_adapter(tmp_path / "g").meta.method == "fedA2"  # the built-in default, not the decoy's fedit
    assert run("aggregate", *drops, "--out", tmp_path / "g2", "--workspace", decoy).exit_code == 0
    assert read_adapter(tmp_path / "g2").meta.method == "fedit"


def test_global_carries_the_model_settings_its_drops_record(tmp_path):
    """The drops' common extra.settings go into the global, so an explicit-mode client needs no --preset."""
    settings = {"model": {"preset": "tiny-random", "modalities": ["image"]}, "lora": {"r": 4}}
    drops = [write_client(tmp_path / "d", k, lora_tensors(k, dtype=torch.float32)) for k in range(2)]
    for d in drops:
        meta = json.loads((d / META_FILE).read_text())
        meta["extra"] = {"settings": settings}
        (d / META_FILE).write_text(json.dumps(meta))
    assert run("aggregate", *drops, "--out", tmp_path / "g").exit_code == 0
    assert read_adapter(tmp_path / "g").meta.extra["settings"] == settings
