"""bf16 storage with float32 math: the frozen base keeps half the memory on a CPU without bf16 kernels.

On a CPU without AVX-512 BF16 / AMX, torch's bfloat16 matmul falls back to slow kernels (measured on an
AVX2 EPYC: a 64×2048×2048 linear is 4.7× slower in bf16 than in float32), so ``--precision bf16`` under
autocast would save memory and cost most of the speed. :func:`upcast_frozen` rewires every module whose
frozen weights are bfloat16/float16 to compute in float32 from them instead, converting one layer's weight
at the moment it is used:

* ``nn.Linear``: :class:`UpcastLinear`, whose backward keeps a reference to the stored low-precision weight
  (not a float32 copy: a 7B base would otherwise hold 27 GB of copies for the backward);
* ``nn.Embedding``: gather the rows, then cast them (never the whole table);
* any other module with low-precision parameters or buffers of its own (norms, convolutions, DINOv2's CLS
  token, layer scales): those tensors and its low-precision inputs are cast to float32 for the call only.

The result equals a float32 model whose weights were rounded to bf16 once (tested to 1e-5): exact float32
arithmetic on bf16-stored weights. Trainable tensors (LoRA, projectors) are float32 already and untouched;
quantised layers (``--quantize``) hold integer weights and are left to bitsandbytes.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

_LOW = (torch.bfloat16, torch.float16)
MARK = "_uniflow_upcast"


#: Largest float32 copy of a weight made at once (elements): a bigger weight — a 128k-vocabulary LM head is
#: 262M — is converted in row blocks, so the transient copy stays ~64 MB whatever the layer.
CHUNK_ELEMENTS = 1 << 24


def _row_blocks(weight: torch.Tensor) -> list[slice]:
    rows = max(1, CHUNK_ELEMENTS // max(1, weight.shape[1]))
    return [slice(start, start + rows) for start in range(0, weight.shape[0], rows)]


class UpcastLinear(torch.autograd.Function):
    """``y = x Wᵀ + b`` in float32 from a low-precision frozen ``W``; the gradient flows to ``x`` only."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)  # the stored bf16 tensor itself: no float32 copy outlives this call
        ctx.x_dtype = x.dtype
        x = x.float()
        blocks = _row_blocks(weight)
        if len(blocks) == 1:
            return nn.functional.linear(x, weight.float(), None if bias is None else bias.float())
        out = torch.cat([x @ weight[rows].float().T for rows in blocks], dim=-1)
        return out if bias is None else out + bias.float()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        (weight,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        grad = grad.float()
        grad_x = None
        for rows in _row_blocks(weight):  # Σ over output blocks of grad[…, block] · W[block]
            part = grad[..., rows] @ weight[rows].float()
            grad_x = part if grad_x is None else grad_x.add_(part)
        return grad_x.to(ctx.x_dtype), None, None


def _low_tensors(module: nn.Module) -> list[tuple[dict, str]]:
    """The module's own (not its children's) low-precision floating parameters and buffers, as (dict, name)."""
    found = []
    for store in (module._parameters, module._buffers):
        for name, tensor in store.items():
            if tensor is not None and tensor.dtype in _LOW:
                found.append((store, name))
    return found


def _to_float(value: Any) -> Any:
    if torch.is_tensor(value) and value.dtype in _LOW:
        return value.float()
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_to_float(v) for v in value)
    return value


@contextlib.contextmanager
def _float_copies(stores: list[tuple[dict, str]]) -> Iterator[None]:
    # The float32 copies live for this call only; autograd may keep a small one (a norm's weight) for the
    # backward, which is why large matrices go through UpcastLinear instead.
    saved = [(store, name, store[name]) for store, name in stores]
    try:
        for store, name, tensor in saved:
            store[name] = tensor.detach().float()
        yield
    finally:
        for store, name, tensor in saved:
            store[name] = tensor


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return UpcastLinear.apply(x, self.weight, self.bias)


def _embedding_forward(self: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    return nn.functional.embedding(ids, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                                   self.scale_grad_by_freq, self.sparse).float()


def _generic(module: nn.Module, stores: list[tuple[dict, str]]) -> Any:
    original = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        with _float_copies(stores):
            return original(*(_to_float(a) for a in args), **{k: _to_float(v) for k, v in kwargs.items()})

    return forward


def _frozen(module: nn.Module) -> bool:
    return not any(p.requires_grad for p in module.parameters(recurse=False))


def upcast_frozen(model: nn.Module) -> int:
    """Make every frozen low-precision module of ``model`` compute in float32 (module docstring); returns
    how many were rewired. Idempotent; the state dict and the stored dtypes do not change."""
    count = 0
    for module in model.modules():
        if getattr(module, MARK, False) or not _frozen(module):
            continue
        stores = _low_tensors(module)
        if not stores:
            continue
        if type(module) is nn.Linear and module.weight.dtype in _LOW:
            module.forward = types.MethodType(_linear_forward, module)
        elif type(module) is nn.Embedding and len(stores) == 1:
            module.forward = types.MethodType(_embedding_forward, module)
        else:
            module.forward = _generic(module, stores)
        setattr(module, MARK, True)
        count += 1
    return count


def is_upcast(module: nn.Module) -> bool:
    """Whether any part of ``module`` computes through :func:`upcast_frozen`'s float32 path."""
    return any(getattr(m, MARK, False) for m in module.modules())
