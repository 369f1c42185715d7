"""Task ``classify`` (the paper's NLU setting) on a tiny random BERT: settings, the model, metrics, a federated
round trip through the CLI, the shared head, rsLoRA, and the bad inputs (one line, exit != 0, nothing written)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from uniflow_cli.adapters import read_adapter
from uniflow_cli.cli.app import app
from uniflow_cli.errors import ConfigError, DataError, IncompatibleAdaptersError
from uniflow_cli.metrics import (
    accuracy_from_confusion,
    classification_summary,
    confusion_matrix,
    macro_f1_from_confusion,
    per_class_scores,
)
from uniflow_cli.models.settings import ModelSettings
from uniflow_cli.models.task import parse_labels
from uniflow_cli.settings import LoraSettings

runner = CliRunner()
LABELS = ["entailment", "neutral", "contradiction"]
HEAD = "base_model.model.encoder.classifier.weight"


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def tiny(labels=LABELS, **kw) -> ModelSettings:
    return ModelSettings(task="classify", preset="tiny-random", labels=list(labels), **kw)


def clf_lora(**kw) -> LoraSettings:
    return LoraSettings(r=4, lora_alpha=8.0, llm_target_modules=[], encoder_target_modules=["query", "value"], **kw)


def nli_rows(n: int, *, offset: int = 0, labels=LABELS) -> list[dict]:
    # Learnable on purpose: the hypothesis names its class, so a few steps move the accuracy.
    return [{"text": f"premise number {i} on a sunny day", "text_pair": f"it is {labels[i % len(labels)]}", "label": labels[i % len(labels)]}
            for i in range(offset, offset + n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_split(path: Path, rows: list[dict]) -> Path:
    from uniflow_cli.data.schema import make_row, rows_to_dataset

    rows_to_dataset([make_row(id=f"r{i}", modality="text", question=r["text"], answer=r["label"], text_pair=r.get("text_pair"))
                     for i, r in enumerate(rows)]).save_to_disk(str(path))
    return path


# ---------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("kwargs, match", [
    ({"task": "ner"}, 'task="ner" is not one of qa, classify'),
    ({"task": "classify", "preset": "smol", "labels": LABELS}, 'preset="smol" builds a qa model, not a classify one'),
    ({"preset": "minilm"}, 'preset="minilm" builds a classify model, not a qa one'),
    ({"task": "classify", "preset": "minilm"}, "must name at least 2 classes"),
    ({"task": "classify", "preset": "minilm", "labels": ["a", "a"]}, "lists 'a' twice"),
    ({"task": "classify", "preset": "minilm", "labels": ["a", " b"]}, "without outer spaces"),
    ({"task": "classify", "preset": "minilm", "labels": ["a", "b"], "pool": "cls"}, "pool applies to task qa only"),
    ({"task": "classify", "preset": "minilm", "labels": ["a", "b"], "modalities": ["image"]}, "reads text only"),
    ({"task": "classify", "preset": "custom", "labels": ["a", "b"]}, "needs an encoder directory"),
    ({"task": "classify", "preset": "minilm", "labels": ["a", "b"], "encoder": "/x"}, "takes no encoder path"),
    ({"labels": ["a", "b"]}, "labels apply to task classify only"),
    ({"encoder": "/x"}, "encoder applies to task classify only"),
])
def test_model_settings_are_validated(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ModelSettings(**kwargs)


def test_qa_table_is_unchanged_and_classify_writes_only_its_keys():
    assert set(ModelSettings().to_dict()) == {"preset", "modalities", "pool", "pool_tokens", "image_size", "audio_max_seconds", "prompt"}
    assert tiny().to_dict() == {"preset": "tiny-random", "task": "classify", "labels": LABELS}
    assert tiny().modalities == [] and ModelSettings.from_dict(tiny().to_dict()) == tiny()


@pytest.mark.parametrize("text, expected", [
    ("snli", ["entailment", "neutral", "contradiction"]), ("rotten-tomatoes", ["negative", "positive"]),
    ("a, b ,c", ["a", "b", "c"]), (None, []), (" ", []),
])
def test_parse_labels(text, expected):
    assert parse_labels(text) == expected


# ---------------------------------------------------------------------------------------------- metrics
def _second_computation(preds: list[int], refs: list[int], n: int) -> tuple[float, float]:
    """Accuracy and macro-F1 from per-sample counting, not from the matrix (the reference)."""
    acc = sum(p == r for p, r in zip(preds, refs)) / len(refs)
    f1s = []
    for c in range(n):
        tp = sum(p == c and r == c for p, r in zip(preds, refs))
        fp = sum(p == c and r != c for p, r in zip(preds, refs))
        fn = sum(p != c and r == c for p, r in zip(preds, refs))
        if tp + fp + fn:
            precision, recall = (tp / (tp + fp) if tp + fp else 0.0), (tp / (tp + fn) if tp + fn else 0.0)
            f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return acc, sum(f1s) / len(f1s)


@pytest.mark.parametrize("preds, refs, n, matrix, acc, macro", [
    # Hand-computed: C = [[1,0,0],[1,1,0],[0,1,1]]; F1 = 2/3, 1/2, 2/3 → macro 11/18.
    ([0, 1, 1, 2, 0], [0, 1, 2, 2, 1], 3, [[1, 0, 0], [1, 1, 0], [0, 1, 1]], 3 / 5, 11 / 18),
    ([1, 1, 1, 1], [0, 1, 0, 1], 2, [[0, 2], [0, 2]], 1 / 2, (0 + 2 / 3) / 2),
    # Class 2 is neither a reference nor a prediction: left out of the macro mean (as scikit-learn does).
    ([0, 1, 0], [0, 1, 1], 3, [[1, 0, 0], [1, 1, 0], [0, 0, 0]], 2 / 3, (2 / 3 + 2 / 3) / 2),
])
def test_classification_metrics_against_hand_and_second_computation(preds, refs, n, matrix, acc, macro):
    cm = confusion_matrix(preds, refs, n)
    assert cm == matrix
    assert accuracy_from_confusion(cm) == pytest.approx(acc) and macro_f1_from_confusion(cm) == pytest.approx(macro)
    assert (accuracy_from_confusion(cm), macro_f1_from_confusion(cm)) == pytest.approx(_second_computation(preds, refs, n))
    assert sum(s["support"] for s in per_class_scores(cm)) == len(refs)


def test_classification_summary_and_its_bad_records():
    records = [{"modality": "text", "prediction": LABELS[p], "reference": LABELS[r]} for p, r in zip([0, 1, 1, 2, 0], [0, 1, 2, 2, 1])]
    summary = classification_summary(records, LABELS)
    assert summary["text"]["acc"] == 60.0 and summary["text"]["macro_f1"] == round(100 * 11 / 18, 4)
    assert summary["overall"]["confusion"] == [[1, 0, 0], [1, 1, 0], [0, 1, 1]] and summary["overall"]["n"] == 5
    assert summary["text"]["per_class"]["neutral"] == {"precision": 50.0, "recall": 50.0, "f1": 50.0, "support": 2}
    with pytest.raises(ValueError, match="names class 'maybe'"):
        classification_summary([{"modality": "text", "prediction": "maybe", "reference": "neutral"}], LABELS)
    with pytest.raises(ValueError, match="no records"):
        classification_summary([], LABELS)
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix([3], [0], 3)


# ---------------------------------------------------------------------------------------------- the model
@pytest.fixture(scope="module")
def model():
    from uniflow_cli.models import load_model

    return load_model(tiny(), clf_lora(), seed=0)


def test_pairs_go_through_the_tokenizer_as_text_and_text_pair(model):
    from uniflow_cli.models import collate
    from uniflow_cli.models.multimodal import unwrap

    samples = [{"id": "p", "modality": "text", "question": "ab", "text_pair": "cd", "answer": "neutral"},
               {"id": "s", "modality": "text", "question": "abc", "text_pair": None, "answer": "contradiction"}]
    batch = collate(samples, model)
    expected = unwrap(model).tokenizer("ab", "cd")
    assert batch["input_ids"][0].tolist() == expected["input_ids"] and batch["token_type_ids"][0].tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert batch["attention_mask"].tolist() == [[1] * 7, [1] * 5 + [0] * 2] and batch["labels"].tolist() == [1, 2]
    cut = collate([{**samples[0], "question": "x" * 50, "text_pair": "y" * 50}], model, max_length=12)
    assert cut["input_ids"].shape == (1, 12) and cut["truncated"] == [True] and batch["truncated"] == [False, False]
    # Cut as the tokenizer cuts a pair (longest first): both sides keep tokens.
    assert cut["input_ids"][0].tolist() == unwrap(model).tokenizer("x" * 50, "y" * 50, truncation=True, max_length=12)["input_ids"]
    assert cut["token_type_ids"][0].tolist().count(1) in (5, 6)


def test_loss_is_cross_entropy_of_the_logits(model):
    from uniflow_cli.models import collate

    batch = collate([{"id": str(i), "modality": "text", "question": f"q{i}", "text_pair": "h", "answer": LABELS[i]} for i in range(3)], model)
    with torch.no_grad():
        out = model(batch, full_logits=False)
        manual = -torch.log_softmax(out.logits.double(), dim=-1)[torch.arange(3), batch["labels"]].mean()
    assert out.logits.shape == (3, 3) and float(out.loss) == pytest.approx(float(manual), abs=1e-6)


@pytest.mark.parametrize("sample, match", [
    ({"id": "u", "modality": "text", "question": "q", "answer": "maybe"}, "label 'maybe', which is not one of the model's labels"),
    ({"id": "i", "modality": "image", "question": "q", "answer": "neutral"}, "reads text only"),
])
def test_collate_refuses_bad_samples(model, sample, match):
    from uniflow_cli.models import collate

    with pytest.raises(DataError, match=match):
        collate([sample], model)


def test_head_is_fixed_shared_and_lora_follows_the_seed(model):
    from uniflow_cli.models import adapter_tensors, load_model, peft_config_dict

    other = load_model(tiny(), clf_lora(), seed=7)
    a, b = adapter_tensors(model), adapter_tensors(other)
    head = [k for k in a if ".lora_" not in k]
    pooler = ["base_model.model.encoder.bert.pooler.dense.bias", "base_model.model.encoder.bert.pooler.dense.weight"]
    assert head == [*pooler, "base_model.model.encoder.classifier.bias", HEAD]
    assert peft_config_dict(model)["modules_to_save"] == ["encoder.classifier", "encoder.bert.pooler"]
    assert all(torch.equal(a[k], b[k]) for k in head)  # the head's init does not depend on the experiment seed
    assert float(a[HEAD].std()) == pytest.approx(0.02, rel=0.3) and not torch.equal(a[HEAD], torch.zeros_like(a[HEAD]))
    lora_a = [k for k in a if k.endswith("lora_A.weight")]
    assert lora_a and not any(torch.equal(a[k], b[k]) for k in lora_a)
    assert all(".attention.self.query." in k or ".attention.self.value." in k for k in a if ".lora_" in k)


def test_a_bf16_base_keeps_the_head_and_lora_float32_with_the_same_bytes():
    from uniflow_cli.models import adapter_tensors, load_model
    from uniflow_cli.models.multimodal import unwrap
    from uniflow_cli.settings import TrainSettings
    from uniflow_cli.training import train_loop

    fp32 = adapter_tensors(load_model(tiny(), clf_lora(), seed=0))
    m = load_model(tiny(), clf_lora(), seed=0, dtype=torch.bfloat16)
    bf16 = adapter_tensors(m)
    assert unwrap(m).base_dtype == torch.bfloat16 and all(torch.equal(fp32[k], bf16[k]) for k in fp32)
    rows = [{"id": str(i), "modality": "text", "question": f"q {i}", "text_pair": "h", "answer": LABELS[i % 3]} for i in range(8)]
    stats = train_loop(m, rows, TrainSettings(steps=2, batch_size=4, stages="joint", precision="bf16"), method="fedA2", seed=0)
    assert all(math.isfinite(x) for x in stats.losses)
    assert all(p.dtype == torch.float32 for n, p in m.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_rslora_scaling_matches_peft_keys_and_the_dense_formula(use_rslora):
    from uniflow_cli.models import load_model, peft_config_dict
    from uniflow_cli.peft_keys import lora_scaling

    m = load_model(tiny(), clf_lora(use_rslora=use_rslora), seed=0)
    name = "base_model.model.encoder.bert.encoder.layer.0.attention.self.query"
    layer = m.get_submodule(name)
    expected = 8.0 / math.sqrt(4) if use_rslora else 8.0 / 4
    assert layer.scaling["default"] == pytest.approx(expected)
    assert lora_scaling(peft_config_dict(m), name, 4) == pytest.approx(expected)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(generator=torch.Generator().manual_seed(1))
        x = torch.randn(3, 32, generator=torch.Generator().manual_seed(2))
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        dense = layer.base_layer(x) + expected * x @ (B @ A).T  # W0 x + s·B·A x
        assert torch.allclose(layer(x), dense, atol=1e-6)


def test_the_one_training_loop_teaches_the_classifier():
    """training.train_loop, unchanged, on a classifier: the loss falls and accuracy on the rows rises."""
    from uniflow_cli.evaluation import EvalOptions, evaluate_model
    from uniflow_cli.models import load_model
    from uniflow_cli.settings import TrainSettings
    from uniflow_cli.training import train_loop

    rows = [{"id": str(i), "modality": "text", "question": f"case {i}", "text_pair": f"{LABELS[i % 3]} " * 2, "answer": LABELS[i % 3]}
            for i in range(60)]
    m = load_model(tiny(), clf_lora(), seed=0)
    before, _ = evaluate_model(m, {"text": rows}, EvalOptions(batch_size=16))
    stats = train_loop(m, rows, TrainSettings(steps=60, lr=2e-2, batch_size=8, stages="joint", warmup_ratio=0.0), method="fedA2", seed=0)
    after, records = evaluate_model(m, {"text": rows}, EvalOptions(batch_size=16))
    assert stats.steps_per_stage == {"both": 60} and sum(stats.losses[-5:]) < sum(stats.losses[:5])
    assert after["text"]["acc"] > before["text"]["acc"] and {r["prediction"] for r in records["text"]} <= set(LABELS)


# ---------------------------------------------------------------------------------------------- the round trip
@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Path:
    """init → partition (a user jsonl: text/text_pair/label) → 2 clients × 2 rounds (fedA2, then fedit) → evaluate."""
    root = tmp_path_factory.mktemp("clf")
    ws, data = root / "nli", write_jsonl(root / "nli.jsonl", nli_rows(150))
    steps = ("--steps", "8", "--lr", "5e-3", "--batch-size", "8")
    for args in (
        ("init", ws, "--task", "classify", "--preset", "tiny-random", "--labels", ",".join(LABELS), "--r", "4", "--method", "fedA2", *steps),
        ("partition", "-d", data, "--question-column", "text", "--answer-column", "label", "--clients", "text:2",
         "--train-per-client", "40", "--test-per-modality", "30", "-w", ws),
        ("evaluate", "-w", ws, "--round", "0"),
        ("local-train", "-w", ws, "-c", "0"), ("local-train", "-w", ws, "-c", "1"), ("aggregate", "-w", ws, "--round", "1"),
        ("evaluate", "-w", ws),
        ("local-train", "-w", ws, "-c", "0", "-m", "fedit"), ("local-train", "-w", ws, "-c", "1", "-m", "fedit"),
        ("aggregate", "-w", ws, "--round", "2", "-m", "fedit"), ("evaluate", "-w", ws),
    ):
        result = run(*args)
        assert result.exit_code == 0, (args, result.output)
    return ws


def test_round_trip_metrics_are_present_and_consistent(federation):
    payloads = {t: json.loads((federation / "eval" / f"round-{t}.json").read_text()) for t in (0, 1, 2)}
    for payload in payloads.values():
        assert payload["task"] == "classify" and payload["labels"] == LABELS and set(payload["metrics"]) == {"text", "overall"}
        text = payload["metrics"]["text"]
        cm = text["confusion"]
        assert text["n"] == 30 == sum(map(sum, cm)) and [s["support"] for s in text["per_class"].values()] == [sum(r) for r in cm]
        assert text["acc"] == round(100 * accuracy_from_confusion(cm), 4) and text["macro_f1"] == round(100 * macro_f1_from_confusion(cm), 4)
        assert payload["metrics"]["overall"]["modalities"] == ["text"] and "bertscore" not in payload["config"]
        assert all(s["prediction"] in LABELS and s["reference"] in LABELS for s in payload["samples"]["text"])
    assert payloads[1]["adapter"]["method"] == "fedA2" and payloads[2]["adapter"]["method"] == "fedit"
    drop = read_adapter(federation / "rounds" / "1" / "clients" / "0")
    assert drop.meta.stage == "joint" and drop.meta.modalities == ["text"] and drop.meta.extra["train"]["steps_per_stage"] == {"both": 8}


def test_report_shows_accuracy_and_macro_f1(federation, tmp_path):
    result = run("report", federation, "--out", tmp_path / "rep")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == ["acc.png", "macro_f1.png", "report.md"]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| Method | Round | text Acc | text Macro-F1 |" in md and "| nli | 2 |" in md
    bad = run("report", federation, "--metrics", "bleu", "--out", tmp_path / "rep2")
    assert bad.exit_code == 2 and "unknown metric 'bleu' for classify runs" in bad.output and not (tmp_path / "rep2").exists()


@pytest.mark.parametrize("t", [1, 2])
def test_the_head_is_shared_and_averaged(federation, t):
    drops = [read_adapter(federation / "rounds" / str(t) / "clients" / c) for c in ("0", "1")]
    fused = read_adapter(federation / "rounds" / str(t) / "global")
    weights = torch.tensor([d.meta.num_examples for d in drops], dtype=torch.float64)
    weights = weights / weights.sum()
    for key in (HEAD, "base_model.model.encoder.classifier.bias", "base_model.model.encoder.bert.pooler.dense.weight"):
        assert all(key in d.tensors for d in drops)
        assert not torch.equal(drops[0].tensors[key], drops[1].tensors[key])
        mean = sum(w * d.tensors[key].double() for w, d in zip(weights, drops))
        assert torch.allclose(fused.tensors[key].double(), mean, atol=1e-6)


@pytest.mark.parametrize("method", ["ffa", "fedsa", "fedex", "flora", "svd"])
def test_every_method_runs_a_classify_round(federation, tmp_path, method):
    """The aggregation core takes BERT module names and the head unchanged, for every method (fedA2 and fedit: above)."""
    ws = tmp_path / "ws"
    steps = ("--steps", "2", "--batch-size", "4")
    result = run("init", ws, "--task", "classify", "--preset", "tiny-random", "--labels", ",".join(LABELS), "--r", "4", "--method", method, *steps)
    assert result.exit_code == 0, result.output
    shutil.copytree(federation / "data", ws / "data")
    for args in (("local-train", "-w", ws, "-c", "0"), ("local-train", "-w", ws, "-c", "1"), ("aggregate", "-w", ws, "--round", "1"),
                 ("evaluate", "-w", ws, *(("--client", "0") if method == "fedsa" else ()))):
        result = run(*args)
        assert result.exit_code == 0, (args, result.output)
    out = ws / "eval" / ("clients/0/round-1.json" if method == "fedsa" else "round-1.json")
    assert json.loads(out.read_text())["metrics"]["text"]["n"] == 30
    assert HEAD in read_adapter(ws / "rounds" / "1" / "global").tensors


# ---------------------------------------------------------------------------------------------- bad input
def _one_line(result) -> str:
    """The error the boundary printed (one message, maybe wrapped by the terminal width), never a traceback."""
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    assert result.output.strip().startswith("error: ") and result.output.count("error: ") == 1, result.output
    return " ".join(result.output.split())


@pytest.mark.parametrize("args, match", [
    (["--task", "ner"], "--task 'ner' is not one of qa, classify"),
    (["--task", "classify", "--preset", "smol", "--labels", "a,b"], "--preset 'smol' builds a qa model"),
    (["--preset", "minilm"], "--preset 'minilm' builds a classify model, not a qa one"),
    (["--task", "classify", "--preset", "tiny-random"], "--task classify needs its class names"),
    (["--task", "classify", "--preset", "tiny-random", "--labels", "a,b", "--modalities", "image"], "--modalities applies to --task qa"),
    (["--labels", "a,b", "--preset", "tiny-random"], "labels apply to task classify only"),
])
def test_init_bad_input(tmp_path, args, match):
    result = run("init", tmp_path / "ws", *args)
    assert result.exit_code != 0 and match in _one_line(result), result.output
    assert not (tmp_path / "ws").exists()


@pytest.fixture(scope="module")
def qa_ws(tmp_path_factory) -> Path:
    from tests.workspace_factory import make_workspace

    return make_workspace(tmp_path_factory.mktemp("qa") / "qa", {"0": "text"}, test=("text",))


def test_classify_global_in_a_qa_workspace_and_vice_versa(federation, qa_ws, tmp_path):
    from uniflow_cli.local_train import run_local_train

    for ws, other, task in ((qa_ws, federation, "classify"), (federation, qa_ws, "qa")):
        with pytest.raises(IncompatibleAdaptersError, match=f"was made for a {task} model"):
            run_local_train(workspace=ws, global_dir=other / "rounds" / "0" / "global", data_dir=ws / "data" / "clients" / "0",
                            out=tmp_path / f"drop-{task}", overrides={"steps": 1})
        assert not (tmp_path / f"drop-{task}").exists()
        copy = tmp_path / f"ws-{task}"
        shutil.copytree(ws, copy)
        shutil.rmtree(copy / "eval", ignore_errors=True)
        shutil.copytree(other / "rounds" / "0" / "global", copy / "rounds" / "9" / "global")
        for t in range(1, 9):  # the rounds before it, so that only the task is wrong
            if not (copy / "rounds" / str(t) / "global").exists():
                shutil.copytree(copy / "rounds" / "0" / "global", copy / "rounds" / str(t) / "global")
        result = run("evaluate", "-w", copy, "--round", "9")
        assert f"was made for a {task} model" in _one_line(result) and not (copy / "eval" / "round-9.json").exists()


def test_labels_outside_the_workspace_labels(federation, tmp_path):
    bad = nli_rows(6, labels=["entailment", "maybe"])
    write_jsonl(tmp_path / "bad.jsonl", bad)
    ws = tmp_path / "ws"
    shutil.copytree(federation, ws)
    shutil.rmtree(ws / "data")
    result = run("partition", "-d", tmp_path / "bad.jsonl", "--question-column", "text", "--answer-column", "label", "--clients", "text:1",
                 "--test-per-modality", "2", "-w", ws)
    assert "has label 'maybe'" in _one_line(result) and not (ws / "data").exists()
    split = write_split(tmp_path / "split", bad)
    result = run("local-train", "--global", federation / "rounds" / "0" / "global", "--data", split, "--out", tmp_path / "drop", "-w", federation)
    assert "sample 'r1' has label 'maybe', which is not one of the model's labels" in _one_line(result) and not (tmp_path / "drop").exists()
    result = run("evaluate", "--adapter", federation / "rounds" / "0" / "global", "--data", split, "--out", tmp_path / "e.json")
    assert "has label 'maybe'" in _one_line(result) and not (tmp_path / "e.json").exists()


@pytest.mark.parametrize("args, match", [
    (["--stages", "two-stage"], "--stages 'two-stage' does not apply to a classify model"),
    (["--quantize", "nf4"], "--quantize 'nf4' applies to a qa model's LLM"),
])
def test_local_train_refuses_qa_only_training_options(federation, tmp_path, args, match):
    result = run("local-train", "--global", federation / "rounds" / "0" / "global", "--data", federation / "data" / "clients" / "0",
                 "--out", tmp_path / "drop", "-w", federation, *args)
    assert match in _one_line(result) and not (tmp_path / "drop").exists()


# ---------------------------------------------------------------------------------------------- the real thing
@pytest.mark.slow
def test_snli_with_minilm(tmp_path):
    ws = tmp_path / "snli"
    for args in (
        ("init", ws, "--task", "classify", "--preset", "minilm", "--labels", "snli", "--steps", "2", "--batch-size", "4"),
        ("partition", "-d", "snli", "--clients", "text:2", "--scheme", "dirichlet", "--alpha", "0.5", "--train-per-client", "16",
         "--test-per-modality", "24", "-w", ws),
        ("local-train", "-w", ws, "-c", "0"), ("local-train", "-w", ws, "-c", "1"), ("aggregate", "-w", ws, "--round", "1"),
        ("evaluate", "-w", ws),
    ):
        result = run(*args)
        assert result.exit_code == 0, (args, result.output)
    payload = json.loads((ws / "eval" / "round-1.json").read_text())
    assert payload["labels"] == ["entailment", "neutral", "contradiction"] and payload["metrics"]["text"]["n"] == 24
    assert payload["adapter"]["base_fingerprint"].startswith("minilm:") and 0 <= payload["metrics"]["overall"]["acc"] <= 100
    assert any(s["text_pair"] for s in payload["samples"]["text"])
