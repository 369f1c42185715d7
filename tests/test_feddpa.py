"""FedDPA: each client trains a local adapter beside the global one (both active), uploads only the global
adapter (fused as FedIT's), keeps the local one in ``state/clients/<k>/``, and ``evaluate --client K`` scores
the personalised model (global + local). LoRA and VeRA."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.cli_runner import ok, run
from tests.workspace_factory import make_workspace, write_shard
from uniflow_cli.adapters import read_adapter

CLIENTS = {"0": "image", "1": "image"}
TRAIN = ("--steps", "3", "--stages", "joint", "--lr", "5e-3", "--batch-size", "2")


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("UNIFLOW_THREADS", "1")


def _settings(adapter: str = "lora"):
    from uniflow_cli.settings import LoraSettings, resolve_model

    return resolve_model(None, {"preset": "tiny-random", "modalities": ["image"]}), LoraSettings(adapter=adapter)


# ---------------------------------------------------------------------------------------------- the model
def test_both_adapters_are_active_and_a_layer_computes_the_dense_sum():
    """y = W₀x + s·B_g A_g x + s·B_l A_l x on an LLM layer, against the dense formula (random factors)."""
    from uniflow_cli.models import load_model
    from uniflow_cli.models.lora import LOCAL_ADAPTER

    model_cfg, lora = _settings()
    model = load_model(model_cfg, lora, 0, local_adapter=True).eval()
    layer = model.get_submodule("base_model.model.llm.model.layers.0.self_attn.q_proj")
    gen = torch.Generator().manual_seed(3)
    factors = {}
    with torch.no_grad():
        for name in ("default", LOCAL_ADAPTER):
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            a.copy_(torch.randn(a.shape, generator=gen))
            b.copy_(torch.randn(b.shape, generator=gen))
            factors[name] = (a.clone(), b.clone())
        x = torch.randn(5, layer.in_features, generator=gen)
        got = layer(x)
    s = lora.lora_alpha / lora.r  # plain LoRA's scaling, the same for both adapters
    w0 = layer.base_layer.weight
    expected = x @ w0.T + sum(s * (x @ a.T @ b.T) for a, b in factors.values())
    if layer.base_layer.bias is not None:
        expected = expected + layer.base_layer.bias
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert list(model.active_adapters) == ["default", LOCAL_ADAPTER]


def test_the_local_adapter_is_seeded_float32_and_not_a_twin_of_the_global():
    from uniflow_cli.models import load_model
    from uniflow_cli.models.lora import adapter_tensors, local_adapter_tensors

    model_cfg, lora = _settings()
    one, two = (load_model(model_cfg, lora, 0, local_adapter=True) for _ in range(2))
    local_one, local_two = local_adapter_tensors(one), local_adapter_tensors(two)
    assert local_one.keys() == local_two.keys() and all(torch.equal(local_one[k], local_two[k]) for k in local_one)
    shared = adapter_tensors(one)
    a_keys = [k for k in local_one if k.endswith("lora_A.weight")]
    assert a_keys and all(not torch.equal(local_one[k], shared[k]) for k in a_keys)  # another init stream
    assert all(v.dtype == torch.float32 for v in local_one.values())
    assert not any("projectors" in k for k in local_one)  # the projectors are the global adapter's alone
    assert set(local_one) < set(shared)


def test_loading_a_local_adapter_checks_keys_and_shapes():
    from uniflow_cli.errors import IncompatibleAdaptersError
    from uniflow_cli.models import load_model
    from uniflow_cli.models.lora import load_local_tensors, local_adapter_tensors

    model_cfg, lora = _settings()
    model = load_model(model_cfg, lora, 0, local_adapter=True)
    local = local_adapter_tensors(model)
    key = next(k for k in local if k.endswith("lora_B.weight"))
    load_local_tensors(model, {key: torch.full_like(local[key], 0.5)})
    assert torch.equal(local_adapter_tensors(model)[key], torch.full_like(local[key], 0.5))
    with pytest.raises(IncompatibleAdaptersError, match="local adapter lacks"):
        load_local_tensors(model, {"base_model.model.projectors.image.weight": torch.zeros(1)})
    with pytest.raises(IncompatibleAdaptersError, match=r"has shape \(1, 1\)"):
        load_local_tensors(model, {key: torch.zeros(1, 1)})


# ---------------------------------------------------------------------------------------------- a round
@pytest.fixture(scope="module")
def rounds(tmp_path_factory) -> Path:
    """Two FedDPA rounds of two image clients through the file-drop commands."""
    ws = make_workspace(tmp_path_factory.mktemp("feddpa") / "ws", CLIENTS, test=("image",))
    for t in (1, 2):
        for client in CLIENTS:
            ok("local-train", "--client", client, "-w", ws, "--method", "feddpa", *TRAIN)
            if t == 1 and client == "0":
                shutil.copytree(ws / "state" / "clients" / "0", ws.parent / "state-0-round-1")
        ok("aggregate", "--round", t, "-w", ws, "--method", "feddpa", "--min-clients", 2)
    return ws


def test_the_drop_is_the_global_adapter_and_the_local_one_stays(rounds):
    drop, global_ = read_adapter(rounds / "rounds" / "2" / "clients" / "0"), read_adapter(rounds / "rounds" / "2" / "global")
    state = read_adapter(rounds / "state" / "clients" / "0")
    assert set(drop.tensors) == set(global_.tensors)  # A, B and the projectors: what FedIT sends
    assert state.meta.round == 2 and state.meta.method == "feddpa" and state.peft_config.get("modules_to_save") is None
    assert set(state.tensors) < set(drop.tensors) and not any("projectors" in k for k in state.tensors)
    assert any(float(v.abs().max()) > 0 for k, v in state.tensors.items() if k.endswith("lora_B.weight"))  # it trained
    # The local adapter never leaves the client: no uploaded tensor equals it.
    assert all(not torch.equal(state.tensors[k], drop.tensors[k]) for k in state.tensors if k.endswith("lora_B.weight"))


def test_the_global_is_the_fedit_average_of_the_drops(rounds, tmp_path):
    ok("aggregate", "--method", "fedit", "--out", tmp_path / "fedit", rounds / "rounds" / "2" / "clients" / "0", rounds / "rounds" / "2" / "clients" / "1")
    fedit, feddpa = read_adapter(tmp_path / "fedit"), read_adapter(rounds / "rounds" / "2" / "global")
    assert fedit.tensors.keys() == feddpa.tensors.keys()
    assert all(torch.equal(fedit.tensors[k], feddpa.tensors[k]) for k in fedit.tensors)


def test_round_two_starts_from_the_clients_own_local_adapter(rounds):
    """The next round's model carries the state the client kept, not a fresh local adapter."""
    from uniflow_cli.client_round import read_client_state, starting_model
    from uniflow_cli.aggregation.registry import method_spec
    from uniflow_cli.models.lora import local_adapter_tensors

    kept = read_client_state(rounds.parent / "state-0-round-1", "feddpa")
    model_cfg, lora = _settings()
    model, _ = starting_model(read_adapter(rounds / "rounds" / "1" / "global"), model_cfg, lora, method_spec("feddpa"), round_=2, private=kept)
    loaded = local_adapter_tensors(model)
    assert kept and all(torch.equal(loaded[k], kept[k]) for k in kept)


