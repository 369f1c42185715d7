"""The models side of compute (issue 14): answer-only LM head, a low-precision frozen base, gradient checkpointing.

All on the tiny-random preset (float32 unless a test says otherwise), a few seconds in total.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch

from tests.test_models import SAMPLES, TINY, _image, _wav
from uniflow_cli.adapters import AdapterMeta, read_adapter, write_adapter
from uniflow_cli.models import (
    ModelSettings,
    adapter_tensors,
    collate,
    enable_gradient_checkpointing,
    load_adapter_tensors,
    load_model,
    model_from_adapter,
    peft_config_dict,
    set_trainable_stage,
    unwrap,
)
from uniflow_cli.models.lora import add_to_base
from uniflow_cli.models.multimodal import IGNORE_INDEX, AnswerOutput, answer_head
from uniflow_cli.settings import LoraSettings

BF16 = torch.bfloat16
# Two rows per modality, answers of different lengths: right padding inside every modality group.
BATCH_SAMPLES = [
    *SAMPLES,
    {"id": "i1", "modality": "image", "question": "Colour?", "answer": "a rather long answer here", "image": _image(1), "audio": None},
    {"id": "t1", "modality": "text", "question": "A much longer question than the others, padded less", "answer": "no", "image": None, "audio": None},
    {"id": "a1", "modality": "audio", "question": "Who speaks?", "answer": "me", "image": None, "audio": {"bytes": _wav(0.7, 220.0), "path": None}},
]


def _model(dtype: torch.dtype | None = None, seed: int = 0) -> Any:
    """A tiny model whose LoRA B is non-zero (same values in any dtype), so every LoRA weight gets a gradient."""
    model = load_model(TINY, LoraSettings(r=4), seed=seed, dtype=dtype)
    tensors = adapter_tensors(model)
    gen = torch.Generator().manual_seed(7)
    perturbed = {k: (0.05 * torch.randn(v.shape, generator=gen) if ".lora_B." in k else v) for k, v in tensors.items()}
    load_adapter_tensors(model, perturbed)
    return model


def _grads(model: Any, batch: dict[str, Any], *, full_logits: bool = True, autocast: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    ctx = torch.autocast("cpu", dtype=BF16) if autocast else contextlib.nullcontext()
    with ctx:
        loss = model(batch, full_logits=full_logits).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def batch(model):
    return collate(BATCH_SAMPLES, model)


# ---------------------------------------------------------------------------------------------
# Answer-only LM head (item 5)
# ---------------------------------------------------------------------------------------------
def test_answer_only_loss_and_logits_equal_the_full_path(model, batch):
    assert batch["attention_mask"].sum(1).unique().numel() > 1  # really padded
    assert {"image", "audio"} <= set(batch) and "text" in batch["modalities"]
    model.eval()
    with torch.no_grad():
        full = model(batch)
        answer = model(batch, full_logits=False)  # through PeftModel.forward
    assert isinstance(answer, AnswerOutput) and not isinstance(full, AnswerOutput)
    assert abs(full.loss.item() - answer.loss.item()) <= 1e-6
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    assert answer.logits.shape == (int(keep.sum()), full.logits.shape[-1])
    torch.testing.assert_close(answer.logits, full.logits[:, :-1][keep], rtol=0, atol=1e-5)
    assert torch.equal(answer.labels, targets[keep]) and torch.equal(answer.rows, keep.nonzero()[:, 0])
    assert answer.loss.dtype == torch.float32


def test_answer_only_gradients_equal_the_full_path(model, batch):
    model.train()
    set_trainable_stage(model, "both")
    loss_full, g_full = _grads(model, batch)
    loss_answer, g_answer = _grads(model, batch, full_logits=False)
    model.eval()
    assert abs(loss_full.item() - loss_answer.item()) <= 1e-6
    assert g_full.keys() == g_answer.keys()
    lora = [n for n in g_full if ".lora_" in n]
    assert any(".lora_A." in n for n in lora) and any("encoders." in n for n in lora) and any("llm." in n for n in lora)
    assert all(g_full[n].abs().sum() > 0 for n in lora)  # every LoRA weight is really compared
    for name in g_full:
        torch.testing.assert_close(g_answer[name], g_full[name], rtol=0, atol=1e-5, msg=name)


def test_rows_without_answer_tokens_behave_like_the_full_path(model, batch):
    """The collator always keeps an answer token (it cuts the question first), so rows without one are made
    by hand: a row without answer tokens adds nothing to either loss; a batch with none gives NaN in both
    paths (HF's mean over no tokens, 0/0) and no gradient anywhere (all zeros, in both)."""
    model.train()
    one_empty = {**batch, "labels": batch["labels"].clone()}
    one_empty["labels"][2] = IGNORE_INDEX
    loss_full, g_full = _grads(model, one_empty)
    loss_answer, g_answer = _grads(model, one_empty, full_logits=False)
    assert abs(loss_full.item() - loss_answer.item()) <= 1e-6
    for name in g_full:
        torch.testing.assert_close(g_answer[name], g_full[name], rtol=0, atol=1e-5, msg=name)

    none_left = {**batch, "labels": torch.full_like(batch["labels"], IGNORE_INDEX)}
    loss_full, g_full = _grads(model, none_left)
    loss_answer, g_answer = _grads(model, none_left, full_logits=False)
    model.eval()
    assert torch.isnan(loss_full) and torch.isnan(loss_answer)
    assert all(not g.any() for g in g_full.values()) and all(not g.any() for g in g_answer.values())
    with torch.no_grad():
        assert model(none_left, full_logits=False).logits.shape == (0, unwrap(model).llm.config.vocab_size)


def test_answer_only_falls_back_to_the_full_path(model, batch):
    model.eval()
    prompts = collate(BATCH_SAMPLES[:2], model, train=False)
    with torch.no_grad():
        out = model(prompts, full_logits=False)  # no labels: nothing to select, the LLM's own output
    assert out.loss is None and out.logits.shape[:2] == prompts["input_ids"].shape

    llm = unwrap(model).llm
    assert answer_head(llm) is not None
    for field, value in (("final_logit_softcapping", 30.0), ("logit_scale", 0.0625), ("logits_scaling", 8.0)):
        setattr(llm.config, field, value)
        try:
            assert answer_head(llm) is None, field  # its own forward transforms the logits: keep it
            with torch.no_grad():
                fell_back = model(batch, full_logits=False)
            assert not isinstance(fell_back, AnswerOutput) and fell_back.logits.dim() == 3
        finally:
            delattr(llm.config, field)
    llm.config.logit_scale = 1.0  # a scale of one transforms nothing
    try:
        assert answer_head(llm) is not None
    finally:
        delattr(llm.config, "logit_scale")
    assert answer_head(torch.nn.Linear(2, 2)) is None  # no get_decoder / get_output_embeddings


# ---------------------------------------------------------------------------------------------
# Frozen base in bfloat16 (item 2)
# ---------------------------------------------------------------------------------------------
def _frozen(name: str) -> bool:
    return ".lora_" not in name and "projectors." not in name


def test_bf16_base_keeps_lora_and_projectors_float32_with_the_same_initial_bytes():
    m32 = load_model(TINY, LoraSettings(r=4), seed=3)
    m16 = load_model(TINY, LoraSettings(r=4), seed=3, dtype=BF16)
    params = dict(m16.named_parameters())
    frozen = {n: p.dtype for n, p in params.items() if _frozen(n)}
    assert any("llm." in n for n in frozen) and any("encoders.image." in n for n in frozen) and any("encoders.audio." in n for n in frozen)
    assert set(frozen.values()) == {BF16}
    assert {p.dtype for n, p in params.items() if not _frozen(n)} == {torch.float32}  # LoRA A/B, projectors (both copies)
    assert unwrap(m16).base_dtype == BF16 and unwrap(m32).base_dtype == torch.float32
    a32, a16 = adapter_tensors(m32), adapter_tensors(m16)
    assert a32.keys() == a16.keys() and all(torch.equal(a32[k], a16[k]) for k in a32)  # bit-identical, not just close
    assert unwrap(m16).fingerprint == unwrap(m32).fingerprint  # fp32 and bf16 clients federate


def test_bf16_adapter_round_trip_is_exact(tmp_path):
    """An adapter loaded into a bfloat16 base lands in float32 LoRA weights unchanged (no bf16 detour)."""
    source = _model()
    tensors = adapter_tensors(source)
    path = tmp_path / "adapter"
    meta = AdapterMeta(role="global", base_fingerprint=unwrap(source).fingerprint, round=0)
    write_adapter(path, peft_config=peft_config_dict(source), tensors=tensors, meta=meta)
    loaded = model_from_adapter(TINY, read_adapter(path), LoraSettings(r=4), dtype=BF16)
    assert unwrap(loaded).base_dtype == BF16
    back = adapter_tensors(loaded)
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)


