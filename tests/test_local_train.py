"""`uniflow local-train` on the tiny-random preset: schedule, stage exactness, per-method behaviour, faults."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from uniflow_cli.adapters import TENSORS_FILE, read_adapter
from uniflow_cli.cli.app import app
from uniflow_cli.errors import ConfigError, UsageError
from uniflow_cli.local_train import run_local_train
from uniflow_cli.schedule import stage_plan
from uniflow_cli.settings import TrainSettings
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
    cfg = TrainSettings(tau=tau, steps=steps, stages=stages, stage_by=by)
    assert stage_plan(steps, cfg, round_=round_, total_rounds=rounds) == expected


# In library terms now (the settings' own names); the CLI words the same errors as its flags (below).
@pytest.mark.parametrize("kwargs, message", [
    ({"tau": 1.5}, "tau=1.5 must be in"), ({"steps": 0}, "steps=0 must be"), ({"stages": "both"}, 'stages="both" is not one of'),
    ({"steps": 2, "epochs": 1.0}, "both given"), ({"lr": -1.0}, "lr=-1.0 must be"),
])
def test_config_is_validated(kwargs, message):
    with pytest.raises(ConfigError, match=message) as info:
        TrainSettings(**kwargs)
    assert "--" not in str(info.value)


# ---------------------------------------------------------------------------------------------- a tiny workspace
@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("tpl") / "fed", {"0": "image", "1": "text"})


@pytest.fixture
def ws(template, tmp_path) -> Path:
    dst = tmp_path / "fed"
    shutil.copytree(template, dst)
    return dst


@pytest.mark.parametrize("args, message", [
    (["--stage-tau", "1.5"], "--stage-tau 1.5 must be in [0, 1]. Fix: use --stage-tau 0.25"),
    (["--steps", "0"], "--steps 0 must be >= 1"),
    (["--stages", "both"], "--stages 'both' is not one of"),
    (["--grad-accum", "0"], "--grad-accum 0 must be >= 1"),
    (["--max-length", "4"], "--max-length 4 is too small"),
])
def test_cli_names_the_flag(ws, args, message):
    result = run("local-train", "--client", "0", "-w", ws, *args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (ws / "rounds" / "1").exists()


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
        run_local_train(TrainSettings(steps=4), client="0", workspace=ws, on_step=die)
    clients = ws / "rounds" / "1" / "clients"
    assert not clients.exists() or list(clients.iterdir()) == []
    outcome = run_local_train(TrainSettings(steps=2), client="0", workspace=ws)
    assert outcome.out.is_dir()


# ---------------------------------------------------------------------------------------------- settings (issue 13)
def set_toml(ws: Path, table: str, **values) -> None:
    from uniflow_cli.workspace import dumps_config, load_config

    config = load_config(ws / "uniflow.toml")
    config[table].update(values)
    (ws / "uniflow.toml").write_text(dumps_config(config))


def test_train_table_values_without_a_flag_are_honoured(ws):
    # stages and weight_decay (and grad_accum, dtype) had flag defaults that always won over [train].
    set_toml(ws, "train", stages="joint", weight_decay=0.01, grad_accum=2, dtype="bfloat16")
    result = run("local-train", "--client", "0", "-w", ws, "--steps", "2")
    assert result.exit_code == 0, result.output
    drop = read_adapter(ws / "rounds" / "1" / "clients" / "0")
    config = drop.meta.extra["train"]["config"]
    assert (config["stages"], config["weight_decay"], config["grad_accum"], config["dtype"]) == ("joint", 0.01, 2, "bfloat16")
    assert drop.meta.stage == "joint" and all(v.dtype == torch.bfloat16 for v in drop.tensors.values())


def test_a_flag_still_wins_over_the_train_table(ws):
    set_toml(ws, "train", stages="joint", weight_decay=0.01)
    result = run("local-train", "--client", "0", "-w", ws, "--steps", "2", "--stages", "llm-only", "--weight-decay", "0")
    assert result.exit_code == 0, result.output
    config = read_adapter(ws / "rounds" / "1" / "clients" / "0").meta.extra["train"]["config"]
    assert (config["stages"], config["weight_decay"]) == ("llm-only", 0.0)


def test_a_typo_in_the_lora_table_fails_local_train_like_evaluate(ws):
    set_toml(ws, "lora", lora_alpah=32.0)
    result = run("local-train", "--client", "0", "-w", ws, "--steps", "1")
    assert result.exit_code == 1 and "unknown key 'lora_alpah'" in result.output and "lora_alpha" in result.output, result.output
    assert not (ws / "rounds" / "1").exists()


def test_a_drop_records_its_model_settings(ws):
    from uniflow_cli.global_info import recorded_settings

    assert run("local-train", "--client", "0", "-w", ws, "--steps", "1").exit_code == 0
    drop = read_adapter(ws / "rounds" / "1" / "clients" / "0")
    model, lora = recorded_settings(drop.meta, "drop")
    assert model.preset == "tiny-random" and model.modalities == ["image"] and lora.r == 8
    assert drop.meta.extra["settings"] == read_adapter(ws / "rounds" / "0" / "global").meta.extra["settings"]


def test_the_training_module_keeps_its_names_and_drops_the_dead_table():
    import uniflow_cli.training as training
    from uniflow_cli import client_round, local_train, schedule

    assert training.run_local_train is local_train.run_local_train and training.train_client_round is client_round.train_client_round
    assert training.stage_plan is schedule.stage_plan and training.STAGE_PLANS == schedule.STAGE_PLANS
    assert training.read_adapter_round is local_train.read_adapter_round and training.method_may_keep_state("fedsa")
    assert not hasattr(training, "METHODS_SHARING") and not hasattr(training, "train_defaults")


# ---------------------------------------------------------------------------------------------- explicit mode (issue 13)
@pytest.fixture
def other_ws(template, tmp_path, monkeypatch) -> Path:
    """A workspace explicit mode must NOT use: another base (image + audio) and steps = 1."""
    other = tmp_path / "other"
    shutil.copytree(template, other)
    set_toml(other, "model", modalities=["image", "audio"])
    set_toml(other, "train", steps=1)
    return other


@pytest.mark.parametrize("found_by", ["env", "cwd"])
def test_explicit_mode_ignores_a_workspace_it_was_not_given(ws, other_ws, tmp_path, monkeypatch, found_by):
    if found_by == "env":
        monkeypatch.setenv("UNIFLOW_WORKSPACE", str(other_ws))
    else:
        monkeypatch.delenv("UNIFLOW_WORKSPACE", raising=False)
        monkeypatch.chdir(other_ws)
    g, d = ws / "rounds" / "0" / "global", ws / "data" / "clients" / "0"
    result = run("local-train", "--global", g, "--data", d, "--out", tmp_path / "drop", "--batch-size", "2")
    assert result.exit_code == 0, result.output  # the model comes from the global's record, not other_ws's [model]
    drop = read_adapter(tmp_path / "drop")
    assert drop.meta.extra["train"]["steps"] == 20  # the built-in default, not other_ws's steps = 1
    assert drop.meta.extra["train"]["started_from"] is None  # no workspace: no path recorded


def test_explicit_mode_asks_for_a_preset_when_the_global_records_none(ws, tmp_path, monkeypatch):
    import json

    monkeypatch.delenv("UNIFLOW_WORKSPACE", raising=False)
    g = tmp_path / "g"
    shutil.copytree(ws / "rounds" / "0" / "global", g)
    meta = json.loads((g / "uniflow.json").read_text())
    del meta["extra"]["settings"]
    (g / "uniflow.json").write_text(json.dumps(meta))
    result = run("local-train", "--global", g, "--data", ws / "data" / "clients" / "0", "--out", tmp_path / "drop", "--steps", "1")
    assert result.exit_code == 2 and "records no usable model settings, and --preset is not given" in result.output, result.output
    assert not (tmp_path / "drop").exists()


def test_explicit_mode_honours_preset(ws, tmp_path, monkeypatch):
    monkeypatch.setenv("UNIFLOW_WORKSPACE", str(ws))  # its [model] would say tiny-random too: it must not be read
    g, d = ws / "rounds" / "0" / "global", ws / "data" / "clients" / "0"
    # The preset the global records: its other settings (modalities) come with it.
    result = run("local-train", "--global", g, "--data", d, "--out", tmp_path / "a", "--steps", "1", "--preset", "tiny-random")
    assert result.exit_code == 0, result.output
    # Another preset: that base is built (default modalities), and it is not the global's base.
    result = run("local-train", "--global", g, "--data", d, "--out", tmp_path / "b", "--steps", "1", "--preset", "custom")
    assert result.exit_code != 0 and "custom" in result.output, result.output


def test_explicit_fedsa_needs_a_state_directory(ws, tmp_path):
    # Even with a workspace given, explicit mode has no client id, so no state/clients/<id> to default to:
    # the trained B used to be thrown away silently.
    g, d = ws / "rounds" / "0" / "global", ws / "data" / "clients" / "0"
    base = ("local-train", "-w", ws, "--global", g, "--data", d, "--steps", "1", "--method", "fedsa")
    result = run(*base, "--out", tmp_path / "drop")
    assert result.exit_code == 2 and "method fedsa keeps each client's B between rounds, but --state is not given" in result.output, result.output
    assert not (tmp_path / "drop").exists()
    result = run(*base, "--out", tmp_path / "drop", "--state", tmp_path / "state")
    assert result.exit_code == 0, result.output
    private = read_adapter(tmp_path / "state")
    assert private.tensors and all(k.endswith("lora_B.weight") for k in private.tensors)
    assert not any(k.endswith("lora_B.weight") for k in read_adapter(tmp_path / "drop").tensors)


def test_library_errors_speak_library_terms(ws, tmp_path):
    g, d = ws / "rounds" / "0" / "global", ws / "data" / "clients" / "0"
    cases = [
        (dict(client="0", workspace=ws, round_=0), "round 0: round 0 is the initial global"),
        (dict(workspace=ws), "which client? client is not given"),
        (dict(global_dir=g, out=tmp_path / "x"), "explicit mode needs data_dir too"),
        (dict(global_dir=g, data_dir=d, out=tmp_path / "x", method="fedsa"), "but state_dir is not given"),
        (dict(global_dir=g, data_dir=d, out=d), "out " + str(d)),
    ]
    for kwargs, message in cases:
        with pytest.raises(UsageError) as info:
            run_local_train(TrainSettings(steps=1), **kwargs)
        assert message in str(info.value) and "--" not in str(info.value), str(info.value)
    with pytest.raises(UsageError, match="staging by round needs total_rounds"):
        run_local_train(TrainSettings(steps=1, stage_by="round"), client="0", workspace=ws)


def test_flower_train_config_uses_the_same_resolver(ws):
    pytest.importorskip("flwr")
    from uniflow_cli.flower.client import train_config_for
    from uniflow_cli.flower.settings import FlowerRunSettings
    from uniflow_cli.workspace import find_workspace

    set_toml(ws, "train", weight_decay=0.01, grad_accum=2, steps=3, stages="joint", dtype="bfloat16")
    cfg = train_config_for(FlowerRunSettings(workspace=str(ws), lr=1e-3), find_workspace(ws))
    assert (cfg.weight_decay, cfg.grad_accum, cfg.steps, cfg.lr, cfg.stages, cfg.dtype) == (0.01, 2, 3, 1e-3, "joint", "float32")
    with pytest.raises(ConfigError, match="^run-config tau=1.5 must be in"):
        train_config_for(FlowerRunSettings(workspace=str(ws), tau=1.5), find_workspace(ws))


def test_an_unknown_method_is_named_where_it_came_from(ws):
    import json

    result = run("local-train", "--client", "0", "-w", ws, "--steps", "1", "--method", "fedavg")
    assert result.exit_code == 2 and "--method 'fedavg' is not one of" in result.output, result.output
    meta_path = ws / "rounds" / "0" / "global" / "uniflow.json"
    meta = json.loads(meta_path.read_text())
    meta["method"] = "fedavg"
    meta_path.write_text(json.dumps(meta))
    result = run("local-train", "--client", "0", "-w", ws, "--steps", "1")
    assert result.exit_code == 1 and "uniflow.json: method" in result.output and "--method" not in result.output, result.output
