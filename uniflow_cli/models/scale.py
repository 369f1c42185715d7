"""The scale presets ``random-1b`` and ``random-7b``: real architectures at real size, random weights.

For measuring memory and speed at the sizes users bring (no such weights ship in any package, and the
weights do not matter for s/step or peak memory):

* ``random-1b``: Llama-3.2-1B's LLM shapes (16 × 2048, GQA 32/8 heads, 128k vocabulary, tied head) +
  DINOv2-base (ViT-B/14) + Whisper-base's encoder;
* ``random-7b``: Llama-2-7B / Vicuna-7B (the paper's LLM: 32 × 4096, 32k vocabulary) + DINOv2-large
  (ViT-L/14) + Whisper-small's encoder.

Every module is created on the meta device (no memory) and materialised straight in the requested dtype,
so a bf16 7B base costs its 13.5 GB once, never a 27 GB float32 copy. Weights are drawn from a generator
seeded with :data:`SCALE_SEED` in parameter order (matrices N(0, 0.02²), vectors of norms 1, biases 0):
deterministic and independent of transformers' own init. RoPE frequencies are recomputed in float32.
The tokenizer is the tiny preset's byte-level one (its ids fit any vocabulary).
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

SCALE_SEED = 4321
_SPECIAL = {"pad_token_id": 256, "bos_token_id": 257, "eos_token_id": 258}  # the byte tokenizer's ids

LLMS: dict[str, dict[str, Any]] = {
    "random-1b": {  # Llama-3.2-1B
        "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "max_position_embeddings": 4096,
        "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True, **_SPECIAL,
    },
    "random-7b": {  # Llama-2-7B, the architecture of Vicuna-7B
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, **_SPECIAL,
    },
}
DINOV2: dict[str, dict[str, Any]] = {
    "random-1b": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "patch_size": 14, "image_size": 518},
    "random-7b": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "patch_size": 14, "image_size": 518},
}
WHISPER: dict[str, dict[str, Any]] = {
    "random-1b": {"d_model": 512, "encoder_layers": 6, "encoder_attention_heads": 8, "encoder_ffn_dim": 2048, "num_mel_bins": 80},
    "random-7b": {"d_model": 768, "encoder_layers": 12, "encoder_attention_heads": 12, "encoder_ffn_dim": 3072, "num_mel_bins": 80},
}
SCALE_PRESETS = tuple(LLMS)


def fingerprint_payload(preset: str) -> dict[str, Any]:
    return {"seed": SCALE_SEED, "llm": LLMS[preset], "dinov2": DINOV2[preset], "whisper": WHISPER[preset], "tokenizer": "bytes-v1", "init": "v1"}


def scale_digest(preset: str) -> str:
    return hashlib.sha256(json.dumps(fingerprint_payload(preset), sort_keys=True).encode()).hexdigest()


def materialise(build: Any, dtype: torch.dtype | None, seed: int) -> Any:
    """``build()`` on the meta device, then real tensors in ``dtype`` filled by the seeded init (module docstring)."""
    import torch

    dtype = dtype or torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # meta tensors take it, so to_empty allocates the final dtype directly
    try:
        with torch.device("meta"):
            model = build()
    finally:
        torch.set_default_dtype(previous)
    model.to_empty(device="cpu")
    if callable(getattr(model, "tie_weights", None)):
        model.tie_weights()  # to_empty gives each module its own tensor: re-tie a shared embedding / LM head
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif param.ndim == 1:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
        for module in model.modules():
            if hasattr(module, "inv_freq") and hasattr(module, "config"):  # RoPE: recompute, never random
                fresh = type(module)(module.config)
                for buffer_name, buffer in fresh.named_buffers(recurse=False):
                    setattr(module, buffer_name, buffer.float())
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"tensors left on the meta device: {leftover[:3]}")
    return model.eval()


def build_llm(preset: str, dtype: torch.dtype | None = None) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**LLMS[preset])
    return materialise(lambda: LlamaForCausalLM(config), dtype, SCALE_SEED)


def build_dinov2(preset: str, dtype: torch.dtype | None = None) -> Any:
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(**DINOV2[preset])
    return materialise(lambda: Dinov2Model(config), dtype, SCALE_SEED + 1)


def build_whisper_encoder(preset: str, dtype: torch.dtype | None = None) -> Any:
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    config = WhisperConfig(**WHISPER[preset])
    return materialise(lambda: WhisperEncoder(config), dtype, SCALE_SEED + 2)
