"""The ``tiny-random`` preset: the smol architectures (Llama LLM, DINOv2, Whisper encoder) at toy size.

Weights are random but fixed (seeded with :data:`TINY_SEED`, independent of the experiment seed, because
every client must share the same frozen base). The tokenizer is a byte-level BPE without merges (one
token per byte, 256 + 3 special tokens) built in code, so nothing is read from disk or a hub. Building
everything takes well under a second. ``dtype`` builds in float32 (the seeded init is defined there) and
then casts, so a bfloat16 tiny base holds the float32 one's weights, rounded.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

TINY_SEED = 1234

LLM_CONFIG = {
    "vocab_size": 259,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": True,
    "pad_token_id": 256,
    "bos_token_id": 257,
    "eos_token_id": 258,
}
DINOV2_CONFIG = {
    "hidden_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "mlp_ratio": 2,
    "patch_size": 14,
    "image_size": 28,
    "layer_norm_eps": 1e-6,
}
WHISPER_CONFIG = {
    "d_model": 16,
    "encoder_layers": 2,
    "encoder_attention_heads": 2,
    "encoder_ffn_dim": 32,
    "num_mel_bins": 80,
    "max_source_positions": 1500,
}


def fingerprint_payload() -> dict[str, Any]:
    return {"seed": TINY_SEED, "llm": LLM_CONFIG, "dinov2": DINOV2_CONFIG, "whisper": WHISPER_CONFIG, "tokenizer": "bytes-v1"}


def tiny_digest() -> str:
    return hashlib.sha256(json.dumps(fingerprint_payload(), sort_keys=True).encode()).hexdigest()


def build_tokenizer() -> Any:
    """A byte-level tokenizer (every byte is a token) with ``<pad>``, ``<s>``, ``</s>``; no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # GPT-2's printable-byte alphabet: byte-level BPE needs every byte mapped to a visible character.
    visible = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in visible:
            chars.append((b, chr(b)))
        else:
            chars.append((b, chr(256 + extra)))
            extra += 1
    vocab = {ch: b for b, ch in chars}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<pad>", "<s>", "</s>"])  # ids 256, 257, 258 (LLM_CONFIG relies on them)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    ids = (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    if ids != (LLM_CONFIG["pad_token_id"], LLM_CONFIG["bos_token_id"], LLM_CONFIG["eos_token_id"]):
        raise RuntimeError(f"tiny tokenizer special ids {ids} do not match the tiny LLM config")
    return tokenizer


def build_llm(dtype: torch.dtype | None = None) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(LlamaConfig(**LLM_CONFIG)).eval()
    return model if dtype is None else model.to(dtype)


def build_dinov2(dtype: torch.dtype | None = None) -> Any:
    import torch
    from transformers import Dinov2Config, Dinov2Model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED + 1)
        model = Dinov2Model(Dinov2Config(**DINOV2_CONFIG)).eval()
    return model if dtype is None else model.to(dtype)


def build_whisper_encoder(dtype: torch.dtype | None = None) -> Any:
    import torch
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED + 2)
        model = WhisperEncoder(WhisperConfig(**WHISPER_CONFIG)).eval()
    return model if dtype is None else model.to(dtype)
