"""``uniflow export`` on tiny-random models (float32): every exported part loads with the standard Hugging Face
classes (no uniflow code) and computes what uniflow's model with the adapter computes, to 1e-5.

The workspaces here hold rounds published by hand with random non-zero LoRA B, projectors and heads (no
training needed: only the arithmetic of merging and loading is under test). The builders are shared with
tests/test_ask.py.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.cli_runner import run
from tests.workspace_factory import png
from uniflow_cli.adapters import AdapterMeta, read_adapter, write_adapter
from uniflow_cli.errors import OutputExistsError, UsageError
from uniflow_cli.models import ModelSettings, collate
from uniflow_cli.models.workspace_init import init_workspace
from uniflow_cli.settings import LoraSettings
from uniflow_cli.workspace import Workspace

QA = ModelSettings(preset="tiny-random", modalities=["image", "audio"])
QA_LORA = LoraSettings(r=4, lora_alpha=8.0)
LABELS = ["entailment", "neutral", "contradiction"]
CLF = ModelSettings(task="classify", preset="tiny-random", labels=LABELS)
CLF_LORA = LoraSettings(r=4, lora_alpha=8.0, llm_target_modules=[], encoder_target_modules=["query", "value"])
TEXT = {"id": "t", "modality": "text", "question": "What is two plus two?", "answer": ""}
ATOL = 1e-5


# --------------------------------------------------------------------------------------------------
# Builders (also used by tests/test_ask.py)
# --------------------------------------------------------------------------------------------------
def random_tensors(tensors: dict, seed: int, *, drop_b: bool = False) -> dict:
    """Round 0's tensors with every B (and the projectors / head) drawn at random: a model far from the base."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in tensors.items():
        if drop_b and ".lora_B." in key:
            continue
        trained = ".lora_B." in key or ".lora_A." not in key  # B, projectors, a classifier head
        out[key] = torch.randn(value.shape, generator=gen) * 0.2 if trained else value.clone()
    return out


def publish(ws: Workspace, t: int, tensors: dict, *, method: str = "fedit", residual: dict | None = None) -> None:
    g0 = read_adapter(ws.global_dir(0))
    meta = AdapterMeta(role="global", base_fingerprint=g0.meta.base_fingerprint, round=t, method=method, extra=g0.meta.extra)
    write_adapter(ws.global_dir(t), peft_config=g0.peft_config, tensors=tensors, meta=meta, residual=residual)


def client_state(ws: Workspace, client: str, t: int, tensors: dict, method: str) -> None:
    g0 = read_adapter(ws.global_dir(0))
    meta = AdapterMeta(role="client", client_id=client, round=t, method=method, base_fingerprint=g0.meta.base_fingerprint)
    write_adapter(ws.client_state(client), peft_config=g0.peft_config, tensors=tensors, meta=meta, force=True)


def qa_workspace(root: Path) -> Workspace:
    """tiny-random, image + audio encoders; round 1 (fedit) with random B and projectors."""
    init_workspace(root, QA, QA_LORA, seed=0)
    ws = Workspace(root.resolve())
    publish(ws, 1, random_tensors(read_adapter(ws.global_dir(0)).tensors, 1))
    return ws


def classify_workspace(root: Path) -> Workspace:
    """tiny-random BERT with SNLI's labels; round 1 (fedit) with random B and head."""
    init_workspace(root, CLF, CLF_LORA, seed=0)
    ws = Workspace(root.resolve())
    publish(ws, 1, random_tensors(read_adapter(ws.global_dir(0)).tensors, 2))
    return ws


def built(**kwargs):
    """uniflow's own model of a target, built as evaluate builds it (eval mode, float32)."""
    from uniflow_cli.eval_target import model_target
    from uniflow_cli.evaluation import build_model

    model = build_model(model_target(**kwargs)).model
    return model.eval()


def wav(seconds: float = 1.0, freq: float = 440.0) -> bytes:
    import numpy as np

    from uniflow_cli.data.media import encode_wav

    t = np.arange(int(16000 * seconds)) / 16000
    return encode_wav((0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32))


