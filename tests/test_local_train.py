"""`uniflow local-train` on the tiny-random preset: schedule, stage exactness, per-method behaviour, faults."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from uniflow_cli.adapters import TENSORS_FILE, read_adapter
from uniflow_cli.cli.app import app
from uniflow_cli.training import LocalTrainConfig, run_local_train, stage_plan
from tests.workspace_factory import make_workspace

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


# ---------------------------------------------------------------------------------------------- the schedule
@pytest.mark.parametrize(
    "steps, tau, stages, by, round_, rounds, expected",
    [
        (8, 0.25, "two-stage", "step", 1, None, ["encoder"] * 2 + ["llm"] * 6),
        (5, 0.25, "two-stage", "step", 1, None, ["encoder"] * 2 + ["llm"] * 3),  # ⌈1.25⌉ = 2
        (4, 0.0, "two-stage", "step", 1, None, ["llm"] * 4),  # τ = 0: only the LLM
        (4, 1.0, "two-stage", "step", 1, None, ["encoder"] * 4),  # τ = 1: only the encoders
        (4, 0.25, "reverse", "step", 1, None, ["llm"] * 3 + ["encoder"]),
        (3, 0.25, "joint", "step", 1, None, ["both"] * 3),
        (3, 0.5, "llm-only", "step", 1, None, ["llm"] * 3),
        (2, 0.5, "two-stage", "round", 5, 10, ["encoder"] * 2),  # round 5 of 10: 4 < 5
        (2, 0.5, "two-stage", "round", 6, 10, ["llm"] * 2),
    ],
)
def test_stage_plan(steps, tau, stages, by, round_, rounds, expected):
    cfg = LocalTrainConfig(tau=tau, steps=steps, stages=stages, stage_by=by)
    assert stage_plan(steps, cfg, round_=round_, total_rounds=rounds) == expected


@pytest.mark.parametrize("kwargs, message", [
    ({"tau": 1.5}, "--stage-tau 1.5 must be in"), ({"steps": 0}, "--steps 0 must be"), ({"stages": "both"}, "--stages 'both'"),
    ({"steps": 2, "epochs": 1.0}, "both given"), ({"lr": -1.0}, "--lr -1.0"),
])
def test_config_is_validated(kwargs, message):
    from uniflow_cli.errors import UsageError

    with pytest.raises(UsageError, match=message):
        LocalTrainConfig(**kwargs)


# ---------------------------------------------------------------------------------------------- a tiny workspace
@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("tpl") / "fed", {"0": "image", "1": "text"})


@pytest.fixture
def ws(template, tmp_path) -> Path:
    dst = tmp_path / "fed"
    shutil.copytree(template, dst)
    return dst


def drop_vs_global(ws: Path, client: str = "0"):
    drop = read_adapter(ws / "rounds" / "1" / "clients" / client)
    start = read_adapter(ws / "rounds" / "0" / "global")
    changed = {k for k, v in drop.tensors.items() if not torch.equal(v, start.tensors[k])}
    return drop, start, changed


def is_encoder(key: str) -> bool:
    return ".encoders." in key or ".projectors." in key


def test_loss_falls_and_metadata_is_recorded(ws):
    result = run("local-train", "--client", "0", "-w", ws, "--steps", "12", "--lr", "5e-3", "--batch-size", "4", "--stages", "joint")
    assert result.exit_code == 0, result.output
    drop = read_adapter(ws / "rounds" / "1" / "clients" / "0")
    train = drop.meta.extra["train"]
    assert drop.meta.role == "client" and drop.meta.round == 1 and drop.meta.num_examples == 4
    assert drop.meta.modalities == ["image"]
    assert train["last_loss"] < train["first_loss"]
    assert train["config"]["lr"] == 5e-3 and train["upload_bytes"] > 0


@pytest.mark.parametrize("stages, tau, expect_encoder, expect_llm, per_stage", [
    ("encoder-only", 0.25, True, False, {"encoder": 4}),
    ("llm-only", 0.25, False, True, {"llm": 4}),
    ("two-stage", 0.5, True, True, {"encoder": 2, "llm": 2}),
])
def test_stage_exactness(ws, stages, tau, expect_encoder, expect_llm, per_stage):
    result = run("local-train", "--client", "0", "-w", ws, "--steps", "4", "--lr", "1e-3", "--stages", stages, "--stage-tau", tau)
    assert result.exit_code == 0, result.output
    drop, _, changed = drop_vs_global(ws)
    assert any(is_encoder(k) for k in changed) == expect_encoder
    assert any(".llm." in k for k in changed) == expect_llm
    assert all(is_encoder(k) for k in changed) or expect_llm
    assert all(".llm." in k for k in changed) or expect_encoder
    assert drop.meta.extra["train"]["steps_per_stage"] == per_stage


def test_text_only_client_in_stage_one_is_a_no_op_step(ws):
    result = run("local-train", "--client", "1", "-w", ws, "--steps", "2", "--stages", "encoder-only")
    assert result.exit_code == 0, result.output
    _, _, changed = drop_vs_global(ws, "1")
    assert changed == set()


def test_ffa_leaves_A_frozen_and_uploads_B_only(ws):
    result = run("local-train", "--client", "0", "-w", ws, "--steps", "3", "--method", "ffa", "--stages", "joint", "--lr", "1e-3")
    assert result.exit_code == 0, result.output
    drop = read_adapter(ws / "rounds" / "1" / "clients" / "0")
    assert not any(k.endswith("lora_A.weight") for k in drop.tensors)
    assert any(k.endswith("lora_B.weight") for k in drop.tensors)


def test_fedsa_keeps_B_private(ws):
    result = run("local-train", "--client", "0", "-w", ws, "--steps", "3", "--method", "fedsa", "--stages", "joint", "--lr", "1e-3")
    assert result.exit_code == 0, result.output
    drop = read_adapter(ws / "rounds" / "1" / "clients" / "0")
    assert not any(k.endswith("lora_B.weight") for k in drop.tensors)
    private = read_adapter(ws / "state" / "clients" / "0")
    assert private.tensors and all(k.endswith("lora_B.weight") for k in private.tensors)
    assert any(bool(v.abs().sum() > 0) for v in private.tensors.values())


def test_same_seed_same_bytes(ws, tmp_path):
    g, d = ws / "rounds" / "0" / "global", ws / "data" / "clients" / "0"
    for name in ("a", "b"):
        result = run("local-train", "-w", ws, "--global", g, "--data", d, "--out", tmp_path / name, "--steps", "2", "--seed", "7")
        assert result.exit_code == 0, result.output
    assert (tmp_path / "a" / TENSORS_FILE).read_bytes() == (tmp_path / "b" / TENSORS_FILE).read_bytes()


def test_fedex_residual_folding_matches_the_dense_merged_model(ws):
    from uniflow_cli.models import ModelSettings, model_from_adapter
    from uniflow_cli.models.lora import unwrap
    from uniflow_cli.models.lora import add_to_base
    from uniflow_cli.workspace import load_config

    settings = ModelSettings.from_dict(load_config(ws / "uniflow.toml")["model"])
    start = read_adapter(ws / "rounds" / "0" / "global")
    gen = torch.Generator().manual_seed(0)
    for key in start.tensors:  # a global with non-zero B, as after a round
        if key.endswith("lora_B.weight"):
            start.tensors[key] = torch.randn(start.tensors[key].shape, generator=gen) * 0.1
    folded = model_from_adapter(settings, start)
    weights = {k: v for k, v in unwrap(folded).state_dict().items() if k.endswith("q_proj.base_layer.weight")}
    residual = {k.replace(".base_layer", ""): torch.randn(v.shape, generator=gen) * 0.1 for k, v in weights.items()}
    add_to_base(folded, residual)
    dense = model_from_adapter(settings, start).merge_and_unload()
    state = dense.state_dict()
    for key, delta in residual.items():
        state[key] += delta
    dense.load_state_dict(state)
    from uniflow_cli.data.build import load_split
    from uniflow_cli.models import collate

    batch = collate([load_split(ws / "data" / "clients" / "1")[0]], folded)
    with torch.no_grad():
        assert torch.allclose(folded(batch).logits, dense(batch).logits, atol=1e-5)


# ---------------------------------------------------------------------------------------------- faults
def test_no_published_global(ws):
    shutil.rmtree(ws / "rounds")
    result = run("local-train", "--client", "0", "-w", ws, "--steps", "1")
    assert result.exit_code == 1 and "no global adapter is published" in result.output


def test_missing_shard(ws):
    result = run("local-train", "--client", "7", "-w", ws, "--steps", "1")
    assert result.exit_code == 1 and "no dataset directory" in result.output
    assert not (ws / "rounds" / "1" / "clients" / "7").exists()


def test_output_exists(ws):
    assert run("local-train", "--client", "0", "-w", ws, "--steps", "1").exit_code == 0
    before = (ws / "rounds" / "1" / "clients" / "0" / TENSORS_FILE).read_bytes()
    result = run("local-train", "--client", "0", "-w", ws, "--steps", "2", "--round", "1")
    assert result.exit_code == 1 and "already exists" in result.output
    assert (ws / "rounds" / "1" / "clients" / "0" / TENSORS_FILE).read_bytes() == before


def test_global_from_another_base(ws):
    import json

    meta_path = ws / "rounds" / "0" / "global" / "uniflow.json"
    meta = json.loads(meta_path.read_text())
    meta["base_fingerprint"] = "another-base"
    meta_path.write_text(json.dumps(meta))
    result = run("local-train", "--client", "0", "-w", ws, "--steps", "1")
    assert result.exit_code == 1 and "another-base" in result.output
    assert not (ws / "rounds" / "1").exists() or not any((ws / "rounds" / "1" / "clients").iterdir())


def test_non_finite_loss_publishes_nothing(ws):
    result = run("local-train", "--client", "0", "-w", ws, "--steps", "6", "--lr", "1e30", "--stages", "joint")
    assert result.exit_code == 1 and "non-finite loss" in result.output
    assert not (ws / "rounds" / "1" / "clients" / "0").exists()


def test_killed_mid_run_publishes_nothing_and_a_rerun_succeeds(ws):
    def die(done, total, loss, stage):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_local_train(LocalTrainConfig(steps=4), client="0", workspace=ws, on_step=die)
    clients = ws / "rounds" / "1" / "clients"
    assert not clients.exists() or list(clients.iterdir()) == []
    outcome = run_local_train(LocalTrainConfig(steps=2), client="0", workspace=ws)
    assert outcome.out.is_dir()
