"""QLoRA: the frozen LLM's linear layers in 4-bit NF4 or 8-bit integers (bitsandbytes), LoRA on top in float32.

:func:`quantize_llm` replaces every frozen ``nn.Linear`` of the LLM — the base layers under PEFT's LoRA
wrappers included — by a bitsandbytes layer holding the same weight quantised, on the device it will
compute on. The LoRA weights, projectors and encoders are untouched (encoders stay in the training
precision: they are small next to the LLM, and the paper's QLoRA setting quantises the LLM). The LM head
is kept unquantised, as QLoRA does: its error would hit every logit.

Why not ``peft.prepare_model_for_kbit_training``: it casts every non-quantised parameter of the model to
float32 — on a bf16 base that re-inflates the embeddings, norms and all encoders. uniflow already does
what else it does: everything frozen but LoRA/projectors, float32 trainable weights, and inputs that
require grad under gradient checkpointing (:func:`uniflow_cli.models.enable_gradient_checkpointing`).

Quantising after LoRA injection is sound because a PEFT LoRA layer only calls ``base_layer(x)`` and adds
its own term: the base layer may be any module. Folding FedEx residuals or FLoRA merges into a quantised
weight is refused (:func:`check_quantize`): the fold must be dense, and re-quantising after each round
would add a fresh quantisation error to every client's base. Use ``--precision bf16`` for those methods.

Platforms: bitsandbytes ≥ 0.46 runs NF4 and int8 on CUDA and (slower, reference kernels) on the CPU;
MPS has no backend. A missing package or an unsupported device is one line with the fix.
"""

from __future__ import annotations

from typing import Any

from uniflow_cli.compute import QUANTIZE, check_quantize_name  # noqa: F401  (QUANTIZE: re-exported)
from uniflow_cli.errors import ConfigError, MissingDependencyError

BITSANDBYTES = "bitsandbytes>=0.46"


def _bitsandbytes() -> Any:
    try:
        import bitsandbytes
    except ImportError as exc:
        raise MissingDependencyError(
            f"--quantize needs the bitsandbytes package, which is not installed ({exc})",
            fix=f"pip install '{BITSANDBYTES}' (or pip install -e '.[quantize]')",
        ) from None
    return bitsandbytes


def check_quantize(scheme: str | None, device: Any, spec: Any = None) -> None:
    """``scheme`` can run on ``device`` for the method ``spec`` (a MethodSpec or None), else one line."""
    if check_quantize_name(scheme) is None:
        return
    if spec is not None and getattr(spec, "folds_history", False):
        raise ConfigError.invalid("quantize", scheme, f"cannot be used with method {spec.name}: it folds dense updates into the base "
                                  "weights, which a quantised base cannot hold", example="no --quantize, with precision bf16")
    device_type = getattr(device, "type", str(device).split(":")[0])
    if device_type not in ("cpu", "cuda"):
        raise ConfigError.invalid("quantize", scheme, f"is not supported on {device}: bitsandbytes runs on CUDA and the CPU",
                                  example="no --quantize")
    _bitsandbytes()


def _targets(llm: Any) -> list[tuple[Any, str, Any]]:
    """``(parent, attribute, linear)`` for every frozen plain ``nn.Linear`` of ``llm`` but the LM head."""
    from torch import nn

    head = llm.get_output_embeddings() if callable(getattr(llm, "get_output_embeddings", None)) else None
    found = []
    for parent in llm.modules():
        for name, child in parent.named_children():
            if type(child) is not nn.Linear or child is head or any(p.requires_grad for p in child.parameters()):
                continue  # LoRA's own A/B (trainable) and the head stay as they are
            found.append((parent, name, child))
    return found


def quantize_llm(model: Any, scheme: str, *, device: Any, compute_dtype: Any) -> int:
    """Quantise the frozen linear layers of ``model``'s LLM in place (module docstring); returns how many.

    ``compute_dtype`` is what NF4 layers dequantise to for their matmul (float32, or bf16/fp16 where those
    kernels are native); int8 layers compute in their input's dtype."""
    import torch

    from uniflow_cli.models.multimodal import unwrap

    check_quantize(scheme, device)
    bnb = _bitsandbytes()
    targets = _targets(unwrap(model).llm)
    for parent, name, linear in targets:
        weight = linear.weight.detach()
        if scheme == "nf4":
            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4", device="meta")
            layer.weight = bnb.nn.Params4bit(weight.to(compute_dtype), requires_grad=False, quant_type="nf4")
        else:
            layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                        has_fp16_weights=False, threshold=6.0, device="meta")
            layer.weight = bnb.nn.Int8Params(weight.to(torch.float16), requires_grad=False, has_fp16_weights=False)
        if linear.bias is not None:
            layer.bias = torch.nn.Parameter(linear.bias.detach().to(compute_dtype), requires_grad=False)
        setattr(parent, name, layer.to(device))  # bitsandbytes quantises on this move, on the target device
        del linear, weight  # the dense weight goes as soon as its quantised copy exists: peak = one layer
    return len(targets)


def quantized_layers(model: Any) -> int:
    """How many bitsandbytes layers ``model`` holds (0 without bitsandbytes loaded)."""
    import sys

    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return 0
    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return sum(isinstance(m, kinds) for m in model.modules())
