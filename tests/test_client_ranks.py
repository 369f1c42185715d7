"""Heterogeneous ranks (the paper's Table 10): ``[lora] client_ranks`` gives a client its own rank r_k ≤ r; it
starts from the global's first r_k components, trains at r_k, and the server zero-pads its drop back to r."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.cli_runner import ok, run
from tests.workspace_factory import write_shard
from uniflow_cli.adapters import read_adapter
from uniflow_cli.errors import ConfigError
from uniflow_cli.settings import LoraSettings, lora_table

A_KEY = "base_model.model.llm.model.layers.0.self_attn.q_proj.lora_A.weight"
B_KEY = "base_model.model.llm.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.mark.parametrize("ranks, message", [
    ({"0": 9}, r"client_ranks=\{'0': 9\} must give each client a rank in \[1, r = 8\]"),
    ({"0": 0}, r"rank in \[1, r = 8\]"),
    ({"../x": 2}, "client_ranks=\"../x\" names a client id that is not a plain name"),
    ({"0": True}, "must be a table of string keys to integers"),
    ({"0": 2.5}, "must be a table of string keys to integers"),
])
def test_bad_client_ranks_are_named(ranks, message):
    with pytest.raises(ConfigError, match=message):
        LoraSettings(r=8, client_ranks=ranks)


def test_vera_has_one_rank():
    with pytest.raises(ConfigError, match="a VeRA federation has one rank"):
        LoraSettings(adapter="vera", client_ranks={"0": 2})


def test_for_client_and_the_written_table():
    lora = LoraSettings(r=8, client_ranks={"0": 4})
    assert (lora.for_client("0").r, lora.for_client("1").r, lora.for_client(None).r) == (4, 8, 8)
    assert lora.for_client("1") is lora and lora.for_client("0").client_ranks == {"0": 4}
    assert "client_ranks" not in lora_table(LoraSettings()) and lora_table(lora)["client_ranks"] == {"0": 4}


@pytest.mark.parametrize("flag, message", [("0:4", "is not a new client=rank pair"), ("0=2,0=2", "is not a new client=rank pair"),
                                           ("0=x", "is not a new client=rank pair"), ("0=9", "--client-ranks {'0': 9} must give")])
def test_init_flag_bad_input_writes_nothing(tmp_path, flag, message):
    result = run("init", tmp_path / "ws", "--preset", "tiny-random", "--r", 4, "--client-ranks", flag)
    assert result.exit_code != 0 and message in " ".join(result.output.split())
    assert not (tmp_path / "ws").exists()


@pytest.mark.parametrize("method", ["fedit", "flexlora"])
def test_a_smaller_client_trains_at_its_rank_and_the_global_keeps_r(tmp_path, monkeypatch, method):
    monkeypatch.setenv("UNIFLOW_THREADS", "1")
    ws = tmp_path / "ws"
    ok("init", ws, "--preset", "tiny-random", "--modalities", "image", "--r", 4, "--client-ranks", "0=2", "--method", method,
       "--steps", 2, "--batch-size", 2)
    for client in ("0", "1"):
        write_shard(ws / "data" / "clients" / client, "image", offset=4 * int(client))
    (ws / "data" / "partition.json").write_text(json.dumps({"clients": [{"id": 0, "modalities": ["image"]}, {"id": 1, "modalities": ["image"]}]}))
    for t in (1, 2):
        for client in ("0", "1"):
            ok("local-train", "--client", client, "-w", ws, "--lr", "5e-3", "--stages", "joint")
        ok("aggregate", "--round", t, "-w", ws, "--min-clients", 2)
    small, full, global_ = (read_adapter(ws / "rounds" / "2" / p) for p in ("clients/0", "clients/1", "global"))
    assert (small.peft_config["r"], full.peft_config["r"], global_.peft_config["r"]) == (2, 4, 4)
    assert small.tensors[A_KEY].shape[0] == 2 and global_.tensors[A_KEY].shape[0] == 4
    assert small.meta.extra["settings"]["lora"]["r"] == 2  # the drop records the rank it trained at
    # Round 2's small client started from round 1's global cut to its first 2 components: what it trained from is
    # the truncation (ΔW of the kept components unchanged, scaling α/r_k), not a fresh LoRA.
    from uniflow_cli.aggregation.truncate import client_start

    start = client_start(read_adapter(ws / "rounds" / "1" / "global"), 2)
    r1 = read_adapter(ws / "rounds" / "1" / "global")
    s_g, s_k = 16.0 / 4, 16.0 / 2
    torch.testing.assert_close(s_k * start.tensors[B_KEY] @ start.tensors[A_KEY], s_g * r1.tensors[B_KEY][:, :2] @ r1.tensors[A_KEY][:2])


def test_explicit_mode_takes_its_rank_from_the_flag(tmp_path, monkeypatch):
    """Without a workspace (shared storage, one client), --rank R trains at R from the global's first R components."""
    monkeypatch.setenv("UNIFLOW_THREADS", "1")
    ws = tmp_path / "ws"
    ok("init", ws, "--preset", "tiny-random", "--modalities", "image", "--r", 4, "--method", "fedit")
    write_shard(tmp_path / "shard", "image")
    common = ("local-train", "--global", ws / "rounds" / "0" / "global", "--data", tmp_path / "shard", "--steps", 1, "--batch-size", 2)
    ok(*common, "--out", tmp_path / "drop", "--rank", 2)
    drop = read_adapter(tmp_path / "drop")
    assert drop.peft_config["r"] == 2 and drop.tensors[A_KEY].shape[0] == 2
    for bad, message in ((9, "--rank 9 must be a whole number in [1, 4] (the global's rank)"), (0, "--rank 0 must be a whole number in [1, 4]")):
        result = run(*common, "--out", tmp_path / f"bad-{bad}", "--rank", bad)
        assert result.exit_code != 0 and message in " ".join(result.output.split()) and not (tmp_path / f"bad-{bad}").exists()


def test_simulate_keeps_one_model_per_rank_and_writes_the_file_drop_tensors(tmp_path, monkeypatch):
    """Clients of ranks 2, 4, 2 in one round: two model builds (a PoolSet), the same global tensors as the commands."""
    monkeypatch.setenv("UNIFLOW_THREADS", "1")
    from uniflow_cli.simulate import run_simulation

    template = tmp_path / "template"
    ok("init", template, "--preset", "tiny-random", "--modalities", "image", "--r", 4, "--client-ranks", "0=2,2=2", "--method", "fedA2",
       "--steps", 2, "--batch-size", 2)
    for client in ("0", "1", "2"):
        write_shard(template / "data" / "clients" / client, "image", offset=4 * int(client))
    (template / "data" / "partition.json").write_text(json.dumps({"clients": [{"id": k, "modalities": ["image"]} for k in (0, 1, 2)]}))
    dropped, simulated = tmp_path / "dropped", tmp_path / "simulated"
    for ws in (dropped, simulated):
        shutil.copytree(template, ws)
    for t in (1, 2):
        for client in ("0", "1", "2"):
            ok("local-train", "--client", client, "-w", dropped)
        ok("aggregate", "--round", t, "-w", dropped, "--min-clients", 3)
    outcome = run_simulation(simulated, 2)
    assert outcome.model_builds == 2  # one rank-2 and one rank-4 model, each reset per client
    for t in (1, 2):
        assert (simulated / "rounds" / str(t) / "global" / "adapter_model.safetensors").read_bytes() == \
            (dropped / "rounds" / str(t) / "global" / "adapter_model.safetensors").read_bytes()