@pytest.mark.parametrize("stage", ["encoder", "llm", "both"])
def test_bf16_step_under_autocast_is_finite_and_changes_the_same_tensors(stage):
    m32, m16 = _model(), _model(BF16)
    batch = collate(BATCH_SAMPLES, m32)
    results = {}
    for name, m, autocast in (("fp32", m32, False), ("bf16", m16, True)):
        m.train()
        set_trainable_stage(m, stage)
        loss, grads = _grads(m, batch, autocast=autocast)
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values()), name
        assert all(g.dtype == torch.float32 for g in grads.values())  # optimizer state stays float32
        results[name] = (loss, {n for n, g in grads.items() if g.abs().sum() > 0})
    assert results["fp32"][1] and results["fp32"][1] == results["bf16"][1]
    assert abs(results["fp32"][0].item() - results["bf16"][0].item()) < 0.03 * abs(results["fp32"][0].item())


def test_bf16_base_runs_without_autocast_too():
    """Encoder inputs are cast to the encoder's dtype and the projector's input to float32 in encode()."""
    m16 = _model(BF16)
    m16.train()
    batch = collate(BATCH_SAMPLES, m16)
    for full_logits in (True, False):
        loss, grads = _grads(m16, batch, full_logits=full_logits)
        assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads.values())
        assert any("encoders.image." in n for n in grads) and any("encoders.audio." in n for n in grads)