@pytest.fixture(scope="module")
def qa_ws(tmp_path_factory) -> Workspace:
    return qa_workspace(tmp_path_factory.mktemp("qa") / "fed")


@pytest.fixture(scope="module")
def merged(qa_ws, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "merged"
    result = run("export", "-w", qa_ws.root, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["files"]
    return out


@pytest.fixture(scope="module")
def reference(qa_ws):
    """uniflow's model of round 1 (the adapter's LoRA active, not merged)."""
    return built(workspace=qa_ws.root, round=1)


def _copy(ws: Workspace, tmp_path: Path) -> Workspace:
    shutil.copytree(ws.root, tmp_path / "fed")
    return Workspace((tmp_path / "fed").resolve())


def _one_line_error(result, match: str) -> None:
    assert result.exit_code != 0, result.output
    text = " ".join(result.output.split())
    assert text.startswith("error:") and match in text, result.output
    assert "Traceback" not in result.output


def _text_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(collate([TEXT], model, train=False)).logits


def _hf_llm_logits(llm_dir: Path, model) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    batch = collate([TEXT], model, train=False)
    llm = AutoModelForCausalLM.from_pretrained(llm_dir).eval()
    with torch.no_grad():
        return llm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# --------------------------------------------------------------------------------------------------
# merged: each part with the standard classes
# --------------------------------------------------------------------------------------------------
def test_merged_llm_gives_uniflows_logits(merged, reference):
    from transformers import AutoTokenizer

    ours = _text_logits(reference)
    theirs = _hf_llm_logits(merged / "llm", reference)
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
    from uniflow_cli.models.multimodal import unwrap

    text = "Two plus two? Ünïcode ✓"
    assert AutoTokenizer.from_pretrained(merged / "llm")(text).input_ids == unwrap(reference).tokenizer(text).input_ids


def test_the_lora_changed_the_model(merged, qa_ws):
    """The comparison above means something: round 0's model gives other logits."""
    base = built(workspace=qa_ws.root, round=0)
    assert (_hf_llm_logits(merged / "llm", base) - _text_logits(base)).abs().max() > 1e-2


def test_merged_encoders_and_processors_match(merged, reference):
    from PIL import Image
    from transformers import (
        AutoImageProcessor,
        AutoModel,
        WhisperFeatureExtractor,
        WhisperModel,
    )

    from uniflow_cli.models.multimodal import unwrap

    base = unwrap(reference)
    image = png(5)
    ours_pixels = base.collator.encoders["image"].preprocess([image])["pixel_values"]
    processor = AutoImageProcessor.from_pretrained(merged / "encoders" / "image")
    theirs_pixels = processor(Image.open(io.BytesIO(image)).convert("RGB"), return_tensors="pt").pixel_values
    torch.testing.assert_close(theirs_pixels, ours_pixels, atol=1e-5, rtol=0)
    vision = AutoModel.from_pretrained(merged / "encoders" / "image").eval()
    with torch.no_grad():
        torch.testing.assert_close(vision(pixel_values=ours_pixels).last_hidden_state,
                                   base.encoders["image"](pixel_values=ours_pixels).last_hidden_state, atol=ATOL, rtol=0)

    import numpy as np

    from uniflow_cli.data.media import load_audio

    ours_audio = base.collator.encoders["audio"].preprocess([wav()])
    extractor = WhisperFeatureExtractor.from_pretrained(merged / "encoders" / "audio")
    theirs_audio = extractor([load_audio(wav())], sampling_rate=16000, return_tensors="pt").input_features
    torch.testing.assert_close(theirs_audio, ours_audio["input_features"], atol=1e-5, rtol=0)
    encoder = WhisperModel.from_pretrained(merged / "encoders" / "audio").get_encoder().eval()
    with torch.no_grad():
        torch.testing.assert_close(encoder(input_features=theirs_audio).last_hidden_state,
                                   base.encoders["audio"](input_features=theirs_audio).last_hidden_state, atol=ATOL, rtol=0)
    assert np.isfinite(theirs_audio.numpy()).all()


def _standalone_logits(out: Path, question: str, image: bytes) -> torch.Tensor:
    """README.md's recipe with transformers, safetensors and torch only: Eq. 2–4 from the exported parts."""
    from PIL import Image
    from safetensors.torch import load_file
    from transformers import (
        AutoImageProcessor,
        AutoModel,
        AutoModelForCausalLM,
        AutoTokenizer,
    )

    info = json.loads((out / "uniflow_export.json").read_text())["model"]
    prompt, enc = info["prompt"], info["modalities"]["image"]
    tok = AutoTokenizer.from_pretrained(out / info["llm"])
    llm = AutoModelForCausalLM.from_pretrained(out / info["llm"]).eval()
    vision = AutoModel.from_pretrained(out / enc["encoder"]).eval()
    pixels = AutoImageProcessor.from_pretrained(out / enc["encoder"])(Image.open(io.BytesIO(image)).convert("RGB"), return_tensors="pt").pixel_values
    projector = load_file(out / "projectors.safetensors")

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False).input_ids

    with torch.no_grad():
        z = vision(pixel_values=pixels).last_hidden_state  # Eq. 2
        content = z[:, 1:] if enc["has_cls"] else z
        pooled = torch.nn.functional.adaptive_avg_pool1d(content.transpose(1, 2), info["pool_tokens"]).transpose(1, 2)
        x = pooled @ projector[enc["projector"]["weight"]].T + projector[enc["projector"]["bias"]]  # Eq. 3
        head = ids(prompt["prefix"])
        if prompt["bos_token_id"] is not None and (not head or head[0] != prompt["bos_token_id"]):
            head = [prompt["bos_token_id"], *head]
        embed = llm.get_input_embeddings()
        pieces = [embed(torch.tensor(head + ids(prompt["open"]["image"]))), x[0],
                  embed(torch.tensor(ids(prompt["close"]["image"]) + ids(prompt["gap"] + question + prompt["suffix"])))]
        return llm(inputs_embeds=torch.cat(pieces)[None]).logits  # Eq. 4


def test_the_readme_recipe_without_uniflow_reproduces_the_model(merged, reference):
    image = png(7)
    row = {"id": "i", "modality": "image", "question": "What colour is it?", "answer": "", "image": image}
    with torch.no_grad():
        ours = reference(collate([row], reference, train=False)).logits
    torch.testing.assert_close(_standalone_logits(merged, "What colour is it?", image), ours, atol=ATOL, rtol=0)
    readme = (merged / "README.md").read_text()
    assert "Eq. 2" in readme and "Eq. 3" in readme and "Eq. 4" in readme and "projectors.safetensors" in readme


def test_round_trip_through_uniflow_as_a_custom_preset(merged, reference, qa_ws, tmp_path):
    """`uniflow init --preset custom` on the exported dirs + the exported projectors: the same model, also after the
    tree moved (the fingerprint hashes the dirs' contents, not their paths)."""
    moved = tmp_path / "moved"
    shutil.copytree(merged, moved)
    result = run("init", tmp_path / "ws2", "--preset", "custom", "--llm", moved / "llm", "--image-encoder", moved / "encoders" / "image",
                 "--audio-encoder", moved / "encoders" / "audio", "--r", 4, "--lora-alpha", 8, "--json")
    assert result.exit_code == 0, result.output
    g0 = read_adapter(tmp_path / "ws2" / "rounds" / "0" / "global")
    assert g0.meta.base_fingerprint == read_adapter(merged / "uniflow-adapter").meta.base_fingerprint
    row = {"id": "i", "modality": "image", "question": "What colour is it?", "answer": "", "image": png(9)}
    with torch.no_grad():
        ours = reference(collate([row, TEXT], reference, train=False)).logits
        for kwargs in ({"adapter": merged / "uniflow-adapter"},  # the settings it records (the exported dirs)
                       {"adapter": moved / "uniflow-adapter", "workspace": tmp_path / "ws2"}):
            back = built(**kwargs)
            torch.testing.assert_close(back(collate([row, TEXT], back, train=False)).logits, ours, atol=ATOL, rtol=0)
    asked = run("ask", "-w", qa_ws.root, "--json", "--max-new-tokens", 6, "--image", _file(tmp_path, "q.png", row["image"]), "What colour is it?")
    again = run("ask", "--adapter", merged / "uniflow-adapter", "--json", "--max-new-tokens", 6, "--image", tmp_path / "q.png", "What colour is it?")
    assert asked.exit_code == 0 and again.exit_code == 0, asked.output + again.output
    assert json.loads(again.stdout)["answers"] == json.loads(asked.stdout)["answers"]


def _file(tmp_path: Path, name: str, data: bytes) -> Path:
    (tmp_path / name).write_bytes(data)
    return tmp_path / name


def test_dtype_merges_in_float32_and_casts_once(qa_ws, merged, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "bf16"
    result = run("export", "-w", qa_ws.root, "--out", out, "--dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    f32, bf16 = load_file(merged / "llm" / "model.safetensors"), load_file(out / "llm" / "model.safetensors")
    assert set(f32) == set(bf16) and all(v.dtype == torch.bfloat16 for v in bf16.values())
    assert all(torch.equal(f32[k].to(torch.bfloat16), bf16[k]) for k in f32)
    assert json.loads((out / "llm" / "config.json").read_text())["dtype"] == "bfloat16"


def test_same_inputs_give_same_bytes(qa_ws, merged, tmp_path):
    out = tmp_path / "again"
    assert run("export", "-w", qa_ws.root, "--out", out).exit_code == 0
    files = sorted(p.relative_to(merged) for p in merged.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    for rel in files:
        if rel.parts[0] != "uniflow-adapter" or rel.name == "adapter_model.safetensors":  # uniflow.json records a time and the paths
            assert (merged / rel).read_bytes() == (out / rel).read_bytes(), rel


# --------------------------------------------------------------------------------------------------
# peft-llm
# --------------------------------------------------------------------------------------------------
def test_peft_llm_loads_with_peft_and_matches(qa_ws, reference, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "peft"
    result = run("export", "-w", qa_ws.root, "--format", "peft-llm", "--out", out)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((out / "base").resolve()) and config["task_type"] == "CAUSAL_LM"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]), out).eval()
    batch = collate([TEXT], reference, train=False)
    with torch.no_grad():
        theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(theirs, _text_logits(reference), atol=ATOL, rtol=0)
    prompt = json.loads((out / "uniflow_export.json").read_text())["peft"]["prompt"]  # README's recipe for a text question
    tok = AutoTokenizer.from_pretrained(out / "base")
    ids = [prompt["bos_token_id"], *tok(prompt["prefix"], add_special_tokens=False).input_ids,
           *tok(prompt["gap_text_only"] + TEXT["question"] + prompt["suffix"], add_special_tokens=False).input_ids]
    assert ids == batch["input_ids"][0].tolist()
    n_lora = sum(1 for k in read_adapter(qa_ws.global_dir(1)).tensors if k.startswith("base_model.model.llm.") and ".lora_" in k)
    assert sum(1 for name, _ in model.named_parameters() if ".lora_" in name) == n_lora  # every LLM LoRA factor, nothing else


def test_key_and_pattern_renaming():
    from uniflow_cli.export import llm_key, llm_pattern, peft_llm_config

    assert llm_key("base_model.model.llm.model.layers.0.self_attn.q_proj.lora_A.weight") == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert llm_key("base_model.model.encoders.image.encoder.layer.0.attention.attention.query.lora_A.weight") is None
    assert llm_key("base_model.model.projectors.image.weight") is None
    assert llm_pattern("llm.model.layers.0.mlp.up_proj") == "model.layers.0.mlp.up_proj"
    assert llm_pattern("encoders.image.x.query") is None and llm_pattern("q_proj") == "q_proj"
    tensors = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 8),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(8, 4),
               "base_model.model.model.layers.1.mlp.up_proj.lora_A.weight": torch.zeros(2, 8),
               "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight": torch.zeros(16, 2)}
    config = peft_llm_config({"r": 4, "lora_alpha": 8.0, "use_rslora": True, "alpha_pattern": {"llm.model.layers.1.mlp.up_proj": 2.0,
                                                                                               "encoders.image.a.query": 3.0}}, tensors, "/base")
    assert config["target_modules"] == ["q_proj", "up_proj"] and config["rank_pattern"] == {"model.layers.1.mlp.up_proj": 2}
    assert config["alpha_pattern"] == {"model.layers.1.mlp.up_proj": 2.0} and config["use_rslora"] and config["base_model_name_or_path"] == "/base"


