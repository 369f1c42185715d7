"""RoLoRA (issue 18, item 1): alternating rounds — odd rounds train and send only B (A frozen), even rounds only
A (B frozen). Dense references on small shapes (mixed alphas and rsLoRA), the phase rule, the bad drops, and a
two-round trip through ``uniflow local-train`` + ``uniflow aggregate`` on tiny-random."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from tests.cli_runner import ok, run
from tests.lora_factory import MODULES, PREFIX, delta, lora_tensors, peft_config, write_client
from uniflow_cli.aggregation import AggregationOptions, ClientUpdate, aggregate
from uniflow_cli.aggregation.registry import check_family, method_spec
from uniflow_cli.errors import ConfigError, IncompatibleAdaptersError, UsageError

F64 = torch.float64
WEIGHTS = [3.0, 1.0, 2.0]
CONFIGS = [peft_config(r=3, lora_alpha=4.0), peft_config(r=3, lora_alpha=9.0, use_rslora=True), peft_config(r=3, lora_alpha=6.0)]


def s(cfg):
    return cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])


def only(t, side):
    return {k: v for k, v in t.items() if k.endswith(f"lora_{side}.weight")}


def rel(a, b):
    return float((a.to(F64) - b.to(F64)).norm() / b.to(F64).norm())


def ups(sets, configs):
    return [ClientUpdate(f"client {i}", t, c) for i, (t, c) in enumerate(zip(sets, configs))]


@pytest.mark.parametrize("round_, phase, uploads, frozen_A, frozen_B", [
    (1, "B", ("B",), True, False), (2, "A", ("A",), False, True), (3, "B", ("B",), True, False), (10, "A", ("A",), False, True)])
def test_the_phase_of_a_round(round_, phase, uploads, frozen_A, frozen_B):
    spec = method_spec("rolora").at_round(round_)
    assert (spec.phase, spec.uploads, spec.frozen_A, spec.frozen_B, spec.alternates) == (phase, uploads, frozen_A, frozen_B, False)
    assert method_spec("fedA2").at_round(round_) is method_spec("fedA2")  # every other method: itself in every round


@pytest.mark.parametrize("sent, kept", [("B", "A"), ("A", "B")], ids=["B round", "A round"])
@pytest.mark.parametrize("configs", [[peft_config(r=3)] * 3, CONFIGS], ids=["one alpha", "rsLoRA and alphas"])
def test_a_round_is_exact_and_keeps_the_start_factor(sent, kept, configs):
    # Each client k trained s_k · B_k · A_k with one factor the start's: the global's ΔW must be Σ w_k s_k B_k A_k
    # (written out here), its frozen factor the start's bitwise (the next round trains under it).
    start = ClientUpdate("start", lora_tensors(9, r=3), peft_config(r=3))
    sets = [lora_tensors(seed, r=3) for seed in range(3)]
    result = aggregate(ups([only(t, sent) for t in sets], configs), WEIGHTS, AggregationOptions(method="rolora"), start=start)
    w = torch.tensor(WEIGHTS, dtype=F64) / sum(WEIGHTS)
    for module in MODULES:
        key = PREFIX + module
        factors = [{**{f: t[f"{key}.lora_{f}.weight"] for f in "AB"}, kept: start.tensors[f"{key}.lora_{kept}.weight"]} for t in sets]
        target = sum(wk * s(c) * f["B"] @ f["A"] for wk, c, f in zip(w.tolist(), configs, factors))
        assert torch.equal(result.tensors[f"{key}.lora_{kept}.weight"], start.tensors[f"{key}.lora_{kept}.weight"])
        assert rel(delta(result.tensors, result.peft_config, module), target) <= 1e-12
    assert all(layer.rel_error is not None and layer.rel_error <= 1e-6 for layer in result.layers)  # exact (the Gram form: √round-off)
    assert any(f"a round of {sent} ({kept} frozen" in note for note in result.notes)


def test_an_A_round_with_one_alpha_is_the_plain_average_of_A():
    # Hand-computed: 1-D layer, A_1 = [2], A_2 = [4], weights 1 : 3 → Ā = 3.5; B stays [[5]].
    key = PREFIX + "model.layers.0.self_attn.q_proj"
    cfg = peft_config(r=1, modules={"model.layers.0.self_attn.q_proj": (1, 1)})
    start = ClientUpdate("start", {key + ".lora_A.weight": torch.tensor([[7.0]], dtype=F64), key + ".lora_B.weight": torch.tensor([[5.0]], dtype=F64)}, cfg)
    drops = [{key + ".lora_A.weight": torch.tensor([[2.0]], dtype=F64)}, {key + ".lora_A.weight": torch.tensor([[4.0]], dtype=F64)}]
    result = aggregate(ups(drops, [cfg, cfg]), [1, 3], AggregationOptions(method="rolora"), start=start)
    assert result.tensors[key + ".lora_A.weight"].item() == 3.5 and result.tensors[key + ".lora_B.weight"].item() == 5.0


def test_bad_drops_are_one_line_each():
    start = ClientUpdate("start", lora_tensors(9), peft_config())
    sets = [lora_tensors(seed) for seed in range(2)]
    options = AggregationOptions(method="rolora")
    with pytest.raises(IncompatibleAdaptersError, match=r"rolora: client 0 uploaded lora_A and lora_B; a rolora client sends only lora_B in odd"):
        aggregate(ups(sets, [peft_config()] * 2), [1, 1], options, start=start)
    with pytest.raises(IncompatibleAdaptersError, match=r"different rounds' phases \(sent lora_B: client 0; sent lora_A: client 1\).*one round"):
        aggregate(ups([only(sets[0], "B"), only(sets[1], "A")], [peft_config()] * 2), [1, 1], options, start=start)
    with pytest.raises(UsageError, match=r"rolora: clients did not upload lora_B of .* no starting global was given.*frozen B"):
        aggregate(ups([only(t, "A") for t in sets], [peft_config()] * 2), [1, 1], options)
    with pytest.raises(UsageError, match=r"rolora: clients did not upload lora_A of .* no starting global was given.*frozen A"):
        aggregate(ups([only(t, "B") for t in sets], [peft_config()] * 2), [1, 1], options)
    with pytest.raises(IncompatibleAdaptersError, match="rolora needs one frozen B, but client ranks differ"):
        aggregate(ups([only(lora_tensors(0, r=2), "A"), only(lora_tensors(1, r=3), "A")], [peft_config(r=2), peft_config(r=3)]),
                  [1, 1], options, start=start)
    with pytest.raises(IncompatibleAdaptersError, match=r"start has no .*lora_B.weight"):
        no_B = ClientUpdate("start", only(lora_tensors(9), "A"), peft_config())
        aggregate(ups([only(t, "A") for t in sets], [peft_config()] * 2), [1, 1], options, start=no_B)
    with pytest.raises(ConfigError, match=r"rolora\W? is not defined for VeRA"):
        check_family("rolora", "vera")


def test_the_cli_refuses_a_mixed_round_and_writes_nothing(tmp_path):
    sets = [lora_tensors(k, dtype=torch.float32) for k in range(2)]
    drops = [write_client(tmp_path / "d", 0, only(sets[0], "B")), write_client(tmp_path / "d", 1, only(sets[1], "A"))]
    start = write_client(tmp_path / "s", "start", lora_tensors(9, dtype=torch.float32))
    out = tmp_path / "global"
    result = run("aggregate", "--method", "rolora", *drops, "--start", start, "--out", out)
    assert result.exit_code != 0 and "different rounds' phases" in result.output and "Traceback" not in result.output, result.output
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- round trip on tiny-random
@pytest.fixture
def ws(tmp_path) -> Path:
    import json

    from tests.workspace_factory import write_shard

    ws = tmp_path / "fed"
    ok("init", ws, "--preset", "tiny-random", "--modalities", "image", "--r", "4", "--lora-alpha", "8", "--method", "rolora")
    for client in ("0", "1"):
        write_shard(ws / "data" / "clients" / client, "image", offset=4 * int(client))
    (ws / "data" / "partition.json").write_text(json.dumps({"clients": [{"id": int(c), "modalities": ["image"]} for c in ("0", "1")]}))
    return ws


def test_two_rounds_alternate_B_then_A_and_each_global_is_exact(ws):
    from uniflow_cli.adapters import read_adapter

    def train_round(t):
        for client in ("0", "1"):
            ok("local-train", "--client", client, "-w", ws, "--round", t, "--steps", "2", "--lr", "5e-3", "--stages", "joint")
        ok("aggregate", "--round", t, "-w", ws)
        return [read_adapter(ws / "rounds" / str(t) / "clients" / c) for c in ("0", "1")], read_adapter(ws / "rounds" / str(t) / "global")

    g0 = read_adapter(ws / "rounds" / "0" / "global")
    for t, sent, kept in ((1, "B", "A"), (2, "A", "B")):
        drops, g = train_round(t)
        start = read_adapter(ws / "rounds" / str(t - 1) / "global") if t > 1 else g0
        assert all({k.rsplit(".", 2)[-2] for k in d.tensors if ".lora_" in k} == {f"lora_{sent}"} for d in drops)  # one factor: half the bytes
        assert all(d.meta.extra["train"]["phase"] == sent for d in drops)
        w = torch.tensor([d.meta.num_examples for d in drops], dtype=F64)
        w = w / w.sum()
        moved = 0
        for key in sorted(k[: -len(".lora_A.weight")] for k in g.tensors if k.endswith(".lora_A.weight")):
            frozen = f"{key}.lora_{kept}.weight"
            assert torch.equal(g.tensors[frozen], start.tensors[frozen]), frozen
            fused = f"{key}.lora_{sent}.weight"
            mean = sum(wk * d.tensors[fused].to(F64) for wk, d in zip(w.tolist(), drops))
            assert torch.allclose(g.tensors[fused].to(F64), mean, atol=1e-6), fused
            moved += not torch.equal(g.tensors[fused], start.tensors[fused])
        assert moved > 0  # training moved the factor it trained
    summary = read_adapter(ws / "rounds" / "2" / "global").meta
    assert summary.method == "rolora"
