"""``uniflow evaluate`` and uniflow_cli.evaluation on the tiny-random preset (fast: no real model weights).

One module-scoped workspace (image encoder only, text test split) and one adapter trained in this file
on the test samples themselves are shared; tests that change a workspace work on a copy.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from uniflow_cli.adapters import AdapterMeta, read_adapter, write_adapter
from uniflow_cli.cli.app import app
from uniflow_cli.data.schema import make_row, rows_to_dataset
from uniflow_cli.errors import ConfigError, DataError, IncompatibleAdaptersError, OutputExistsError, UsageError, WorkspaceError
from uniflow_cli.evaluation import EvalOptions, EvalRequest, evaluate_model, run_evaluate
from uniflow_cli.models.lora import add_to_base, lora_deltas
from uniflow_cli.evaluation_io import read_eval_json
from uniflow_cli.global_info import settings_record
from uniflow_cli.models import ModelSettings, adapter_tensors, collate, load_model, peft_config_dict
from uniflow_cli.models.workspace_init import init_workspace
from uniflow_cli.workspace import LoraSettings, Workspace

SETTINGS = ModelSettings(preset="tiny-random", modalities=["image"])
LORA = LoraSettings(r=4, lora_alpha=8.0)
QA = [("Colour of the sky?", "blue"), ("Capital of France?", "paris"), ("Two plus two?", "four"),
      ("Opposite of hot?", "cold"), ("Animal that barks?", "dog"), ("Frozen water?", "ice")]
runner = CliRunner()
_OPTION_FIELDS = {f.name for f in dataclasses.fields(EvalOptions)}


def _evaluate(**kwargs):
    """run_evaluate with the request's and the options' fields as keywords (as the CLI's flags are)."""
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in _OPTION_FIELDS}
    return run_evaluate(EvalRequest(**kwargs), EvalOptions(**options))


def _text_rows(pairs=QA):
    return [make_row(id=f"t{i}", modality="text", question=q, answer=a) for i, (q, a) in enumerate(pairs)]


def _save_split(path: Path, rows) -> None:
    rows_to_dataset(rows).save_to_disk(str(path))


def _publish(ws: Workspace, t: int, peft_config, tensors, *, method="fedit", residual=None, extra=None, fingerprint=None):
    meta = AdapterMeta(role="global", base_fingerprint=fingerprint or unwrap_fingerprint(), round=t, method=method, extra=extra or {})
    write_adapter(ws.global_dir(t), peft_config=peft_config, tensors=tensors, meta=meta, residual=residual)


def unwrap_fingerprint() -> str:
    from uniflow_cli.models import base_fingerprint

    return base_fingerprint(SETTINGS)


@pytest.fixture(scope="module")
def base_ws(tmp_path_factory) -> Workspace:
    """tiny-random workspace (round 0 published) with data/test/text holding the QA pairs."""
    root = tmp_path_factory.mktemp("ws") / "fed"
    init_workspace(root, SETTINGS, LORA, seed=0)
    ws = Workspace(root.resolve())
    _save_split(ws.test_data("text"), _text_rows())
    return ws