# --------------------------------------------------------------------------------------------------
# Methods: FedEx residuals, FedSA's private B, FedDPA's local adapter
# --------------------------------------------------------------------------------------------------
def test_merged_fedex_round_with_residuals_matches(qa_ws, tmp_path):
    from uniflow_cli.models.lora import lora_deltas

    ws = _copy(qa_ws, tmp_path)
    g1 = read_adapter(ws.global_dir(1))
    halves = {k: v / 2 for k, v in lora_deltas(g1.peft_config, random_tensors(g1.tensors, 3)).items()}
    assert any(k.startswith("llm.") for k in halves) and any(k.startswith("encoders.") for k in halves)
    shutil.rmtree(ws.global_dir(1))
    publish(ws, 1, random_tensors(g1.tensors, 4), method="fedex", residual=halves)
    publish(ws, 2, random_tensors(g1.tensors, 5), method="fedex", residual=halves)
    result = run("export", "-w", ws.root, "--out", tmp_path / "fedex", "--json")
    assert result.exit_code == 0, result.output
    assert any("FedEx residual" in n for n in json.loads(result.stdout)["notices"])
    ours = built(workspace=ws.root, round=2)
    torch.testing.assert_close(_hf_llm_logits(tmp_path / "fedex" / "llm", ours), _text_logits(ours), atol=ATOL, rtol=0)
    without = built(adapter=ws.global_dir(2))  # explicit: no earlier residuals, its own still added: another model
    assert (_text_logits(without) - _text_logits(ours)).abs().max() > 1e-3
    refused = run("export", "-w", ws.root, "--format", "peft-llm", "--out", tmp_path / "p")
    _one_line_error(refused, "--format peft-llm cannot be exact here: FedEx residuals changed the base weights")
    assert "use --format merged" in " ".join(refused.output.split()) and not (tmp_path / "p").exists()


