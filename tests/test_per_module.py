"""Per-module methods (issue 18, item 2): ``--method "encoders=fedsa,llm=fedA2"`` — the parser (table-driven, and
hypothesis on arbitrary text), the matching rule, the core fusing each layer with its module's method (checked
against each method run alone), the bad specs, and a round trip through ``uniflow local-train`` + ``uniflow
aggregate`` + ``uniflow evaluate --client`` on tiny-random."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.cli_runner import ok, run
from tests.lora_factory import MODULES, PREFIX, lora_tensors, peft_config, write_client
from uniflow_cli.aggregation import AggregationOptions, ClientUpdate, aggregate
from uniflow_cli.aggregation.per_module import ModuleMethods, matches
from uniflow_cli.aggregation.registry import SPECS, check_family, method_spec
from uniflow_cli.errors import ConfigError

Q, V = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
WEIGHTS = [3.0, 1.0, 2.0]


@pytest.mark.parametrize("text, name, parts, default", [
    ("encoders=fedsa,llm=fedA2", "encoders=fedsa,llm=fedA2", [("encoders", "fedsa"), ("llm", "fedA2")], None),
    (" encoders = fedsa , fedA2 ", "encoders=fedsa,fedA2", [("encoders", "fedsa")], "fedA2"),
    ("fedit,*.q_proj=fedA2", "*.q_proj=fedA2,fedit", [("*.q_proj", "fedA2")], "fedit"),  # the default is written last
    ("encoders.image=ffa,encoders=fedsa,svd", "encoders.image=ffa,encoders=fedsa,svd", [("encoders.image", "ffa"), ("encoders", "fedsa")], "svd"),
])
def test_parse(text, name, parts, default):
    spec = method_spec(text)
    assert isinstance(spec, ModuleMethods) and spec.per_module and spec.name == name
    assert [(p, s.name) for p, s in spec.parts] == parts and (spec.default.name if spec.default else None) == default
    assert method_spec(spec.name) == spec  # the recorded name parses back to the same spec


def test_a_spec_of_only_a_default_is_that_method():
    assert method_spec("fedA2") is SPECS["fedA2"]
    assert not method_spec("fedA2").per_module and method_spec("fedA2").for_module("llm.x") is SPECS["fedA2"]


@pytest.mark.parametrize("text, message", [
    ("encoders=fedsaa,fedA2", r"names the method 'fedsaa', not one of fedit, .* \(did you mean fedsa\?\)"),
    ("encoders=flora,fedA2", r"mixes flora with other methods, and flora cannot be mixed: it stacks"),
    ("encoders=fedex,fedA2", r"fedex cannot be mixed: its dense residuals"),
    ("encoders=feddpa,fedA2", r"feddpa cannot be mixed: it trains a second, local adapter"),
    ("encoders=rolora,fedA2", r"rolora cannot be mixed: it trains one factor a round"),
    ("fedit,fedA2", r"names two defaults \(fedit and fedA2\)"),
    ("x=fedit,,fedA2", r"has an empty entry"),
    ("x=fedit,x=fedA2", r"names the module pattern 'x' twice"),
    ("a b=fedit", r"has the module pattern 'a b'"),
    ("=fedit", r"has the module pattern ''"),
    ("x" * 2001 + "=fedit", r"is 2007 characters long \(at most 2000\)"),
])
def test_bad_specs_are_one_line(text, message):
    with pytest.raises(ConfigError, match=message) as error:
        method_spec(text)
    assert "\n" not in str(error.value) and 'encoders=fedsa,llm=fedA2' in str(error.value)  # the fix: an example


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(list("=,. *?[]-_ab") + ["fedit", "fedA2", "flora", "llm", "encoders", "\n", "é"]), max_size=20).map("".join))
def test_any_text_parses_or_is_one_config_error(text):
    try:
        spec = method_spec(text)
    except ConfigError as error:
        assert str(error).startswith("method=")
        return
    assert spec.name in SPECS or method_spec(spec.name) == spec


@pytest.mark.parametrize("pattern, module, hit", [
    ("encoders", "encoders.image.layer.0.query", True),
    ("encoders.image", "encoders.image.layer.0.query", True),
    ("encoders.im", "encoders.image.layer.0.query", False),  # a dotted prefix, not a string prefix
    ("*.q_proj", "llm.model.layers.3.self_attn.q_proj", True),
    ("llm.model.layers.1?.*", "llm.model.layers.12.self_attn.q_proj", True),
    ("llm.model.layers.1?.*", "llm.model.layers.1.self_attn.q_proj", False),
    ("llm", "llm", True),
])
def test_matching(pattern, module, hit):
    assert matches(pattern, module) is hit


def test_the_first_matching_entry_wins_and_the_default_takes_the_rest():
    spec = method_spec("encoders.image=ffa,encoders=fedsa,fedit")
    assert spec.for_module("base_model.model.encoders.image.q").name == "ffa"
    assert spec.for_module("encoders.audio.q").name == "fedsa"
    assert spec.for_module("llm.q").name == "fedit"
    assert spec.for_key(PREFIX + "encoders.audio.q.lora_B.default.weight").name == "fedsa"  # a parameter's name
    assert spec.for_key(PREFIX + "projectors.image.weight") is None  # non-LoRA: always shared
    assert spec.shares(PREFIX + "projectors.image.weight") and not spec.shares(PREFIX + "encoders.audio.q.lora_B.weight")


def test_whole_adapter_facts_are_what_the_parts_imply():
    spec = method_spec("encoders=fedsa,llm=fedA2")
    assert spec.uploads == ("A",) and spec.private_B and spec.keeps_client_state and not spec.line_up and not spec.folds_history
    assert spec.secagg_exchanges == 0 and not spec.on_vera and spec.robust_undefined is None
    assert method_spec("llm=svd,fedit").robust_undefined.startswith("its part svd: ")
    with pytest.raises(ConfigError, match=r"is not defined for VeRA \(a per-module spec is implemented for LoRA adapters"):
        check_family("encoders=fedsa,llm=fedA2", "vera")


# ---------------------------------------------------------------------------------------------- the core
def ups(sets, configs=None):
    configs = configs or [peft_config()] * len(sets)
    return [ClientUpdate(f"client {i}", t, c) for i, (t, c) in enumerate(zip(sets, configs))]


def layer(tensors, module, side):
    return tensors[f"{PREFIX}{module}.lora_{side}.weight"]


@pytest.mark.parametrize("text, q_method, v_method", [
    ("*.q_proj=fedA2,fedit", "fedA2", "fedit"),
    ("*.v_proj=svd,lora-fair", "lora-fair", "svd"),
    ("model.layers.0.self_attn.q_proj=hetlora,model.layers=fedA2", "hetlora", "fedA2"),
])
def test_each_layer_is_fused_by_its_modules_method_exactly_as_that_method_alone(text, q_method, v_method):
    configs = [peft_config(r=2, lora_alpha=4.0), peft_config(r=2, lora_alpha=6.0, use_rslora=True), peft_config(r=2)]
    sets = [lora_tensors(seed) for seed in range(3)]
    mixed = aggregate(ups(sets, configs), WEIGHTS, AggregationOptions(method=text))
    alone = {m: aggregate(ups(sets, configs), WEIGHTS, AggregationOptions(method=m)) for m in (q_method, v_method)}
    for module, m in ((Q, q_method), (V, v_method)):
        for side in ("A", "B"):
            assert torch.equal(layer(mixed.tensors, module, side), layer(alone[m].tensors, module, side)), (module, side)
    assert mixed.method == method_spec(text).name
    assert {r.module.removeprefix(PREFIX): r.method for r in mixed.layers} == {Q: q_method, V: v_method}
    assert {r.module: r.rel_error for r in mixed.layers} == {r.module: r.rel_error for m, res in alone.items() for r in res.layers
                                                            if r.method == m and {Q: q_method, V: v_method}[r.module.removeprefix(PREFIX)] == m}


def test_a_fedsa_module_has_no_B_in_the_global_and_an_ffa_module_keeps_the_start_A():
    start = ClientUpdate("start", lora_tensors(9), peft_config())
    spec = method_spec("*.q_proj=fedsa,*.v_proj=ffa")
    sets = [{k: v for k, v in lora_tensors(seed, A={V: start.tensors[f"{PREFIX}{V}.lora_A.weight"]}).items() if spec.shares(k)}
            for seed in range(3)]
    assert not any(k.endswith("q_proj.lora_B.weight") or k.endswith("v_proj.lora_A.weight") for t in sets for k in t)  # what clients send
    result = aggregate(ups(sets), WEIGHTS, AggregationOptions(method=spec.name), start=start)
    assert f"{PREFIX}{Q}.lora_B.weight" not in result.tensors
    assert torch.equal(layer(result.tensors, V, "A"), layer(start.tensors, V, "A"))
    w = torch.tensor(WEIGHTS, dtype=torch.float64) / sum(WEIGHTS)
    assert torch.allclose(layer(result.tensors, Q, "A"), sum(wk * layer(t, Q, "A") for wk, t in zip(w.tolist(), sets)), atol=1e-12)
    assert any(note.startswith("fedsa:") for note in result.notes)


@pytest.mark.parametrize("text, message", [
    ("encoders=fedsa,fedA2", r"has the pattern 'encoders', which matches none of the 2 LoRA modules \(they lie under model.layers\)"),
    ("*.q_proj=fedA2", r"leaves the module model.layers.0.self_attn.v_proj without a method \(add a default\)"),
])
def test_a_spec_that_misses_the_modules_is_refused_before_any_math(text, message):
    with pytest.raises(ConfigError, match=message):
        aggregate(ups([lora_tensors(0), lora_tensors(1)]), [1, 1], AggregationOptions(method=text))


def test_the_cli_names_the_flag_and_writes_nothing(tmp_path):
    drops = [write_client(tmp_path / "d", k, lora_tensors(k, dtype=torch.float32)) for k in range(2)]
    out = tmp_path / "global"
    result = run("aggregate", "--method", "*.q_proj=fedA2", *drops, "--out", out)
    assert result.exit_code == 2 and "--method" in result.output and "without a method" in result.output, result.output
    assert "Traceback" not in result.output and not out.exists()


# ---------------------------------------------------------------------------------------------- round trip on tiny-random
@pytest.fixture
def ws(tmp_path) -> Path:
    from tests.workspace_factory import write_shard

    ws = tmp_path / "fed"
    ok("init", ws, "--preset", "tiny-random", "--modalities", "image", "--method", "encoders=fedsa,llm=fedA2")
    for client in ("0", "1"):
        write_shard(ws / "data" / "clients" / client, "image", offset=4 * int(client))
    write_shard(ws / "data" / "test" / "image", "image", offset=20)
    (ws / "data" / "partition.json").write_text(json.dumps({"clients": [{"id": int(c), "modalities": ["image"]} for c in ("0", "1")]}))
    return ws


def test_round_trip_encoders_fedsa_llm_fedA2(ws):
    from uniflow_cli.adapters import read_adapter

    for client in ("0", "1"):
        ok("local-train", "--client", client, "-w", ws, "--steps", "2", "--lr", "5e-3", "--stages", "joint")
    drop = read_adapter(ws / "rounds" / "1" / "clients" / "0")
    keys = [k for k in drop.tensors if ".lora_" in k]
    assert any(".encoders." in k and "lora_A" in k for k in keys) and not any(".encoders." in k and "lora_B" in k for k in keys)
    assert any(".llm." in k and "lora_B" in k for k in keys)
    state = read_adapter(ws / "state" / "clients" / "0")  # the encoders' B stays on the client, and only it
    assert state.tensors and all(".encoders." in k and k.endswith("lora_B.weight") for k in state.tensors)
    ok("aggregate", "--round", "1", "-w", ws)
    g = read_adapter(ws / "rounds" / "1" / "global")
    assert g.meta.method == "encoders=fedsa,llm=fedA2"
    assert not any(".encoders." in k and "lora_B" in k for k in g.tensors) and any(".llm." in k and "lora_B" in k for k in g.tensors)
    report = json.loads((ws / "rounds" / "1" / "report.json").read_text())  # which method fused each layer
    assert {layer["method"] for layer in report["layers"] if ".encoders." in layer["module"]} == {"fedsa"}
    assert {layer["method"] for layer in report["layers"] if ".llm." in layer["module"]} == {"fedA2"}
    # The client's personalised model (global + its own encoder B) evaluates; round 2 starts from it.
    ok("evaluate", "-w", ws, "--client", "0", "--limit", "2")
    ok("local-train", "--client", "0", "-w", ws, "--steps", "1", "--stages", "joint")


def test_init_refuses_a_spec_that_misses_the_models_modules(tmp_path):
    result = run("init", tmp_path / "fed", "--preset", "tiny-random", "--modalities", "image", "--method", "encoder=fedsa,fedA2")
    assert result.exit_code == 2 and "has the pattern 'encoder', which matches none of the" in result.output, result.output
    assert "--method" in result.output and not (tmp_path / "fed" / "uniflow.toml").exists()
