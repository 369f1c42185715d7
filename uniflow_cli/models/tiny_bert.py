"""The ``tiny-random`` preset of task ``classify``: a toy BERT with random but fixed weights (tests).

Like :mod:`uniflow_cli.models.tiny` for the QA model: the weights are seeded with :data:`TINY_BERT_SEED`,
independent of the experiment's seed (every client must share one frozen base), and the tokenizer is
built in code (nothing read from disk or a hub): a WordPiece vocabulary of single characters, each as a
word start and as a ``##`` continuation, with BERT's special tokens and its pair template
(``[CLS] a [SEP] b [SEP]``, token types 0 then 1). Building it takes a few milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import string
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

TINY_BERT_SEED = 4321
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
CHARACTERS = string.ascii_lowercase + string.digits + string.punctuation
MAX_LENGTH = 512

BERT_CONFIG = {
    "vocab_size": len(SPECIALS) + 2 * len(CHARACTERS),
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": MAX_LENGTH,
    "type_vocab_size": 2,
    "pad_token_id": 0,
}


def tiny_bert_digest() -> str:
    payload = {"seed": TINY_BERT_SEED, "bert": BERT_CONFIG, "tokenizer": "wordpiece-chars-v1", "characters": CHARACTERS}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def vocabulary() -> dict[str, int]:
    pieces = [*SPECIALS, *CHARACTERS, *(f"##{c}" for c in CHARACTERS)]
    return {piece: i for i, piece in enumerate(pieces)}


def build_tokenizer() -> Any:
    """A BERT-style fast tokenizer (lower-cased, one piece per character) with BERT's pair template."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = vocabulary()
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True, handle_chinese_chars=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    backend.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]",
        model_max_length=MAX_LENGTH, model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def build_classifier(num_labels: int, dtype: torch.dtype | None = None) -> Any:
    """``BertForSequenceClassification`` at toy size, seeded (the head is re-initialised by the caller)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_BERT_SEED)
        model = BertForSequenceClassification(BertConfig(**BERT_CONFIG, num_labels=num_labels)).eval()
    return model if dtype is None else model.to(dtype)