def test_fedsa_exports_a_clients_model_and_refuses_the_global_alone(qa_ws, tmp_path):
    ws = _copy(qa_ws, tmp_path)
    trained = read_adapter(ws.global_dir(1)).tensors
    shutil.rmtree(ws.global_dir(1))
    publish(ws, 1, {k: v for k, v in trained.items() if ".lora_B." not in k}, method="fedsa")
    client_state(ws, "0", 1, {k: v for k, v in trained.items() if ".lora_B." in k}, "fedsa")
    refused = run("export", "-w", ws.root, "--out", tmp_path / "g")
    _one_line_error(refused, "round 1 is a fedsa global: it carries A but no B")
    assert "--round 1 --client K" in " ".join(refused.output.split()) and not (tmp_path / "g").exists()
    result = run("export", "-w", ws.root, "--client", 0, "--out", tmp_path / "c0")
    assert result.exit_code == 0, result.output
    ours = built(workspace=ws.root, round=1, client="0")
    torch.testing.assert_close(_hf_llm_logits(tmp_path / "c0" / "llm", ours), _text_logits(ours), atol=ATOL, rtol=0)
    # A + the client's own B is round 1's fedit model: the personalised export is that model.
    torch.testing.assert_close(_text_logits(ours), _text_logits(built(workspace=qa_ws.root, round=1)), atol=ATOL, rtol=0)