def test_collate_inside_autocast_gives_float32_features(model):
    """Training code may collate inside its autocast block: Whisper's log-mel (torch matmuls) stays float32."""
    plain = collate(BATCH_SAMPLES, model)
    with torch.autocast("cpu", dtype=BF16):
        inside = collate(BATCH_SAMPLES, model)
    for modality in ("image", "audio"):
        for key, value in plain[modality].items():
            assert value.dtype == inside[modality][key].dtype and torch.equal(value, inside[modality][key]), (modality, key)


def test_custom_dirs_load_straight_into_bf16(tmp_path):
    from transformers import WhisperConfig, WhisperModel

    from uniflow_cli.models import tiny

    llm_dir, img_dir, aud_dir = tmp_path / "llm", tmp_path / "img", tmp_path / "aud"
    tiny.build_llm().save_pretrained(llm_dir)
    tiny.build_tokenizer().save_pretrained(llm_dir)
    tiny.build_dinov2().save_pretrained(img_dir)
    WhisperModel(WhisperConfig(**tiny.WHISPER_CONFIG, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=32, vocab_size=64,
                               pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=1)).save_pretrained(aud_dir)
    settings = ModelSettings(preset="custom", llm=str(llm_dir), image_encoder=str(img_dir), audio_encoder=str(aud_dir), audio_max_seconds=2.0)
    m32 = load_model(settings, LoraSettings(r=2), seed=0)
    m16 = load_model(settings, LoraSettings(r=2), seed=0, dtype=BF16)
    assert {p.dtype for n, p in m16.named_parameters() if _frozen(n)} == {BF16}
    assert unwrap(m16).encoders["audio"].embed_positions.weight.dtype == BF16  # the cut Whisper table too
    assert unwrap(m16).fingerprint == unwrap(m32).fingerprint
    a32, a16 = adapter_tensors(m32), adapter_tensors(m16)
    assert all(torch.equal(a32[k], a16[k]) for k in a32)
    with torch.autocast("cpu", dtype=BF16):
        assert torch.isfinite(m16(collate(SAMPLES, m16)).loss)


def test_residual_on_a_bf16_base_is_rounded_once():
    m16 = load_model(TINY, LoraSettings(r=2), seed=0, dtype=BF16)
    key = "llm.model.layers.0.self_attn.q_proj.weight"
    weight = unwrap(m16).llm.model.layers[0].self_attn.q_proj.base_layer.weight
    before = weight.detach().clone()
    delta = 1e-3 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
    assert add_to_base(m16, {key: delta}) == 1
    assert weight.dtype == BF16
    assert torch.equal(weight, (before.float() + delta).to(BF16))
    assert not torch.equal(weight, before + delta.to(BF16))  # the old double rounding differs somewhere


