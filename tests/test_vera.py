"""VeRA as an adapter family end to end: init → local-train → aggregate (every defined method) → evaluate.

tiny-random (image encoder + LLM); two clients (image, text). The math itself is tests/test_vera_math.py;
here the wiring: what each method uploads, freezes and keeps private, the shared projections (one pair for
the whole federation), the refusals, and that a published global is a PEFT VeRA adapter.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from tests.workspace_factory import write_shard
from uniflow_cli.adapters import META_FILE, TENSORS_FILE, read_adapter
from uniflow_cli.aggregation import AggregationOptions, ClientUpdate, aggregate, vera
from uniflow_cli.aggregation.registry import SPECS, VERA_METHODS, check_family
from uniflow_cli.aggregation.vera_core import VeraRecord, projection_digest
from tests.cli_runner import ok, run
from uniflow_cli.errors import (
    AdapterError,
    ConfigError,
    IncompatibleAdaptersError,
    UsageError,
)
from uniflow_cli.peft_keys import VERA_A_KEY, VERA_B_KEY, factor_side, vera_modules
from uniflow_cli.settings import LoraSettings, lora_table

STEPS = 2


def refused(result, message: str):
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output


# ---------------------------------------------------------------------------------------------- the workspace
@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """`uniflow init --adapter vera` (tiny-random, image) with two shards and image/text test splits."""
    ws = tmp_path_factory.mktemp("vera") / "fed"
    ok("init", ws, "--preset", "tiny-random", "--modalities", "image", "--adapter", "vera", "--r", "4", "--seed", "3",
       "--steps", STEPS, "--lr", "5e-2", "--stage-tau", "0.5")
    for client, modality in (("0", "image"), ("1", "text")):
        write_shard(ws / "data" / "clients" / client, modality, offset=4 * int(client))
    for modality in ("image", "text"):
        write_shard(ws / "data" / "test" / modality, modality, n=2, offset=100)
    (ws / "data" / "partition.json").write_text(json.dumps({"clients": [{"id": 0, "modalities": ["image"]}, {"id": 1, "modalities": ["text"]}]}))
    return ws


def copy_of(template: Path, dst: Path) -> Path:
    shutil.copytree(template, dst)
    return dst


def train_round(ws: Path, method: str) -> None:
    for client in ("0", "1"):
        ok("local-train", "--client", client, "-w", ws, "--method", method)


# One set of drops per kind of upload: fedit's (d and b) also feeds fedex and fedA2.
UPLOADS = {"fedit": "fedit", "feddpa": "fedit", "fedex": "fedit", "fedA2": "fedit", "lora-fair": "fedit", "ffa": "ffa", "fedsa": "fedsa"}


@pytest.fixture(scope="module")
def trained(template, tmp_path_factory) -> dict[str, Path]:
    """A workspace per kind of upload, with round 1's drops."""
    out = {}
    for kind in sorted(set(UPLOADS.values())):
        ws = copy_of(template, tmp_path_factory.mktemp(kind) / "fed")
        train_round(ws, kind)
        out[kind] = ws
    return out


@pytest.fixture(scope="module")
def published(trained, tmp_path_factory) -> dict[str, Path]:
    """Round 1 aggregated with every method defined on VeRA (a copy of the drops' workspace each)."""
    out = {}
    for method in VERA_METHODS:
        ws = copy_of(trained[UPLOADS[method]], tmp_path_factory.mktemp(f"g-{method}") / "fed")
        ok("aggregate", "-w", ws, "--round", "1", "--method", method)
        out[method] = ws
    return out