def test_feddpa_merges_the_global_and_the_local_adapter(qa_ws, tmp_path):
    ws = _copy(qa_ws, tmp_path)
    g1 = read_adapter(ws.global_dir(1))
    shutil.rmtree(ws.global_dir(1))
    publish(ws, 1, g1.tensors, method="feddpa")
    local = {k: v for k, v in random_tensors(g1.tensors, 6).items() if ".lora_" in k}
    client_state(ws, "0", 1, local, "feddpa")
    result = run("export", "-w", ws.root, "--client", 0, "--out", tmp_path / "dpa")
    assert result.exit_code == 0, result.output
    ours = built(workspace=ws.root, round=1, client="0")
    torch.testing.assert_close(_hf_llm_logits(tmp_path / "dpa" / "llm", ours), _text_logits(ours), atol=ATOL, rtol=0)
    assert (_text_logits(ours) - _text_logits(built(workspace=ws.root, round=1))).abs().max() > 1e-3  # the local adapter counts
    refused = run("export", "-w", ws.root, "--client", 0, "--format", "peft-llm", "--out", tmp_path / "p")
    _one_line_error(refused, "FedDPA's local adapter is a second LoRA")


def test_vera_merges_and_loads_back_but_has_no_peft_llm_form(tmp_path):
    init_workspace(tmp_path / "vera", ModelSettings(preset="tiny-random", modalities=["image"]), LoraSettings(r=8, adapter="vera"), seed=0)
    ws = Workspace((tmp_path / "vera").resolve())
    gen = torch.Generator().manual_seed(8)
    publish(ws, 1, {k: torch.randn(v.shape, generator=gen) * 0.3 if "vera_lambda" in k or "projectors" in k else v
                    for k, v in read_adapter(ws.global_dir(0)).tensors.items()})
    assert run("export", "-w", ws.root, "--out", tmp_path / "out").exit_code == 0
    ours = built(workspace=ws.root, round=1)
    assert (_text_logits(ours) - _text_logits(built(workspace=ws.root, round=0))).abs().max() > 1e-2
    torch.testing.assert_close(_hf_llm_logits(tmp_path / "out" / "llm", ours), _text_logits(ours), atol=ATOL, rtol=0)
    back = built(adapter=tmp_path / "out" / "uniflow-adapter")
    row = {"id": "i", "modality": "image", "question": "What?", "answer": "", "image": png(3)}
    with torch.no_grad():
        torch.testing.assert_close(back(collate([row], back, train=False)).logits, ours(collate([row], ours, train=False)).logits, atol=ATOL, rtol=0)
    _one_line_error(run("export", "-w", ws.root, "--format", "peft-llm", "--out", tmp_path / "p"), "a VeRA adapter's projections are shared")


