"""GGUF (llama.cpp) causal LM → a plain HF safetensors dir.

transformers' ``gguf_file=`` loader de-quantises every tensor (Q4_1 → float32) and rebuilds the
tokenizer from the GGUF metadata; both are slow (~20 s for SmolLM2-135M), so we do it once and save a
clean HF dir (no ``quantization_config``: the weights are ordinary float32 after de-quantisation).
Verification: the saved dir reloads and gives the same logits as the GGUF-loaded model on a fixed prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from uniflow_cli.errors import MissingDependencyError, ModelError

CHECK_PROMPT = "The capital of France is"


def convert(gguf_path: Path, out_dir: Path) -> dict[str, Any]:
    """Write ``out_dir`` (config, model.safetensors, tokenizer) and verify it; returns facts."""
    import torch

    try:
        import gguf  # noqa: F401  (transformers needs it for gguf_file=)
    except ImportError as exc:
        raise MissingDependencyError("the gguf package is needed to read the embedded SmolLM2", fix="pip install gguf") from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()
    # The loader marks the model as "quantized with gguf", which forbids saving; the tensors are plain
    # float32 by now, so dropping the marker is exact.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

    ids = tokenizer(CHECK_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(ids).logits
        reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
        got = reloaded(ids).logits
    diff = float((expected - got).abs().max())
    if diff != 0.0:
        raise ModelError(f"GGUF conversion: reloaded model differs by {diff:.2e}", fix="report this bug")
    return {"parameters": sum(p.numel() for p in reloaded.parameters()), "max_abs_diff": diff}