def layer_of(adapter, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A module's sliced A, B from an adapter's projections and its recorded shape."""
    d_out, d_in = VeraRecord.of(adapter.meta.extra["vera"], "test").layers[module]
    return vera.slice_projections(adapter.tensors[VERA_A_KEY], adapter.tensors[VERA_B_KEY], d_in, d_out)


# ---------------------------------------------------------------------------------------------- init
def test_init_writes_a_vera_round_0(template):
    start = read_adapter(template / "rounds" / "0" / "global")
    config = start.peft_config
    assert config["peft_type"] == "VERA" and config["r"] == 4 and config["save_projection"] is True
    assert config["projection_prng_key"] == 3  # --seed draws the projections
    modules, projections, other = vera_modules(start.tensors)
    assert projections == [VERA_A_KEY, VERA_B_KEY] and other and all(".projectors." in k for k in other)
    assert all(torch.equal(start.tensors[d], torch.full((4,), 0.1)) and not start.tensors[b].any() for d, b in modules.values())
    layers = VeraRecord.of(start.meta.extra["vera"], "round 0").layers  # (d_out, d_in): b has d_out entries
    assert set(layers) == set(modules) and all(start.tensors[b].shape == (layers[m][0],) for m, (_, b) in modules.items())
    table = (template / "uniflow.toml").read_text()
    assert 'adapter = "vera"' in table and "lora_alpha" not in table and "use_rslora" not in table


@pytest.mark.parametrize("method", ["svd", "flora"])
def test_init_refuses_a_method_undefined_on_vera(tmp_path, method):
    result = run("init", tmp_path / "ws", "--preset", "tiny-random", "--modalities", "image", "--adapter", "vera", "--method", method)
    refused(result, f"--method '{method}' is not defined for VeRA")
    assert "defined: fedit, ffa, fedsa, feddpa, fedex, fedA2" in result.output
    assert not (tmp_path / "ws").exists()


@pytest.mark.parametrize("flags, message", [
    (["--adapter", "dora"], "--adapter dora is not one of lora | vera | rslora"),
    (["--adapter", "vera", "--rslora"], "--rslora applies to LoRA, not to --adapter vera"),
])
def test_init_refuses_bad_adapter_flags(tmp_path, flags, message):
    refused(run("init", tmp_path / "ws", "--preset", "tiny-random", *flags), message)
    assert not (tmp_path / "ws").exists()


@pytest.mark.parametrize("adapter, rslora, expected", [
    ("lora", False, {"adapter": "lora", "use_rslora": False}),
    ("rslora", False, {"adapter": "lora", "use_rslora": True}),
    ("lora", True, {"adapter": "lora", "use_rslora": True}),  # --rslora: the old spelling of --adapter rslora
    ("vera", False, {"adapter": "vera", "projection_prng_key": 7}),
])
def test_adapter_flag_maps_to_the_lora_table(adapter, rslora, expected):
    from uniflow_cli.cli.init import adapter_family

    assert adapter_family(adapter, rslora, 7) == expected


# ---------------------------------------------------------------------------------------------- settings, keys, registry
@pytest.mark.parametrize("kwargs, message", [
    ({"adapter": "rslora"}, 'adapter="rslora" is not one of lora, vera (rsLoRA is adapter lora with use_rslora = true)'),
    ({"adapter": "vera", "use_rslora": True}, "use_rslora=true with adapter vera"),
    ({"adapter": "vera", "d_initial": 0.0}, "d_initial=0.0 must be a finite non-zero number"),
    ({"adapter": "vera", "projection_prng_key": -1}, "projection_prng_key=-1 must be in [0, 2^63)"),
])
def test_lora_settings_validate_the_family(kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        LoraSettings(**kwargs)


def test_lora_table_leaves_out_the_other_family():
    assert "adapter" not in lora_table(LoraSettings()) and "d_initial" not in lora_table(LoraSettings())  # a LoRA table as before VeRA
    table = lora_table(LoraSettings(adapter="vera", projection_prng_key=5))
    assert table["adapter"] == "vera" and table["projection_prng_key"] == 5 and "lora_alpha" not in table
    assert LoraSettings(**table) == LoraSettings(adapter="vera", projection_prng_key=5)


M = "base_model.model.llm.q"


@pytest.mark.parametrize("method, shared", [
    ("fedit", {"d", "b", "head"}), ("ffa", {"b", "head"}), ("fedsa", {"d", "head"}), ("fedex", {"d", "b", "head"}), ("fedA2", {"d", "b", "head"}),
])
def test_what_each_method_uploads_on_vera(method, shared):
    keys = {"d": f"{M}.vera_lambda_d", "b": f"{M}.vera_lambda_b", "head": "base_model.model.head.weight", "A": VERA_A_KEY, "B": VERA_B_KEY}
    assert {name for name, key in keys.items() if SPECS[method].shares(key)} == shared  # never the projections


def test_key_sides():
    assert [factor_side(k) for k in (f"{M}.vera_lambda_d", f"{M}.vera_lambda_b", VERA_A_KEY, f"{M}.lora_A.weight", "x.weight")] == [
        "in", "out", "projection", "in", None]
    with pytest.raises(AdapterError, match="is a VeRA tensor in a LoRA adapter"):
        from uniflow_cli.peft_keys import lora_modules

        lora_modules([f"{M}.vera_lambda_d"])


def test_vera_math_module_keeps_its_names():
    assert vera.VERA_METHODS == VERA_METHODS and set(vera.UNDEFINED_FOR_VERA) == {"svd", "flora", "flexlora", "hetlora", "fedsvd", "rolora"}
    assert check_family("svd", "lora").name == "svd"


# ---------------------------------------------------------------------------------------------- local-train
def test_uploads_hold_only_what_the_method_shares(trained):
    for kind, has_d, has_b in (("fedit", True, True), ("ffa", False, True), ("fedsa", True, False)):
        drop = read_adapter(trained[kind] / "rounds" / "1" / "clients" / "0")
        modules, projections, other = vera_modules(drop.tensors)
        assert projections == [] and other  # never the projections; modules_to_save as for LoRA
        assert all((d is not None) == has_d and (b is not None) == has_b for d, b in modules.values()), kind


def test_projections_are_one_pair_across_clients_and_globals(template, trained, published):
    start = read_adapter(template / "rounds" / "0" / "global")
    digest = projection_digest(start.tensors[VERA_A_KEY], start.tensors[VERA_B_KEY])
    for ws in trained.values():
        for client in ("0", "1"):
            assert read_adapter(ws / "rounds" / "1" / "clients" / client).meta.extra["vera"]["projections"] == digest
    for ws in published.values():
        round_1 = read_adapter(ws / "rounds" / "1" / "global")
        assert all(torch.equal(round_1.tensors[k], start.tensors[k]) for k in (VERA_A_KEY, VERA_B_KEY))
        assert round_1.meta.extra["vera"] == {"layers": start.meta.extra["vera"]["layers"]}


def test_trained_vectors_moved(trained, template):
    start = read_adapter(template / "rounds" / "0" / "global")
    drop = read_adapter(trained["fedit"] / "rounds" / "1" / "clients" / "0")
    moved = [k for k, v in drop.tensors.items() if k.endswith("vera_lambda_b") and not torch.equal(v, start.tensors[k])]
    assert moved


def test_ffa_leaves_d_bit_identical(template, published):
    start = read_adapter(template / "rounds" / "0" / "global")
    global_ = read_adapter(published["ffa"] / "rounds" / "1" / "global")
    ds = [k for k in start.tensors if k.endswith("vera_lambda_d")]
    assert ds and all(torch.equal(global_.tensors[k], start.tensors[k]) for k in ds)


def test_fedsa_keeps_b_private_and_evaluate_client_uses_it(published):
    from uniflow_cli.eval_target import EvalRequest, resolve_target

    ws = published["fedsa"]
    private = read_adapter(ws / "state" / "clients" / "0")
    global_ = read_adapter(ws / "rounds" / "1" / "global")
    assert private.tensors and all(k.endswith("vera_lambda_b") for k in private.tensors)
    assert not any(k.endswith("vera_lambda_b") for k in global_.tensors)
    target = resolve_target(EvalRequest(workspace=ws, round=1, client="0"))
    assert all(torch.equal(target.final.tensors[k], v) for k, v in private.tensors.items())
    ok("evaluate", "-w", ws, "--round", "1", "--client", "0", "--limit", "1")
    assert (ws / "eval" / "clients" / "0" / "round-1.json").is_file()


@pytest.mark.parametrize("method", ["svd", "flora"])
def test_local_train_refuses_undefined_methods(template, tmp_path, method):
    ws = copy_of(template, tmp_path / "fed")
    refused(run("local-train", "--client", "0", "-w", ws, "--method", method), f"--method '{method}' is not defined for VeRA")
    assert not (ws / "rounds" / "1").exists()


# ---------------------------------------------------------------------------------------------- aggregate
def test_fedA2_equals_the_layer_math_on_the_same_vectors(trained, published):
    drops = [read_adapter(trained["fedit"] / "rounds" / "1" / "clients" / c) for c in ("0", "1")]
    start = read_adapter(trained["fedit"] / "rounds" / "0" / "global")
    global_ = read_adapter(published["fedA2"] / "rounds" / "1" / "global")
    options = AggregationOptions(method="fedA2")
    for module, (d_key, b_key) in vera_modules(start.tensors)[0].items():
        A, B = layer_of(start, module)
        x = vera.VeraLayerInputs(A, B, [d.tensors[d_key] for d in drops], [d.tensors[b_key] for d in drops], [4, 4], module=module)
        out = vera.fuse_vera_layer(x, options)
        assert torch.equal(global_.tensors[d_key], out.d) and torch.equal(global_.tensors[b_key], out.b), module


@pytest.mark.parametrize("method", ["fedit", "fedex", "fedA2"])
def test_the_published_global_loads_with_peft(template, published, method):
    from peft import PeftModel, get_peft_model_state_dict

    from uniflow_cli.models import build_base
    from uniflow_cli.settings import resolve_model

    out = published[method] / "rounds" / "1" / "global"
    model = PeftModel.from_pretrained(build_base(resolve_model(None, {"preset": "tiny-random", "modalities": ["image"]})), str(out))
    state, stored = get_peft_model_state_dict(model), read_adapter(out)
    assert state.keys() == stored.tensors.keys()
    assert all(torch.equal(state[k], stored.tensors[k]) for k in state)
    assert (out / "residual.safetensors").exists() == (method == "fedex")


def test_the_report_has_the_vera_error_of_every_layer(trained, tmp_path):
    ws = copy_of(trained["fedit"], tmp_path / "fed")
    ok("aggregate", "-w", ws, "--round", "1", "--method", "fedA2", "--report", tmp_path / "report.json")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["layers"] and all(layer["rank"] == 4 and 0 <= layer["rel_error"] < 1 for layer in report["layers"])
    assert {layer["branch"] for layer in report["layers"]} <= {"plain", "ridge", "pinv"}


def test_every_defined_method_evaluates(published):
    ok("evaluate", "-w", published["fedex"], "--limit", "1")  # fedex: the residual is folded into the base
    assert (published["fedex"] / "eval" / "round-1.json").is_file()


@pytest.mark.parametrize("method", ["svd", "flora"])
def test_aggregate_refuses_undefined_methods(trained, tmp_path, method):
    ws = copy_of(trained["fedit"], tmp_path / "fed")
    refused(run("aggregate", "-w", ws, "--round", "1", "--method", method), f"--method '{method}' is not defined for VeRA")
    assert not (ws / "rounds" / "1" / "global").exists()


def _damaged_drop(ws: Path, how: str) -> None:
    drop = ws / "rounds" / "1" / "clients" / "1"
    meta = json.loads((drop / META_FILE).read_text())
    if how == "digest":
        meta["extra"]["vera"]["projections"] = "0" * 64
    elif how == "key":
        config = json.loads((drop / "adapter_config.json").read_text())
        config["projection_prng_key"] = 99
        (drop / "adapter_config.json").write_text(json.dumps(config))
    elif how == "shape":
        layers = meta["extra"]["vera"]["layers"]
        first = min(layers)
        layers[first] = [layers[first][0], layers[first][1] - 1]
    (drop / META_FILE).write_text(json.dumps(meta))


@pytest.mark.parametrize("how, message", [
    ("digest", "client 1 (", ),
    ("key", "has projection_prng_key=99"),
    ("shape", "records base_model.model."),
])
def test_a_drop_made_against_other_projections_is_refused(trained, tmp_path, how, message):
    ws = copy_of(trained["fedit"], tmp_path / "fed")
    _damaged_drop(ws, how)
    result = run("aggregate", "-w", ws, "--round", "1", "--method", "fedA2")
    refused(result, message)
    if how == "digest":
        assert "trained with other VeRA projections" in result.output
    assert not (ws / "rounds" / "1" / "global").exists()


def test_a_drop_carrying_other_projections_is_refused(trained, tmp_path):
    from uniflow_cli.adapters import write_adapter

    drops = [read_adapter(trained["fedit"] / "rounds" / "1" / "clients" / c) for c in ("0", "1")]
    start = read_adapter(trained["fedit"] / "rounds" / "0" / "global")
    other = {**drops[1].tensors, VERA_A_KEY: start.tensors[VERA_A_KEY] + 1.0, VERA_B_KEY: start.tensors[VERA_B_KEY]}
    bad = write_adapter(tmp_path / "bad", peft_config=drops[1].peft_config, tensors=other, meta=drops[1].meta)
    result = run("aggregate", drops[0].path, bad, "--out", tmp_path / "g", "--start", start.path)
    refused(result, "carries other VeRA projections (base_model.vera_A)")
    assert not (tmp_path / "g").exists()


def test_explicit_aggregate_without_the_start_needs_the_projections(trained, tmp_path):
    drops = [trained["fedit"] / "rounds" / "1" / "clients" / c for c in ("0", "1")]
    refused(run("aggregate", *drops, "--out", tmp_path / "g"), "VeRA aggregation needs the shared projections")
    ok("aggregate", *drops, "--out", tmp_path / "g", "--start", trained["fedit"] / "rounds" / "0" / "global", "--dtype", "bfloat16")
    published = read_adapter(tmp_path / "g")
    assert published.tensors[VERA_A_KEY].dtype == torch.float32  # the projections are never rounded
    assert published.tensors[next(k for k in published.tensors if k.endswith("vera_lambda_b"))].dtype == torch.bfloat16


def test_inspect_shows_the_vera_layers(published):
    from uniflow_cli.cli.inspect import describe_adapter

    out = published["fedA2"] / "rounds" / "1" / "global"
    info, stored = describe_adapter(out), read_adapter(out)
    assert info["family"] == "vera" and info["peft"]["projection_prng_key"] == 3 and len(info["layers"]) == len(vera_modules(stored.tensors)[0])
    row = info["layers"][0]
    A, B = layer_of(stored, row["module"])
    dense = vera.vera_delta(A.double(), B.double(), stored.tensors[row["module"] + ".vera_lambda_d"].double(),
                            stored.tensors[row["module"] + ".vera_lambda_b"].double())
    assert row["delta_norm"] == pytest.approx(float(dense.norm()), rel=1e-10)


# ---------------------------------------------------------------------------------------------- the core, in memory
def _client(label: str, tensors: dict, **config) -> ClientUpdate:
    return ClientUpdate(label, tensors, {"peft_type": "VERA", "r": 2, "projection_prng_key": 0, **config},
                        vera={"layers": {"base_model.model.q": [3, 4]}})


def _tensors(seed: int, *, projections: bool) -> dict:
    gen = torch.Generator().manual_seed(seed)
    out = {"base_model.model.q.vera_lambda_d": torch.rand(2, generator=gen), "base_model.model.q.vera_lambda_b": torch.rand(3, generator=gen)}
    if projections:
        out.update({VERA_A_KEY: torch.rand(2, 5, generator=torch.Generator().manual_seed(0)), VERA_B_KEY: torch.rand(6, 2, generator=torch.Generator().manual_seed(1))})
    return out


def test_mixed_families_are_refused():
    lora = ClientUpdate("lora", {"m.lora_A.weight": torch.ones(2, 4), "m.lora_B.weight": torch.ones(3, 2)}, {"r": 2})
    with pytest.raises(IncompatibleAdaptersError, match="is a VERA adapter but lora is LORA"):
        aggregate([_client("a", _tensors(0, projections=True)), lora], [1, 1], AggregationOptions(method="fedit"))


@pytest.mark.parametrize("layers, message", [
    ({}, "no input records the shape of VeRA layer base_model.model.q"),
    ({"base_model.model.q": [3, 9]}, "does not fit the projections"),
    ({"base_model.model.q": [3, True]}, "is not \\[d_out, d_in\\]"),
])
def test_layer_shapes_are_needed_and_checked(layers, message):
    clients = [ClientUpdate(f"c{k}", _tensors(k, projections=True), {"peft_type": "VERA", "r": 2}, vera={"layers": layers}) for k in range(2)]
    with pytest.raises((IncompatibleAdaptersError, UsageError), match=message):
        aggregate(clients, [1, 1], AggregationOptions(method="fedA2"))


def test_without_a_start_the_projections_come_from_the_drops():
    clients = [_client(f"c{k}", _tensors(k, projections=True)) for k in range(2)]
    result = aggregate(clients, [1, 3], AggregationOptions(method="fedit"))
    expected = 0.25 * clients[0].tensors["base_model.model.q.vera_lambda_b"] + 0.75 * clients[1].tensors["base_model.model.q.vera_lambda_b"]
    assert torch.allclose(result.tensors["base_model.model.q.vera_lambda_b"], expected, rtol=1e-6)
    assert torch.equal(result.tensors[VERA_A_KEY], clients[0].tensors[VERA_A_KEY]) and result.vera == {"layers": {"base_model.model.q": [3, 4]}}
    assert result.layers[0].rel_error is not None


def test_ffa_takes_the_frozen_d_from_the_start():
    start = _client("start", _tensors(9, projections=True))
    clients = [_client(f"c{k}", {k2: v for k2, v in _tensors(k, projections=False).items() if k2.endswith("_b")}) for k in range(2)]
    result = aggregate(clients, [1, 1], AggregationOptions(method="ffa"), start=start)
    assert torch.equal(result.tensors["base_model.model.q.vera_lambda_d"], start.tensors["base_model.model.q.vera_lambda_d"])
    assert result.layers[0].rel_error is not None and result.layers[0].rel_error < 1e-6  # exact: ΔW is linear in b


def test_vera_config_checks(tmp_path):
    from uniflow_cli.adapters import check_peft_config

    check_peft_config({"peft_type": "VERA", "r": 4, "projection_prng_key": 0, "save_projection": True}, "x")
    with pytest.raises(AdapterError, match="save_projection=false"):
        check_peft_config({"peft_type": "VERA", "r": 4, "save_projection": False}, "x")
    with pytest.raises(AdapterError, match="is not LORA or VERA"):
        check_peft_config({"peft_type": "IA3", "r": 4}, "x")


# ---------------------------------------------------------------------------------------------- Flower
def test_flower_carries_the_projections_like_the_file_drop_path(trained, tmp_path):
    pytest.importorskip("flwr")
    from tests.test_flower import drive

    expected = (tmp_path / "expected")
    ok("aggregate", "-w", copy_of(trained["fedit"], expected), "--round", "1", "--method", "fedA2")
    ws = copy_of(trained["fedit"], tmp_path / "flower")
    shutil.rmtree(ws / "rounds" / "1")
    drive(ws, {"workspace": str(ws), "method": "fedA2", "num-server-rounds": 1}, {101: "0", 102: "1"})
    got = ws / "rounds" / "1" / "global" / TENSORS_FILE
    assert got.read_bytes() == (expected / "rounds" / "1" / "global" / TENSORS_FILE).read_bytes()


@pytest.mark.parametrize("run_config, message", [
    ({"method": "svd"}, 'run-config method="svd" is not defined for VeRA'),
    ({"method": "fedit", "dp": True}, "dp=true with a VeRA workspace"),
])
def test_flower_refuses_what_vera_cannot_do(template, run_config, message):
    pytest.importorskip("flwr")
    from uniflow_cli.flower.server import build_strategy
    from uniflow_cli.flower.settings import FlowerRunSettings
    from uniflow_cli.workspace import find_workspace

    with pytest.raises(ConfigError, match=re.escape(message)):
        build_strategy(FlowerRunSettings.from_run_config({"workspace": str(template), **run_config}), find_workspace(template))
