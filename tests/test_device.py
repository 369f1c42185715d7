"""CUDA paths (marked ``device``; skipped without a CUDA device — benchmarks/gpu_check.sh runs them where one
is). The CPU tests cover the same code on ``cpu``; these check what only a GPU can: bf16/fp16 kernels, the
fp16 grad scaler, NF4/int8 on CUDA, and that a CUDA round gives what the CPU gives up to float rounding."""

from __future__ import annotations

import pytest
import torch

from tests.test_compute_models import BATCH_SAMPLES, _model

pytestmark = [pytest.mark.device, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _step(model, device, precision):
    from uniflow_cli.compute import autocast, grad_scaler, place, to_device
    from uniflow_cli.models import collate

    place(model, device, precision)
    batch = to_device(collate(BATCH_SAMPLES, model), device)
    model.train()
    with autocast(device, precision):
        loss = model(batch, full_logits=False).loss
    scaler = grad_scaler(device, precision)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    return float(loss), {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_cuda_step_matches_the_cpu_float32_step(precision):
    from uniflow_cli.compute import precision_dtype

    cpu_loss, cpu_grads = _step(_model(None), torch.device("cpu"), "fp32")
    dtype = None if precision == "fp32" else precision_dtype(precision)
    loss, grads = _step(_model(dtype), torch.device("cuda"), precision)
    assert grads.keys() == cpu_grads.keys()
    tolerance = 1e-4 if precision == "fp32" else 5e-2
    assert abs(loss - cpu_loss) <= tolerance * abs(cpu_loss)
    assert all(bool(torch.isfinite(g).all()) for g in grads.values())


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_quantised_training_on_cuda(scheme):
    pytest.importorskip("bitsandbytes")
    from uniflow_cli.models.quantize import quantize_llm, quantized_layers

    model = _model(torch.bfloat16)
    quantize_llm(model, scheme, device=torch.device("cuda"), compute_dtype=torch.bfloat16)
    assert quantized_layers(model) > 0
    loss, grads = _step(model, torch.device("cuda"), "bf16")
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads.values()) and loss == loss
