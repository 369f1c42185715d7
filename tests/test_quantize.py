"""QLoRA (models/quantize.py): the LLM's frozen linear layers in NF4 / int8 through bitsandbytes, LoRA on top.

bitsandbytes ≥ 0.46 runs both on the CPU (reference kernels), so these run here; the GPU path is the same
code on ``device="cuda"`` (benchmarks/gpu_check.sh)."""

from __future__ import annotations

import builtins

import pytest
import torch
from torch import nn

from tests.test_compute import one_line, run, template, train, ws  # noqa: F401  (fixtures)
from tests.test_compute_models import BATCH_SAMPLES, _model
from uniflow_cli.adapters import read_adapter
from uniflow_cli.aggregation.registry import method_spec
from uniflow_cli.errors import ConfigError, MissingDependencyError, ModelError
from uniflow_cli.models import adapter_tensors, collate, unwrap
from uniflow_cli.models.lora import add_to_base
from uniflow_cli.models.quantize import check_quantize, quantize_llm, quantized_layers
from uniflow_cli.settings import TrainSettings

bnb = pytest.importorskip("bitsandbytes")
CPU = torch.device("cpu")


def _plain_linears(module: nn.Module) -> int:
    return sum(type(m) is nn.Linear and not any(p.requires_grad for p in m.parameters()) for m in module.modules())


@pytest.mark.parametrize(("scheme", "kind"), [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_quantize_replaces_every_frozen_llm_linear_but_the_head(scheme: str, kind: str) -> None:
    # Prepare: a tiny LoRA model; its loss before quantising.
    model = _model(None)
    llm = unwrap(model).llm
    frozen = _plain_linears(llm) - 1  # the LM head stays dense
    batch = collate(BATCH_SAMPLES, model)
    before = float(model(batch, full_logits=False).loss.detach())
    lora_before = adapter_tensors(model)
    # Execute
    count = quantize_llm(model, scheme, device=CPU, compute_dtype=torch.float32)
    # Assert: every frozen linear of the LLM but the head is a bitsandbytes layer, the encoders are not
    assert count == frozen == quantized_layers(model) and count > 0
    assert _plain_linears(llm) == 1 and type(llm.get_output_embeddings()) is nn.Linear
    assert quantized_layers(unwrap(model).encoders) == 0
    q_proj = llm.model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer).__name__ == kind
    # … LoRA is untouched and still trains in float32, the loss moves by the quantisation error only.
    assert all(torch.equal(v, lora_before[k]) for k, v in adapter_tensors(model).items())
    out = model(batch, full_logits=False)
    out.loss.backward()
    assert abs(float(out.loss) - before) <= 0.02 * abs(before)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert any(g is not None and bool(g.abs().sum() > 0) for g in grads)
    assert all(bool(torch.isfinite(g).all()) for g in grads if g is not None)


def test_local_train_with_nf4_trains_and_records_it(ws):  # noqa: F811
    drop = train(ws, "--quantize", "nf4")
    adapter = read_adapter(drop)
    config = adapter.meta.extra["train"]["config"]
    assert config["quantize"] == "nf4" and config["quantized_layers"] == 14  # the tiny LLM: 2 layers × 7 linears
    assert all(v.dtype == torch.float32 and bool(torch.isfinite(v).all()) for v in adapter.tensors.values())


def test_nf4_same_inputs_give_the_same_bytes(template, tmp_path):  # noqa: F811
    import shutil

    from uniflow_cli.adapters import TENSORS_FILE

    drops = []
    for name in ("a", "b"):
        copy = tmp_path / name
        shutil.copytree(template, copy)
        drops.append(train(copy, "--quantize", "nf4"))
    assert (drops[0] / TENSORS_FILE).read_bytes() == (drops[1] / TENSORS_FILE).read_bytes()


def test_a_bad_quantize_flag_is_one_line(ws):  # noqa: F811
    result = run("local-train", "--client", "0", "-w", ws, "--steps", 1, "--quantize", "q4")
    assert result.exit_code == 2 and one_line(result.output).startswith("error: --quantize 'q4' is not one of nf4, int8")
    assert not (ws / "rounds" / "1").exists()


@pytest.mark.parametrize("method", ["fedex", "flora"])
def test_methods_that_fold_into_the_base_refuse_a_quantised_base(method: str) -> None:
    with pytest.raises(ConfigError, match=rf"^quantize=\"nf4\" cannot be used with method {method}: it folds dense updates"):
        check_quantize("nf4", CPU, method_spec(method))
    check_quantize("nf4", CPU, method_spec("fedA2"))  # the others are fine


def test_a_dense_fold_into_a_quantised_layer_is_refused_before_any_change() -> None:
    model = _model(None)
    quantize_llm(model, "nf4", device=CPU, compute_dtype=torch.float32)
    key = "llm.model.layers.0.self_attn.q_proj.weight"
    with pytest.raises(ModelError, match="cannot fold a dense update into the quantised layer"):
        add_to_base(model, {key: torch.zeros(32, 32)})


def test_quantize_on_mps_and_without_bitsandbytes_are_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"^quantize=\"int8\" is not supported on mps"):
        check_quantize("int8", torch.device("mps"))
    real_import = builtins.__import__

    def no_bitsandbytes(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bitsandbytes)
    with pytest.raises(MissingDependencyError, match="needs the bitsandbytes package") as info:
        check_quantize("nf4", CPU)
    assert "pip install 'bitsandbytes>=0.46'" in str(info.value.fix)


def test_the_train_table_takes_quantize_in_library_terms() -> None:
    assert TrainSettings(quantize="int8").quantize == "int8" and TrainSettings().quantize is None
    with pytest.raises(ConfigError, match=r'^quantize="fp4" is not one of nf4, int8'):
        TrainSettings(quantize="fp4")