# ---------------------------------------------------------------------------------------------
# Gradient checkpointing (item 4)
# ---------------------------------------------------------------------------------------------
def _count_calls(model: Any) -> dict[str, list[int]]:
    """Forward calls of one attention block per part: checkpointing runs each again in the backward pass."""
    base = unwrap(model)
    blocks = {
        "llm": base.llm.model.layers[0].self_attn,
        "image": base.encoders["image"].encoder.layer[0].attention,
        "audio": base.encoders["audio"].layers[0].self_attn,
    }
    calls = {part: [0] for part in blocks}
    for part, block in blocks.items():
        block.register_forward_hook(lambda *_, c=calls[part]: c.__setitem__(0, c[0] + 1))
    return calls


@pytest.mark.parametrize("stage", ["encoder", "llm"])
def test_gradient_checkpointing_gives_the_plain_gradients(stage):
    plain, checkpointed = _model(), _model()
    enable_gradient_checkpointing(checkpointed)
    batch = collate(BATCH_SAMPLES, plain)
    results = {}
    for name, m in (("plain", plain), ("checkpointed", checkpointed)):
        calls = _count_calls(m)
        m.train()
        set_trainable_stage(m, stage)
        results[name] = _grads(m, batch, full_logits=False)
        results[name + " calls"] = {part: c[0] for part, c in calls.items()}
    assert results["plain calls"] == {"llm": 1, "image": 1, "audio": 1}
    # Stage I recomputes the encoders and the LLM (the gradient flows back through it to the projectors);
    # stage II only the LLM: nothing in the frozen encoders needs a gradient, so no backward runs there.
    expected = {"llm": 2, "image": 2, "audio": 2} if stage == "encoder" else {"llm": 2, "image": 1, "audio": 1}
    assert results["checkpointed calls"] == expected
    (loss_p, g_p), (loss_c, g_c) = results["plain"], results["checkpointed"]
    assert abs(loss_p.item() - loss_c.item()) <= 1e-6
    part = "encoders." if stage == "encoder" else "llm."
    assert g_p.keys() == g_c.keys() and any(part in n and ".lora_" in n for n in g_p)
    assert all(g.abs().sum() > 0 for n, g in g_c.items() if ".lora_" in n)  # gradients really arrive
    for name in g_p:
        torch.testing.assert_close(g_c[name], g_p[name], rtol=0, atol=1e-5, msg=name)


def _checkpointing(module: Any) -> bool:
    # transformers 5 renamed is_gradient_checkpointing (now a deprecated alias) to is_activation_checkpointing
    return module.is_activation_checkpointing if hasattr(type(module), "is_activation_checkpointing") else module.is_gradient_checkpointing


def test_gradient_checkpointing_is_off_in_eval_and_skips_unsupported_encoders():
    m = _model()
    base = unwrap(m)
    base.encoders["image"].supports_gradient_checkpointing = False  # as a custom family without HF's hooks
    enable_gradient_checkpointing(m)
    assert _checkpointing(base.llm) and _checkpointing(base.encoders["audio"]) and not _checkpointing(base.encoders["image"])
    calls = _count_calls(m)
    m.eval()
    with torch.no_grad():
        m(collate(BATCH_SAMPLES, m))
    assert {part: c[0] for part, c in calls.items()} == {"llm": 1, "image": 1, "audio": 1}


def test_answer_only_token_counts_equal_the_full_logits_counts() -> None:
    """Evaluation's teacher-forced accuracy from the answer-only head equals metrics.token_accuracy on the full logits."""
    from uniflow_cli.metrics import answer_token_counts, token_accuracy

    model = _model(None)
    batch = collate(BATCH_SAMPLES, model)
    with torch.no_grad():
        full = model(batch).logits
        answer = model(batch, full_logits=False)
    expected = [token_accuracy(full[i : i + 1], batch["labels"][i : i + 1]) for i in range(len(BATCH_SAMPLES))]
    counts = answer_token_counts(answer.logits, answer.labels, answer.rows, len(BATCH_SAMPLES))
    assert counts == expected and sum(t for _c, t in counts) > 0
