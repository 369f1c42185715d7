"""bf16 storage with float32 math (models/upcast.py, compute.math_mode): exact float32 arithmetic on
bf16-rounded weights, no float32 copy of a large weight kept for the backward."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from tests.test_compute_models import BATCH_SAMPLES, _grads, _model
from uniflow_cli.compute import BF16_MATH_ENV, autocast, math_mode, place
from uniflow_cli.errors import ConfigError
from uniflow_cli.models import collate, unwrap
from uniflow_cli.models.upcast import UpcastLinear, is_upcast, upcast_frozen

BF16 = torch.bfloat16


def _rounded_fp32_twin(low: Any) -> Any:
    """A float32 model holding exactly the low-precision model's values (the frozen ones rounded to bf16 once)."""
    twin = _model(None)
    with torch.no_grad():
        state = dict(low.named_parameters())
        for name, param in twin.named_parameters():
            param.copy_(state[name].float())
        buffers = dict(low.named_buffers())  # e.g. RoPE's inverse frequencies, stored in bf16 too
        for name, buffer in twin.named_buffers():
            if buffer.is_floating_point():
                buffer.copy_(buffers[name].float())
    return twin


# DINOv2's own forward casts the pixels to its patch projection's dtype before the convolution, so an
# image row is compared on a bf16-rounded input (looser); text and audio rows are exact float32 math.
@pytest.mark.parametrize(("modalities", "rtol", "atol"), [(("text", "audio"), 1e-4, 1e-6), (("text", "audio", "image"), 2e-2, 2e-5)])
def test_upcast_equals_float32_math_on_bf16_rounded_weights(modalities: tuple[str, ...], rtol: float, atol: float) -> None:
    # Prepare: the same LoRA on a bf16 base (upcast) and on its float32 twin.
    low = _model(BF16)
    twin = _rounded_fp32_twin(low)
    assert place(low, "cpu", "bf16") in ("native", "upcast")
    upcast_frozen(low)
    batch = collate([s for s in BATCH_SAMPLES if s["modality"] in modalities], low)
    # Execute
    loss_low, grads_low = _grads(low, batch, full_logits=False)
    loss_ref, grads_ref = _grads(twin, batch, full_logits=False)
    # Assert: same loss, same gradients of every trainable tensor, and the storage is still bf16.
    assert loss_low.dtype == torch.float32
    torch.testing.assert_close(loss_low, loss_ref, rtol=1e-5, atol=1e-6)
    assert grads_low.keys() == grads_ref.keys() and grads_low
    for name in grads_ref:
        torch.testing.assert_close(grads_low[name], grads_ref[name], rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")
    assert unwrap(low).llm.get_input_embeddings().weight.dtype == BF16
    assert all(p.dtype == torch.float32 for n, p in low.named_parameters() if p.requires_grad)


def test_upcast_generation_matches_the_float32_twin() -> None:
    low = _model(BF16)
    twin = _rounded_fp32_twin(low)
    upcast_frozen(low)
    prompts = collate(BATCH_SAMPLES, low, train=False)
    assert unwrap(low).generate(prompts, max_new_tokens=4) == unwrap(twin).generate(prompts, max_new_tokens=4)


def test_upcast_linear_gradient_equals_dense_and_keeps_only_the_bf16_weight() -> None:
    gen = torch.Generator().manual_seed(0)
    weight = (0.1 * torch.randn(6, 5, generator=gen)).to(BF16)
    bias = torch.randn(6, generator=gen).to(BF16)
    x = torch.randn(3, 5, generator=gen, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = UpcastLinear.apply(x, weight, bias)
    y.square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = nn.functional.linear(x_ref, weight.float(), bias.float())
    y_ref.square().sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    assert not any(t.dtype == torch.float32 and t.shape == weight.shape for t in saved)


def test_a_large_weight_is_converted_in_row_blocks_with_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    import uniflow_cli.models.upcast as upcast

    monkeypatch.setattr(upcast, "CHUNK_ELEMENTS", 10)  # 2 rows of 5 per block: 3 blocks for 6 rows
    gen = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(6, 5, generator=gen).to(BF16), torch.randn(6, generator=gen).to(BF16)
    x = torch.randn(2, 3, 5, generator=gen, requires_grad=True)
    y = UpcastLinear.apply(x, weight, bias)
    (y * torch.arange(6.0)).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = nn.functional.linear(x_ref, weight.float(), bias.float())
    (y_ref * torch.arange(6.0)).sum().backward()
    assert len(upcast._row_blocks(weight)) == 3
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)


def test_upcast_is_idempotent_and_skips_trainable_and_float32_modules() -> None:
    model = nn.Sequential(nn.Linear(4, 4).to(BF16), nn.LayerNorm(4).to(BF16), nn.Linear(4, 4))
    model[0].requires_grad_(False)
    model[1].requires_grad_(False)
    assert upcast_frozen(model) == 2 and upcast_frozen(model) == 0
    assert is_upcast(model) and not is_upcast(model[2])
    out = model(torch.randn(2, 4))
    assert out.dtype == torch.float32
    trainable = nn.Linear(4, 4).to(BF16)  # a trainable low-precision layer is the optimiser's business, not ours
    assert upcast_frozen(trainable) == 0


@pytest.mark.parametrize(("env", "precision", "expected"), [
    ("upcast", "bf16", "upcast"), ("native", "bf16", "native"), ("upcast", "fp32", "native"), ("", "fp32", "native"),
])
def test_math_mode_follows_the_environment(monkeypatch: pytest.MonkeyPatch, env: str, precision: str, expected: str) -> None:
    monkeypatch.setenv(BF16_MATH_ENV, env)
    assert math_mode("cpu", precision) == expected


def test_math_mode_auto_follows_the_cpu_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    import uniflow_cli.compute as compute

    monkeypatch.delenv(BF16_MATH_ENV, raising=False)
    for has, mode in ((True, "native"), (False, "upcast")):
        monkeypatch.setattr(compute, "_cpu_has_bf16_kernels", lambda has=has: has)
        assert math_mode("cpu", "bf16") == mode
    # Under upcast no autocast runs: the matmuls are float32 by construction.
    assert isinstance(autocast("cpu", "bf16"), type(autocast("cpu", "fp32")))


def test_bad_math_mode_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BF16_MATH_ENV, "fast")
    with pytest.raises(ConfigError, match="UNIFLOW_BF16_MATH.*fast.*auto, native, upcast"):
        math_mode("cpu", "bf16")
