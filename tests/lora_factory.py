"""Builders of small synthetic LoRA adapters for the aggregation tests (float64 where exactness matters)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from uniflow_cli.adapters import AdapterMeta, write_adapter

PREFIX = "base_model.model."
MODULES = {"model.layers.0.self_attn.q_proj": (6, 8), "model.layers.0.self_attn.v_proj": (4, 8)}


def peft_config(r: int = 2, lora_alpha: float = 4.0, *, use_rslora: bool = False, modules=None, **extra: Any) -> dict[str, Any]:
    names = sorted({name.rsplit(".", 1)[-1] for name in (modules or MODULES)})
    return {"peft_type": "LORA", "r": r, "lora_alpha": lora_alpha, "use_rslora": use_rslora, "target_modules": names,
            "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "modules_to_save": None, **extra}


def lora_tensors(seed: int, r: int = 2, *, modules=None, dtype=torch.float64, A: dict | None = None, extra: dict | None = None) -> dict[str, torch.Tensor]:
    """Random A and B (both non-zero, unlike PEFT's init) for each module; ``A`` overrides the A's."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, (d_out, d_in) in (modules or MODULES).items():
        key = PREFIX + name
        out[key + ".lora_A.weight"] = (A[name] if A and name in A else torch.randn(r, d_in, generator=gen, dtype=torch.float64)).to(dtype)
        out[key + ".lora_B.weight"] = torch.randn(d_out, r, generator=gen, dtype=torch.float64).to(dtype)
    for key, value in (extra or {}).items():
        out[key] = value.to(dtype)
    return out


def write_client(root: Path, client_id: str | int, tensors: dict, config: dict | None = None, *, num_examples: int = 10,
                 fingerprint: str | None = "base-abc", round_: int | None = 1, modalities=("image",)) -> Path:
    meta = AdapterMeta(role="client", client_id=str(client_id), num_examples=num_examples, base_fingerprint=fingerprint,
                       round=round_, modalities=list(modalities))
    return write_adapter(Path(root) / str(client_id), peft_config=config or peft_config(), tensors=tensors, meta=meta)


def write_plain_peft(root: Path, name: str, tensors: dict, config: dict | None = None) -> Path:
    """A plain PEFT adapter directory (no uniflow.json), written like PEFT's save_pretrained."""
    from safetensors.torch import save_file

    path = Path(root) / name
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps(config or peft_config()))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    return path


def delta(tensors: dict, config: dict, module: str) -> torch.Tensor:
    """The adapter's effective ΔW = s·B·A for one module (dense; small shapes only)."""
    key = PREFIX + module
    A = tensors[key + ".lora_A.weight"].to(torch.float64)
    B = tensors[key + ".lora_B.weight"].to(torch.float64)
    r = A.shape[0]
    s = config["lora_alpha"] / (r ** 0.5 if config.get("use_rslora") else r)
    return s * B @ A