def test_personalised_evaluation_is_the_global_plus_the_local_adapter(rounds):
    from uniflow_cli.eval_target import EvalRequest, resolve_target
    from uniflow_cli.evaluation import build_model
    from uniflow_cli.models.lora import adapter_tensors, local_adapter_tensors

    target = resolve_target(EvalRequest(workspace=rounds, round=2, client="0"))
    built = build_model(target)
    state, global_ = read_adapter(rounds / "state" / "clients" / "0"), read_adapter(rounds / "rounds" / "2" / "global")
    local, shared = local_adapter_tensors(built.model), adapter_tensors(built.model)
    assert all(torch.equal(local[k], state.tensors[k]) for k in state.tensors)
    assert all(torch.equal(shared[k], global_.tensors[k]) for k in global_.tensors)
    assert any("local adapter" in n for n in target.notices)
    result = ok("evaluate", "-w", rounds, "--round", 2, "--client", 0, "--max-new-tokens", 4)
    assert "client 0's private state" in result.output and (rounds / "eval" / "clients" / "0" / "round-2.json").is_file()


def test_a_stale_local_adapter_is_refused(rounds, tmp_path):
    result = run("evaluate", "-w", rounds, "--round", 1, "--client", 0, "--out", tmp_path / "e.json")
    assert result.exit_code != 0 and "is from round 2, not round 1" in result.output


def test_explicit_feddpa_without_a_state_dir_is_one_line(rounds, tmp_path):
    result = run("local-train", "--global", rounds / "rounds" / "2" / "global", "--data", rounds / "data" / "clients" / "0",
                 "--out", tmp_path / "drop", "--method", "feddpa", "--steps", "1")
    assert result.exit_code != 0 and "keeps each client's local adapter between rounds" in result.output and "--state" in result.output
    assert not (tmp_path / "drop").exists()


# ---------------------------------------------------------------------------------------------- VeRA
def test_feddpa_on_vera_keeps_its_vectors_and_shares_the_projections(tmp_path):
    from uniflow_cli.eval_target import EvalRequest, resolve_target
    from uniflow_cli.evaluation import build_model

    ws = tmp_path / "ws"
    ok("init", ws, "--preset", "tiny-random", "--modalities", "image", "--adapter", "vera", "--method", "feddpa")
    write_shard(ws / "data" / "clients" / "0", "image")
    write_shard(ws / "data" / "test" / "image", "image", n=4, offset=100)
    ok("local-train", "--client", "0", "-w", ws, *TRAIN)
    ok("aggregate", "--round", 1, "-w", ws, "--min-clients", 1)
    state = read_adapter(ws / "state" / "clients" / "0")
    assert state.tensors and all(k.endswith(("vera_lambda_d", "vera_lambda_b")) for k in state.tensors)
    model = build_model(resolve_target(EvalRequest(workspace=ws, round=1, client="0"))).model
    vera_A, vera_B = model.base_model.vera_A, model.base_model.vera_B
    assert torch.equal(vera_A["default"], vera_A["local"]) and torch.equal(vera_B["default"], vera_B["local"])
    global_ = read_adapter(ws / "rounds" / "1" / "global")
    assert torch.equal(vera_A["default"], global_.tensors["base_model.vera_A"])