# --------------------------------------------------------------------------------------------------
# classify
# --------------------------------------------------------------------------------------------------
def test_classify_export_is_a_sequence_classifier_and_loads_back(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    ws = classify_workspace(tmp_path / "nlu")
    out = tmp_path / "clf"
    result = run("export", "-w", ws.root, "--out", out)
    assert result.exit_code == 0, result.output
    net = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert net.config.id2label == dict(enumerate(LABELS))
    ours = built(workspace=ws.root, round=1)
    row = {"id": "p", "modality": "text", "question": "a man plays a guitar", "text_pair": "a person makes music", "answer": ""}
    batch = collate([row], ours, train=False)
    enc = AutoTokenizer.from_pretrained(out)(row["question"], row["text_pair"], return_tensors="pt")
    assert enc["input_ids"].tolist() == batch["input_ids"].tolist()
    with torch.no_grad():
        expected = ours(batch).logits
        torch.testing.assert_close(net(**enc).logits, expected, atol=ATOL, rtol=0)
    init = run("init", tmp_path / "back", "--task", "classify", "--preset", "custom", "--encoder", out, "--labels", ",".join(LABELS), "--r", 4)
    assert init.exit_code == 0, init.output
    back = built(workspace=tmp_path / "back", round=0)
    with torch.no_grad():
        torch.testing.assert_close(back(collate([row], back, train=False)).logits, expected, atol=ATOL, rtol=0)
    refused = run("export", "-w", ws.root, "--format", "peft-llm", "--out", tmp_path / "p")
    _one_line_error(refused, "a classify model has no LLM")


# --------------------------------------------------------------------------------------------------
# Bad inputs: one line, exit != 0, nothing written
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, match", [
    (["--round", 7], "round 7 is not published"),
    (["--format", "onnx"], "--format 'onnx' is not one of merged | peft-llm"),
    (["--dtype", "int8"], "--dtype 'int8' is not one of float32 | bfloat16 | float16"),
    (["--adapter", "nowhere", "--round", 1], "--adapter names the model itself; it cannot be combined with --round or --client"),
    (["--preset", "tiny-random"], "--preset only applies with --adapter"),
    (["--client", 0], "only fedsa, feddpa keep a client-private part"),
])
def test_bad_requests(qa_ws, tmp_path, args, match):
    result = run("export", "-w", qa_ws.root, "--out", tmp_path / "x", *args)
    _one_line_error(result, match)
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*"))


