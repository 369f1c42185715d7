"""The function-space gap (uniflow_cli.fidelity): the exact model is W0 + U, the loss is the mean the model trains
on, FedEx's gap is 0, and simulate --fidelity writes rounds/t/fidelity.json (refused where U is unknown)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.cli_runner import ok, run
from tests.workspace_factory import make_workspace
from uniflow_cli.adapters import read_adapter
from uniflow_cli.workspace import Workspace

LAYER = "base_model.model.llm.model.layers.0.self_attn.q_proj"
TRAIN = ("--steps", "3", "--lr", "1e-2", "--stages", "joint", "--batch-size", "2")


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    import os

    os.environ["UNIFLOW_THREADS"] = "1"
    return make_workspace(tmp_path_factory.mktemp("fidelity") / "ws", {"0": "image", "1": "text"}, test=("image", "text"))


@pytest.fixture(scope="module")
def fedit_round(template, tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("fedit") / "ws"
    shutil.copytree(template, ws)
    for client in ("0", "1"):
        ok("local-train", "--client", client, "-w", ws, "--method", "fedit", *TRAIN)
    ok("aggregate", "--round", 1, "-w", ws, "--method", "fedit", "--min-clients", 2)
    return ws


def test_the_exact_model_is_w0_plus_u(fedit_round):
    """Its q_proj weight + s·B·A equals W0 + Σ w_k s B_k A_k from the drops (the dense formula)."""
    from uniflow_cli.fidelity import _model, exact_global
    from uniflow_cli.aggregation.registry import method_spec
    from uniflow_cli.models import load_model
    from uniflow_cli.settings import AggregateSettings, LoraSettings, resolve, resolve_model

    ws = Workspace(fedit_round)
    model_cfg, lora = resolve_model(ws), resolve(LoraSettings, ws)
    exact = exact_global([ws.client_drop(1, k) for k in ("0", "1")], ws.global_dir(0), resolve(AggregateSettings, ws))
    model = _model(ws, 1, exact, method_spec("fedit"), model_cfg, lora, device=torch.device("cpu"))
    layer = model.get_submodule(LAYER)
    s = lora.lora_alpha / lora.r
    effective = layer.base_layer.weight + s * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    w0 = load_model(model_cfg, lora, 0).get_submodule(LAYER).base_layer.weight
    weights = [c["weight"] for c in json.loads(ws.round_report(1).read_text())["clients"]]
    drops = [read_adapter(ws.client_drop(1, k)) for k in ("0", "1")]
    u = sum(w * s * d.tensors[f"{LAYER}.lora_B.weight"] @ d.tensors[f"{LAYER}.lora_A.weight"] for w, d in zip(weights, drops))
    assert float(u.abs().max()) > 0
    torch.testing.assert_close(effective, w0 + u, rtol=1e-5, atol=1e-6)


def test_the_mean_loss_weights_each_batch_by_its_answer_tokens(template):
    """Batches of 8 against one row at a time weighted by its answer tokens (a second computation)."""
    from uniflow_cli.data.build import load_split
    from uniflow_cli.fidelity import mean_loss
    from uniflow_cli.models import load_model
    from uniflow_cli.settings import LoraSettings, resolve, resolve_model

    ws = Workspace(template)
    model = load_model(resolve_model(ws), resolve(LoraSettings, ws), 0).eval()
    rows = [r for k in ("0", "1") for r in load_split(ws.client_data(k))]
    total = count = 0.0
    with torch.no_grad():
        for row in rows:
            batch = model.collate([row], train=True)
            n = int((batch["labels"] != -100).sum())
            total, count = total + float(model(batch, full_logits=False).loss) * n, count + n
    assert mean_loss(model, rows, device=torch.device("cpu")) == pytest.approx(total / count, rel=1e-6)


@pytest.mark.parametrize("method", ["fedit", "fedex"])
def test_simulate_writes_the_gap_and_fedex_is_exact(template, tmp_path, method):
    ws = tmp_path / "ws"
    shutil.copytree(template, ws)
    ok("init", ws, "--preset", "tiny-random", "--modalities", "image", "--method", method, "--steps", 3, "--lr", "1e-2", "--batch-size", 2, "--force")
    payload = json.loads(ok("simulate", "-w", ws, "--rounds", 2, "--fidelity", "--json").stdout)
    gaps = [r["fidelity"] for r in payload["published"]]
    assert [g["round"] for g in gaps] == [1, 2] and all(g["rows_train"] == 8 and g["rows_test"] == 8 for g in gaps)
    assert json.loads((ws / "rounds" / "2" / "fidelity.json").read_text()) == gaps[1]
    if method == "fedex":  # its global + residual is W0 + U: the same model, the same losses up to rounding
        assert all(abs(g["gap_train"]) < 1e-5 and abs(g["gap_test"]) < 1e-5 for g in gaps)
    else:
        assert all(g["loss_train"] > 0 and g["loss_exact_train"] > 0 for g in gaps)


def test_a_method_without_both_factors_is_refused_before_training(template, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(template, ws)
    result = run("simulate", "-w", ws, "--rounds", 1, "--method", "fedsa", "--fidelity")
    assert result.exit_code != 0 and "needs every client's A and B, and fedsa uploads only A" in result.output
    assert not (ws / "rounds" / "1").exists()