@pytest.fixture(scope="module")
def trained(base_ws):
    """(peft_config, tensors) of an adapter trained on the test samples: 60 AdamW steps, deterministic.

    The tiny-random LLM has tied, small embeddings, so its logits stay close to uniform and the loss
    barely moves; the argmax (what token accuracy counts) does move: ~16/29 answer tokens after training.
    """
    from uniflow_cli.metrics import token_accuracy

    torch.manual_seed(0)
    model = load_model(SETTINGS, LORA, 0)
    model.train()
    batch = collate([dict(r) for r in _text_rows()], model, train=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 32-wide model gains nothing from threads, and loses a lot on a busy machine
    try:
        for _ in range(60):
            opt.zero_grad()
            model(batch).loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        correct, total = token_accuracy(model(batch).logits, batch["labels"])
    assert correct >= total // 3, f"training did not fit the samples ({correct}/{total} answer tokens)"
    return peft_config_dict(model), adapter_tensors(model)


@pytest.fixture(scope="module")
def trained_acc(base_ws, trained, tmp_path_factory):
    """Acc of the trained adapter evaluated directly (explicit mode)."""
    tmp = tmp_path_factory.mktemp("direct")
    write_adapter(tmp / "adapter", peft_config=trained[0], tensors=trained[1],
                  meta=AdapterMeta(role="global", base_fingerprint=unwrap_fingerprint(), round=1, method="fedit"))
    result = _evaluate(adapter=tmp / "adapter", data=[base_ws.test_data("text")], preset="tiny-random",
                          out=tmp / "direct.json", max_new_tokens=8)
    return result.payload["metrics"]["text"]["acc"]


def _copy(ws: Workspace, tmp_path: Path) -> Workspace:
    dst = tmp_path / "fed"
    shutil.copytree(ws.root, dst)
    return Workspace(dst.resolve())


def _cli(*args):
    return runner.invoke(app, ["evaluate", *map(str, args)])


# --------------------------------------------------------------------------------------------------
# happy paths
# --------------------------------------------------------------------------------------------------
def test_cli_base_writes_valid_eval_json(base_ws, tmp_path):
    ws = _copy(base_ws, tmp_path)
    result = _cli("--base", "--workspace", ws.root, "--limit", 4, "--max-new-tokens", 4, "--batch-size", 3)
    assert result.exit_code == 0, result.output
    payload = read_eval_json(ws.eval_json(0))  # validates the schema
    assert payload["round"] == 0
    assert list(payload["metrics"]) == ["text", "overall"]
    assert payload["metrics"]["text"]["n"] == 4
    assert payload["config"]["limit"] == 4 and payload["config"]["bertscore"]["num_layers"] == 6
    assert [s["reference"] for s in payload["samples"]["text"]] == [a for _, a in QA[:4]]
    assert "ROUGE-L" in result.output and "F_BERT" in result.output and "wrote" in result.output


def test_same_inputs_give_same_bytes_and_batch_size_does_not_change_metrics(base_ws, tmp_path):
    a = _evaluate(workspace=base_ws.root, base=True, out=tmp_path / "a.json", max_new_tokens=4, batch_size=2)
    b = _evaluate(workspace=base_ws.root, base=True, out=tmp_path / "b.json", max_new_tokens=4, batch_size=2)
    c = _evaluate(workspace=base_ws.root, base=True, out=tmp_path / "c.json", max_new_tokens=4, batch_size=6)
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert a.payload["metrics"]["text"]["acc"] == c.payload["metrics"]["text"]["acc"]
    assert a.payload["metrics"]["text"]["tokens"] == sum(len(ans) + 1 for _, ans in QA)  # bytes + EOS
    assert b.payload["samples"] == c.payload["samples"]


def test_trained_adapter_beats_base_on_its_training_samples(base_ws, trained, trained_acc, tmp_path):
    ws = _copy(base_ws, tmp_path)
    _publish(ws, 1, *trained)
    base = _evaluate(workspace=ws.root, round=0, max_new_tokens=8)
    tuned = _evaluate(workspace=ws.root, max_new_tokens=8)  # default: the latest published round (1)
    assert tuned.round == 1 and tuned.path == ws.eval_json(1)
    acc_base, acc_tuned = base.payload["metrics"]["text"]["acc"], tuned.payload["metrics"]["text"]["acc"]
    assert acc_tuned > acc_base + 30, (acc_base, acc_tuned)
    assert tuned.payload["adapter"]["method"] == "fedit"
    assert acc_tuned == trained_acc  # workspace mode and explicit mode load the same model


def test_explicit_adapter_and_data_with_preset(base_ws, trained, tmp_path):
    adapter = tmp_path / "adapter"
    write_adapter(adapter, peft_config=trained[0], tensors=trained[1],
                  meta=AdapterMeta(role="global", base_fingerprint=unwrap_fingerprint(), round=1, method="fedit"))
    out = tmp_path / "explicit.json"
    result = _cli("--adapter", adapter, "--data", base_ws.test_data("text"), "--preset", "tiny-random", "--out", out,
                  "--max-new-tokens", 8)
    assert result.exit_code == 0, result.output
    payload = read_eval_json(out)
    assert payload["round"] == 1 and payload["metrics"]["text"]["n"] == len(QA)
    assert payload["adapter"]["path"] == str(adapter.resolve())


@pytest.fixture
def decoy(tmp_path, monkeypatch):
    """A workspace in the cwd whose [model] is not the adapter's (audio encoder: another base fingerprint)."""
    root = tmp_path / "decoy"
    root.mkdir()
    (root / "uniflow.toml").write_text('[model]\npreset = "tiny-random"\nmodalities = ["audio"]\n')
    monkeypatch.chdir(root)
    monkeypatch.delenv("UNIFLOW_WORKSPACE", raising=False)
    return root


def _explicit_adapter(path: Path, trained, *, records_settings: bool) -> Path:
    extra = {"settings": settings_record(SETTINGS, LORA)} if records_settings else {}
    write_adapter(path, peft_config=trained[0], tensors=trained[1],
                  meta=AdapterMeta(role="global", base_fingerprint=unwrap_fingerprint(), round=1, method="fedit", extra=extra))
    return path


@pytest.mark.parametrize("via", ["cwd", "env"])
def test_explicit_mode_takes_the_adapters_settings_not_a_workspace_nearby(base_ws, trained, tmp_path, decoy, monkeypatch, via):
    """Issue 13: explicit mode used the cwd's (or $UNIFLOW_WORKSPACE's) uniflow.toml when no --preset was given."""
    if via == "env":
        monkeypatch.setenv("UNIFLOW_WORKSPACE", str(decoy))
        monkeypatch.chdir(tmp_path)
    adapter, out = _explicit_adapter(tmp_path / "adapter", trained, records_settings=True), tmp_path / "e.json"
    result = _cli("--adapter", adapter, "--data", base_ws.test_data("text"), "--out", out, "--limit", 2, "--max-new-tokens", 2)
    assert result.exit_code == 0, result.output
    assert read_eval_json(out)["adapter"]["base_fingerprint"] == unwrap_fingerprint()


@pytest.mark.parametrize("what", ["adapter", "base"])
def test_explicit_mode_without_settings_asks_for_a_preset(base_ws, trained, tmp_path, decoy, what):
    """An adapter that records no settings (or --base) and no --preset/--workspace: one error, the decoy unread."""
    out = tmp_path / "e.json"
    given = ["--adapter", _explicit_adapter(tmp_path / "adapter", trained, records_settings=False)] if what == "adapter" else ["--base"]
    result = _cli(*given, "--data", base_ws.test_data("text"), "--out", out)
    _assert_one_line_error(result, "no model settings")
    assert "neither --preset nor --workspace was given" in " ".join(result.output.split()) and not out.exists()


def test_fedex_residuals_of_all_rounds_reach_the_base(base_ws, trained, trained_acc, tmp_path):
    """Rounds 1 and 2 carry B = 0 and half of the trained ΔW each as residuals: together, the trained model."""
    ws = _copy(base_ws, tmp_path)
    _publish(ws, 1, *trained)
    halves = {k: v / 2 for k, v in lora_deltas(read_adapter(ws.global_dir(1)).peft_config, read_adapter(ws.global_dir(1)).tensors).items()}
    assert halves and all(k.startswith(("llm.", "encoders.")) and k.endswith(".weight") for k in halves)
    shutil.rmtree(ws.global_dir(1))
    zero_b = {k: (torch.zeros_like(v) if ".lora_B." in k else v) for k, v in trained[1].items()}
    _publish(ws, 1, trained[0], zero_b, method="fedex", residual=halves)
    _publish(ws, 2, trained[0], zero_b, method="fedex", residual=halves)
    result = _evaluate(workspace=ws.root, round=2, max_new_tokens=8)
    assert any("FedEx residual" in n and "rounds 1..2" in n for n in result.notices)
    # W0 + ΔW/2 + ΔW/2 vs W0 x + s·B·A x: equal up to float rounding (one near-tied token may flip).
    assert result.payload["metrics"]["text"]["acc"] == pytest.approx(trained_acc, abs=100 / 29 + 1e-6)
    assert trained_acc > 30


def test_flora_earlier_rounds_are_merged_and_fedsa_has_a_notice(base_ws, trained, trained_acc, tmp_path):
    ws = _copy(base_ws, tmp_path)
    merge = {"aggregation": {"merge_into_base": True}}
    zero_b = {k: (torch.zeros_like(v) if ".lora_B." in k else v) for k, v in trained[1].items()}
    only_a = {k: v for k, v in trained[1].items() if ".lora_B." not in k}
    _publish(ws, 1, *trained, method="flora", extra=merge)  # merged into W0 before round 2
    _publish(ws, 2, trained[0], zero_b, method="flora", extra=merge)
    _publish(ws, 3, trained[0], only_a, method="fedsa")
    merged = _evaluate(workspace=ws.root, round=2, max_new_tokens=8)
    assert any("FLoRA" in n for n in merged.notices)
    assert merged.payload["metrics"]["text"]["acc"] == pytest.approx(trained_acc, abs=100 / 29 + 1e-6)
    fedsa = _evaluate(workspace=ws.root, round=3, max_new_tokens=8)
    assert any("fedsa" in n and "B = 0" in n for n in fedsa.notices)


def test_flora_merges_follow_the_method_not_a_recorded_flag(base_ws, trained, trained_acc, tmp_path):
    """Issue 13: FLoRA's earlier rounds were merged only when extra.aggregation.merge_into_base said so;
    the method's spec (merges_into_base) decides now, as it does for local training."""
    ws = _copy(base_ws, tmp_path)
    zero_b = {k: (torch.zeros_like(v) if ".lora_B." in k else v) for k, v in trained[1].items()}
    _publish(ws, 1, *trained, method="flora")
    _publish(ws, 2, trained[0], zero_b, method="flora")
    merged = _evaluate(workspace=ws.root, round=2, max_new_tokens=8)
    assert any("FLoRA" in n for n in merged.notices)
    assert merged.payload["metrics"]["text"]["acc"] == pytest.approx(trained_acc, abs=100 / 29 + 1e-6)


def _fedsa_round(ws: Workspace, trained, t: int = 1, *, client: str = "0", state_round: int | None = None, b=None):
    """A fedsa global of round t (the trained A + shared tensors, no B) and client's private B in state/."""
    only_a = {k: v for k, v in trained[1].items() if ".lora_B." not in k}
    own_b = b if b is not None else {k: v for k, v in trained[1].items() if ".lora_B." in k}
    _publish(ws, t, trained[0], only_a, method="fedsa")
    meta = AdapterMeta(role="client", client_id=client, round=state_round or t, method="fedsa", base_fingerprint=unwrap_fingerprint())
    write_adapter(ws.client_state(client), peft_config=trained[0], tensors=own_b, meta=meta, force=True)


def test_fedsa_personalised_model_is_global_A_plus_the_clients_B(base_ws, trained, trained_acc, tmp_path):
    """A + the client's own B is the trained adapter itself: the same Acc as evaluating it directly."""
    ws = _copy(base_ws, tmp_path)
    _fedsa_round(ws, trained)
    result = _cli("--round", 1, "--client", 0, "--workspace", ws.root, "--max-new-tokens", 8)
    assert result.exit_code == 0, result.output
    payload = read_eval_json(ws.client_eval_json("0", 1))
    assert payload["metrics"]["text"]["acc"] == pytest.approx(trained_acc)
    assert payload["adapter"]["client"] == "0" and payload["adapter"]["private_state"] == str(ws.client_state("0"))
    assert "client 0's personalised model" in result.output and not ws.eval_json(1).exists()
    shared_only = _evaluate(workspace=ws.root, round=1, max_new_tokens=8)  # the global alone: B = 0
    assert shared_only.payload["metrics"]["text"]["acc"] < trained_acc
    report = runner.invoke(app, ["report", str(ws.root / "eval" / "clients" / "0"), "--names", "client 0", "--out", str(tmp_path / "report")])
    assert report.exit_code == 0, report.output
    assert "client 0" in (tmp_path / "report" / "report.md").read_text()


@pytest.mark.parametrize("case, match", [
    ("not-fedsa", "round 1 is a fedit global; only fedsa, feddpa keep a client-private part"),
    ("no-state", "client 7 has no private state in"),
    ("stale-state", "is from round 2, not round 1"),
    ("other-rank", "client 0's B has rank 2, the global A rank 4"),
    ("with-base", "cannot be combined with --base"),
])
def test_fedsa_personalised_model_bad_cases(base_ws, trained, tmp_path, case, match):
    ws = _copy(base_ws, tmp_path)
    client, args = "0", ["--round", 1]
    if case == "not-fedsa":
        _publish(ws, 1, *trained, method="fedit")
    elif case == "no-state":
        _fedsa_round(ws, trained)
        client = "7"
    elif case == "stale-state":
        _fedsa_round(ws, trained, state_round=2)
    elif case == "other-rank":
        _fedsa_round(ws, trained, b={k: v[:, :2].contiguous() for k, v in trained[1].items() if ".lora_B." in k})
    else:
        args = ["--base"]
    _assert_one_line_error(_cli(*args, "--client", client, "--workspace", ws.root), match)
    assert not (ws.root / "eval").exists()


def test_add_to_base_changes_exactly_the_named_weight(base_ws):
    model = load_model(SETTINGS, LORA, 0)
    key = "llm.model.layers.0.self_attn.q_proj.weight"
    layer = model.get_submodule("base_model.model.llm.model.layers.0.self_attn.q_proj").base_layer
    before = layer.weight.detach().clone()
    other = model.get_submodule("base_model.model.llm.model.layers.1.self_attn.q_proj").base_layer.weight.detach().clone()
    add_to_base(model, {key: torch.ones_like(before)}, where="test")
    assert torch.equal(layer.weight, before + 1)
    assert torch.equal(model.get_submodule("base_model.model.llm.model.layers.1.self_attn.q_proj").base_layer.weight, other)
    with pytest.raises(Exception, match="has shape"):
        add_to_base(model, {key: torch.ones(2, 2)}, where="test")
    with pytest.raises(Exception, match="names no module"):
        add_to_base(model, {"llm.nowhere.weight": torch.ones(1)}, where="test")


# --------------------------------------------------------------------------------------------------
# bad input: one line, exit != 0, nothing written
# --------------------------------------------------------------------------------------------------
def _assert_one_line_error(result, match: str):
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert match in " ".join(result.output.split()), result.output


def test_adapter_from_another_base(base_ws, trained, tmp_path):
    adapter = tmp_path / "foreign"
    write_adapter(adapter, peft_config=trained[0], tensors=trained[1],
                  meta=AdapterMeta(role="global", base_fingerprint="smol:0123456789abcdef", round=1, method="fedit"))
    out = tmp_path / "out.json"
    result = _cli("--adapter", adapter, "--data", base_ws.test_data("text"), "--workspace", base_ws.root, "--out", out)
    _assert_one_line_error(result, "was made for base smol:0123456789abcdef")
    assert not out.exists()
    with pytest.raises(IncompatibleAdaptersError, match="smol:0123456789abcdef"):
        _evaluate(adapter=adapter, data=[base_ws.test_data("text")], preset="tiny-random", out=out)


def test_missing_test_split(base_ws, tmp_path):
    ws = _copy(base_ws, tmp_path)
    shutil.rmtree(ws.data_dir / "test")
    _assert_one_line_error(_cli("--workspace", ws.root), "no test split in")
    assert not (ws.root / "eval").exists()


def test_modality_without_encoder(base_ws, tmp_path):
    ws = _copy(base_ws, tmp_path)
    wav = b"RIFF" + b"\0" * 40  # never decoded: the check runs before any sample is read by the model
    _save_split(ws.test_data("audio"), [make_row(id="a0", modality="audio", question="q", answer="a", audio_bytes=wav)])
    _assert_one_line_error(_cli("--workspace", ws.root), "has audio samples but the model has no audio encoder")
    assert not (ws.root / "eval").exists()


def test_empty_test_set(base_ws, tmp_path):
    ws = _copy(base_ws, tmp_path)
    shutil.rmtree(ws.test_data("text"))
    _save_split(ws.test_data("text"), [])
    _assert_one_line_error(_cli("--workspace", ws.root), "is empty (0 rows)")
    assert not (ws.root / "eval").exists()


def test_round_not_published(base_ws):
    _assert_one_line_error(_cli("--round", 5, "--workspace", base_ws.root), "round 5 is not published")
    assert not base_ws.eval_json(5).exists()


def test_output_exists_is_refused_before_any_work(base_ws, tmp_path, monkeypatch):
    out = tmp_path / "eval.json"
    out.write_text("keep me")
    import uniflow_cli.models as models

    # The refusal must come before the model is built: make building fail loudly if it is reached.
    monkeypatch.setattr(models, "model_from_adapter", lambda *a, **k: pytest.fail("model built before the output check"))
    _assert_one_line_error(_cli("--base", "--workspace", base_ws.root, "--out", out), "already exists")
    assert out.read_text() == "keep me"
    with pytest.raises(OutputExistsError):
        _evaluate(workspace=base_ws.root, base=True, out=out)


# Each conflict in library terms (run_evaluate: the request's field names, no flag) and as the CLI tells it.
CONFLICTS = [
    ({"base": True, "round": 2}, "base is round 0, but round 2 was given", ["--base", "--round", 2], "--base is round 0, but --round 2 was given"),
    ({"adapter": Path("x")}, "adapter needs data", ["--adapter", "x"], "--adapter needs --data"),
    ({"data": [Path("x")]}, "data needs adapter", ["--data", "x"], "--data needs --adapter DIR or --base"),
    ({"adapter": Path("x"), "round": 1, "data": [Path("x")]}, "adapter cannot be combined with base or round",
     ["--adapter", "x", "--round", 1, "--data", "x"], "--adapter cannot be combined with --base or --round"),
    ({"data": [Path("x")], "base": True}, "needs out FILE", ["--data", "x", "--base"], "explicit mode (--data) needs --out FILE"),
    ({"preset": "tiny-random"}, "preset only applies with adapter/data", ["--preset", "tiny-random"], "--preset only applies with --adapter/--data"),
]


@pytest.mark.parametrize(("kwargs", "match", "_args", "_told"), CONFLICTS)
def test_conflicting_options_in_library_terms(base_ws, kwargs, match, _args, _told):
    with pytest.raises(UsageError, match=match) as info:
        _evaluate(workspace=base_ws.root, **kwargs)
    assert "--" not in str(info.value)  # the library names no flag: a Flower or Python caller has none


@pytest.mark.parametrize(("_kwargs", "_match", "args", "told"), CONFLICTS)
def test_conflicting_options_are_told_as_flags(base_ws, _kwargs, _match, args, told):
    result = _cli(*args, "--workspace", base_ws.root)
    _assert_one_line_error(result, told)
    assert result.exit_code == 2


def test_options_are_checked_in_library_terms():
    with pytest.raises(ConfigError, match="limit=0 must be >= 1") as info:
        EvalOptions(limit=0)
    with pytest.raises(ConfigError, match="max_new_tokens=0 must be >= 1. Fix: set max_new_tokens = 16"):
        EvalOptions(max_new_tokens=0)
    assert "--" not in str(info.value)


def test_evaluate_model_rejects_empty_and_mislabelled_splits(base_ws):
    model = load_model(SETTINGS, LORA, 0)
    with pytest.raises(DataError, match="text test set is empty"):
        evaluate_model(model, {"text": []})
    with pytest.raises(DataError, match="is in the image split"):
        evaluate_model(model, {"image": [dict(r) for r in _text_rows()[:1]]})
    with pytest.raises(DataError, match="no audio encoder"):
        evaluate_model(model, {"audio": [{"modality": "audio"}]})


def test_no_workspace_and_no_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("UNIFLOW_WORKSPACE", raising=False)
    with pytest.raises(WorkspaceError, match="no workspace"):
        _evaluate()
    with pytest.raises(UsageError, match="no model settings: the untrained base has no adapter to record them, and neither preset nor workspace") as info:
        _evaluate(base=True, data=[tmp_path], out=tmp_path / "o.json")
    assert "--" not in str(info.value)