def test_existing_output_needs_force_and_force_replaces_only_an_export(qa_ws, merged, tmp_path):
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    _one_line_error(run("export", "-w", qa_ws.root, "--out", keep), "output")
    refused = run("export", "-w", qa_ws.root, "--out", keep, "--force")
    _one_line_error(refused, "is not a uniflow export; refusing to replace it, even with --force")
    assert (keep / "notes.txt").read_text() == "mine"
    earlier = tmp_path / "earlier"
    shutil.copytree(merged, earlier)
    _one_line_error(run("export", "-w", qa_ws.root, "--out", earlier), "already exists")
    assert run("export", "-w", qa_ws.root, "--out", earlier, "--force", "--format", "peft-llm").exit_code == 0
    assert json.loads((earlier / "uniflow_export.json").read_text())["format"] == "peft-llm" and not (earlier / "llm").exists()


def test_a_failure_while_writing_leaves_nothing(qa_ws, tmp_path, monkeypatch):
    from uniflow_cli import export

    def broken(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "save_whisper_encoder", broken)
    with pytest.raises(OSError):
        export.run_export(export.ExportRequest(out=tmp_path / "x", workspace=qa_ws.root))
    assert list(tmp_path.iterdir()) == []


def test_library_terms(qa_ws, tmp_path):
    from uniflow_cli.errors import ConfigError
    from uniflow_cli.export import ExportRequest, run_export

    with pytest.raises(ConfigError, match='format="zip" is not one of merged'):
        ExportRequest(out=tmp_path / "x", format="zip")
    (tmp_path / "x").mkdir()
    with pytest.raises(OutputExistsError, match="already exists"):
        run_export(ExportRequest(out=tmp_path / "x", workspace=qa_ws.root))
    with pytest.raises(UsageError, match="round 1 is a fedit global"):
        run_export(ExportRequest(out=tmp_path / "y", workspace=qa_ws.root, client="0"))


@pytest.mark.slow
def test_smol_merged_export_with_its_chat_template(tmp_path):
    """The embedded SmolLM2 + DINOv2 + Whisper: real architectures, a real chat template in the prompt record.
    Merging changes the float rounding at this size (logits ~40): compared relative to the logits' scale."""
    init_workspace(tmp_path / "fed", ModelSettings(preset="smol", modalities=["image", "audio"]), QA_LORA, seed=0)
    ws = Workspace((tmp_path / "fed").resolve())
    publish(ws, 1, {k: v * 0.05 if ".lora_B." in k else v for k, v in random_tensors(read_adapter(ws.global_dir(0)).tensors, 1).items()})
    result = run("export", "-w", ws.root, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    ours = built(workspace=ws.root, round=1)
    row = {"id": "i", "modality": "image", "question": "What colour is it?", "answer": "", "image": png(7)}
    with torch.no_grad():
        expected = ours(collate([row], ours, train=False)).logits
    scale = float(expected.abs().max())
    assert "<|im_start|>" in json.loads((tmp_path / "out" / "uniflow_export.json").read_text())["model"]["prompt"]["prefix"]
    torch.testing.assert_close(_standalone_logits(tmp_path / "out", "What colour is it?", png(7)), expected, atol=1e-5 * scale, rtol=0)
    torch.testing.assert_close(_hf_llm_logits(tmp_path / "out" / "llm", ours), _text_logits(ours), atol=1e-5 * scale, rtol=0)
