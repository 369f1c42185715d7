"""The UniFLoW model (paper Eq. 2–6) and the collate function that feeds it.

Per modality m: ``Z = f_m(M)`` (Eq. 2, a frozen encoder + LoRA), ``X^m = P_m(Pool(Z))`` (Eq. 3, trainable
Linear into the LLM's hidden size), then the LLM reads
``X = [e_BOS, P_before, ⊕_m X^m, P_gap, Q, P_after]`` (Eq. 4, :class:`~.settings.PromptSettings`) and is
trained with cross-entropy on the answer tokens only (Eq. 6). Text-only samples skip the encoders.

A sample (as stored by ``uniflow partition``) is a dict with ``id`` (str), ``modality``
(``"image"|"audio"|"text"``), ``question``, ``answer`` (str), ``image`` (PIL image / path / bytes or
None) and ``audio`` (``{"bytes","path"}`` of a 16 kHz mono WAV, or None).

A batch (from :func:`collate` / :meth:`UniflowModel.collate`) is a dict:

``input_ids`` (B, L) long
    token ids; the positions reserved for modality features hold negative slot ids
    (:data:`SLOT_IDS`: image −1, audio −2) and are replaced by ``X^m`` in :meth:`UniflowModel.embed`.
``attention_mask`` (B, L) long; ``labels`` (B, L) long, −100 everywhere except the answer tokens and the
    EOS closing the answer (training batches only; generation batches are left-padded and have none).
``image`` / ``audio``: ``{"rows": LongTensor of batch rows, **encoder inputs}`` for the rows that have
    that modality (absent when no row has it).
``ids``, ``modalities``, ``questions``, ``answers``: the samples' strings, for evaluation.
``truncated``: per row, whether the sample was cut to fit ``max_length`` tokens (see :class:`Collator`).

Precision: the frozen LLM and encoders may be stored in bfloat16/float16 (``build_base(..., dtype=...)``)
while the projectors and LoRA weights stay float32; :meth:`UniflowModel.encode` casts each encoder's
inputs to that encoder's dtype and the pooled features to the projector's, so a forward works with or
without ``torch.autocast``. The loss is always computed in float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from uniflow_cli.errors import ConfigError, DataError, ModelError, UsageError
from uniflow_cli.models.settings import ModelSettings, PromptSettings
from uniflow_cli.models.upcast import is_upcast

SLOT_IDS = {"image": -1, "audio": -2}
IGNORE_INDEX = -100
#: Default token budget of one sequence (prompt + answer), lowered to the LLM's position table if smaller.
#: Enough for the paper's short VQA/spoken-QA answers; caps what one hostile sample can allocate.
DEFAULT_MAX_LENGTH = 512
_SENTINEL = "\x00UNIFLOW_USER_TURN\x00"
#: LLM config fields that transform the LM head's output (softcapping, logit scales). An LLM with any of
#: them set keeps the full-logits path: its own forward applies them, a bare ``lm_head(hidden)`` would not.
_LOGIT_SOFTCAPS = ("final_logit_softcapping",)  # Gemma 2/3
_LOGIT_SCALES = ("logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier_scale", "dim_model_base")  # Cohere, Granite, Falcon-H1, MiniCPM


@dataclass
class AnswerOutput:
    """What :meth:`UniflowModel.forward` returns with ``full_logits=False``: the LM head ran only on the
    answer positions (label ≠ −100 after the causal shift), in row-major batch order.

    ``loss``: Eq. 6, float32 mean over those positions (NaN when there are none, as the full path gives);
    ``logits`` (N, vocab): the head's output there; ``labels`` (N,): the target token of each;
    ``rows`` (N,): the batch row each position belongs to.
    """

    loss: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor
    rows: torch.Tensor


def frozen_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of a module's frozen weights: its first floating parameter that is not a LoRA weight
    (LoRA stays float32 on a bfloat16 base). float32 for a module without one."""
    for name, param in module.named_parameters():
        if param.is_floating_point() and ".lora_" not in f".{name}":
            return param.dtype
    return torch.float32


def answer_head(llm: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(decoder, lm_head)`` when ``lm_head(decoder(...)[0])`` is exactly how ``llm`` makes its logits,
    else None (then only the full forward is right; see :data:`_LOGIT_SCALES`)."""
    get_decoder = getattr(llm, "get_decoder", None)
    get_head = getattr(llm, "get_output_embeddings", None)
    if not callable(get_decoder) or not callable(get_head):
        return None
    configs = [getattr(llm, "config", None)]
    configs.append(getattr(configs[0], "text_config", None))
    for config in (c for c in configs if c is not None):
        if any(getattr(config, name, None) is not None for name in _LOGIT_SOFTCAPS):
            return None
        if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_SCALES):
            return None
    decoder, head = get_decoder(), get_head()
    # get_decoder() falls back to the model itself when it finds no separate decoder: no head to skip then.
    if decoder is None or head is None or decoder is llm:
        return None
    return decoder, head


def pool(hidden: torch.Tensor, lengths: torch.Tensor, has_cls: bool, mode: str, n_tokens: int) -> torch.Tensor:
    """Eq. 3's Pool: ``(B, T, d)`` encoder states → ``(B, N, d)``.

    ``cls``: token 0 (or the mean when the encoder has no CLS token, e.g. SigLIP); ``mean``: masked mean
    of the content tokens (CLS excluded, padding excluded via ``lengths``); ``adaptive``: adaptive average
    pooling of each row's valid content tokens to ``n_tokens`` (keeps coarse spatial/temporal order).
    """
    start = 1 if has_cls else 0
    if mode == "cls" and has_cls:
        return hidden[:, :1]
    rows = []
    for i in range(hidden.shape[0]):
        length = int(lengths[i]) - start if has_cls else int(lengths[i])
        seq = hidden[i, start : start + max(1, length)]
        if mode == "adaptive":
            rows.append(nn.functional.adaptive_avg_pool1d(seq.transpose(0, 1).unsqueeze(0), n_tokens)[0].transpose(0, 1))
        else:  # mean, or cls on an encoder without a CLS token
            rows.append(seq.mean(dim=0, keepdim=True))
    return torch.stack(rows)


class Collator:
    """Turns samples into a batch (see the module docstring). Built by :meth:`UniflowModel.collate`.

    Prompt pieces are tokenised separately and concatenated, so the modality slots fall exactly
    between them; the same pieces are used for training and generation.

    Every sequence is at most ``max_length`` tokens (default :data:`DEFAULT_MAX_LENGTH`, capped at
    ``max_positions``), cut while tokenising, before any tensor is built: only a prefix of a long text
    is tokenised. A training sequence that does not fit keeps the prompt template and modality slots
    whole, shortens the question if it alone would crowd out the answer (the answer keeps at least a
    quarter of the budget), and cuts the answer's tail (its EOS goes too: it did not end there), so the
    loss always has answer tokens to learn from. A generation prompt is cut the same way (the question
    shrinks).
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt: PromptSettings,
        encoders: dict[str, Any],
        tokens_per_modality: int,
        *,
        max_positions: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_positions = max_positions
        self.max_length = DEFAULT_MAX_LENGTH if max_positions is None else min(DEFAULT_MAX_LENGTH, max_positions)
        self.prompt = prompt
        self.encoders = encoders
        self.slots = tokens_per_modality
        chat_pre, chat_post = "", ""
        if prompt.use_chat_template and getattr(tokenizer, "chat_template", None):
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": _SENTINEL}], add_generation_prompt=True, tokenize=False
            )
            if rendered.count(_SENTINEL) == 1:
                chat_pre, chat_post = rendered.split(_SENTINEL)
        self.chat_pre, self.chat_post = chat_pre, chat_post
        self._memo: dict[str, list[int]] = {}

    def _ids(self, text: str) -> list[int]:
        if text not in self._memo:
            self._memo[text] = list(self.tokenizer(text, add_special_tokens=False).input_ids) if text else []
        return self._memo[text]

    def _bounded_ids(self, text: str, limit: int) -> tuple[list[int], bool]:
        """The first ``limit`` token ids of ``text`` and whether it has more. Only a prefix is tokenised,
        grown until it yields more than ``limit`` tokens, so a 5 MB text costs what a short one does."""
        chars = 8 * limit + 64
        while True:
            head = text[:chars]
            ids = self.tokenizer(head, add_special_tokens=False).input_ids if head else []
            if len(head) == len(text) or len(ids) > limit:
                return list(ids[:limit]), len(ids) > limit
            chars *= 4

    def _head(self, modality: str) -> list[int]:
        """BOS, P_before and the modality's tags around its slots: Eq. 4 up to the gap."""
        p = self.prompt
        ids: list[int] = []
        bos = self.tokenizer.bos_token_id
        first = self._ids(self.chat_pre + p.before)
        if bos is not None and (not first or first[0] != bos):
            ids.append(bos)
        ids += first
        if modality in SLOT_IDS:
            ids += self._ids(p.tag("open", modality))
            ids += [SLOT_IDS[modality]] * self.slots
            ids += self._ids(p.tag("close", modality))
        return ids

    def _gap_and_tail(self, modality: str) -> tuple[str, str]:
        gap = self.prompt.gap if modality in SLOT_IDS else self.prompt.gap_text_only
        return gap, self.prompt.after + self.chat_post

    def fixed_length(self, modality: str) -> int:
        """Tokens of Eq. 4 without the question (template, tags, slots): what no cut can shorten."""
        gap, tail = self._gap_and_tail(modality)
        return len(self._head(modality)) + len(self._ids(gap)) + len(self._ids(tail))

    def prompt_ids(self, modality: str, question: str, budget: int) -> tuple[list[int], bool]:
        """Eq. 4's ids in at most ``budget`` tokens (``budget > fixed_length``), and whether the question was cut."""
        question = question.strip()
        head = self._head(modality)
        gap, tail = self._gap_and_tail(modality)
        q_ids, cut = self._bounded_ids(question, budget)
        if not cut:
            # One string, as always: a sample that fits gets exactly the ids it always got.
            ids = head + list(self.tokenizer(gap + question + tail, add_special_tokens=False).input_ids)
            if len(ids) <= budget:
                return ids, False
        room = budget - self.fixed_length(modality)
        return head + self._ids(gap) + q_ids[:room] + self._ids(tail), True

    def prompt_pieces(self, modality: str, question: str) -> list[int]:
        """Token ids of Eq. 4 for one sample, with ``tokens_per_modality`` slot ids for the features (uncut)."""
        head = self._head(modality)
        gap, tail = self._gap_and_tail(modality)
        return head + list(self.tokenizer(gap + question.strip() + tail, add_special_tokens=False).input_ids)

    def check_max_length(self, max_length: int) -> int:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ConfigError(f"max_length {max_length!r} is not a positive number of tokens", fix=f"use max_length {self.max_length}")
        if self.max_positions is not None and max_length > self.max_positions:
            raise ConfigError(
                f"max_length {max_length} exceeds the LLM's {self.max_positions} positions (max_position_embeddings)",
                fix=f"use max_length {self.max_positions} or less",
            )
        return max_length

    def _sequence(self, s: dict[str, Any], modality: str, sid: Any, limit: int, train: bool) -> tuple[list[int], list[int], bool]:
        """(ids, labels, cut) of one sample within ``limit`` tokens; labels are [] for generation."""
        tok = self.tokenizer
        fixed = self.fixed_length(modality)
        if fixed + 1 + int(train) > limit:
            raise ConfigError(
                f"max_length {limit} is too short for sample {sid!r}: the prompt template"
                + (f" with its {self.slots} {modality} slots" if modality in SLOT_IDS else "")
                + f" alone takes {fixed} tokens",
                fix=f"use max_length {fixed + 64} or more",
            )
        question = str(s.get("question", ""))
        if not train:
            prompt, cut = self.prompt_ids(modality, question, limit)
            return prompt, [], cut
        answer, cut = self._bounded_ids(str(s.get("answer", "")).strip(), limit)
        if not cut:
            answer.append(tok.eos_token_id)
        # The question may only crowd the answer down to a quarter of the budget (or the whole answer).
        reserve = min(len(answer), max(1, limit // 4), limit - fixed - 1)
        prompt, cut_question = self.prompt_ids(modality, question, limit - reserve)
        keep = limit - len(prompt)
        cut = cut or cut_question or len(answer) > keep
        answer = answer[:keep]
        return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer, cut

    def __call__(self, samples: Sequence[dict[str, Any]], *, train: bool = True, max_length: int | None = None) -> dict[str, Any]:
        if not samples:
            raise DataError("cannot collate an empty batch", fix="pass at least one sample")
        tok = self.tokenizer
        limit = self.max_length if max_length is None else self.check_max_length(max_length)
        rows_ids, rows_labels, truncated = [], [], []
        media: dict[str, tuple[list[int], list[Any]]] = {m: ([], []) for m in SLOT_IDS}
        for row, s in enumerate(samples):
            modality = s.get("modality")
            sid = s.get("id", row)
            if modality not in ("image", "audio", "text"):
                raise DataError(f"sample {sid!r} has modality {modality!r}", fix="use image, audio or text")
            if modality != "text":
                if modality not in self.encoders:
                    raise DataError(
                        f"sample {sid!r} is {modality} but the model has no {modality} encoder (modalities: {sorted(self.encoders) or 'none'})",
                        fix=f"add {modality!r} to modalities in [model] of uniflow.toml (or --modalities) and re-run uniflow init",
                    )
                if s.get(modality) is None:
                    raise DataError(f"sample {sid!r} has modality {modality} but no {modality} value", fix="re-create the dataset")
                media[modality][0].append(row)
                media[modality][1].append(s[modality])
            ids, labels, cut = self._sequence(s, modality, sid, limit, train)
            rows_ids.append(ids)
            rows_labels.append(labels)
            truncated.append(cut)
        length = max(len(r) for r in rows_ids)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        input_ids = torch.full((len(samples), length), pad, dtype=torch.long)
        attention = torch.zeros((len(samples), length), dtype=torch.long)
        labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
        for i, ids in enumerate(rows_ids):
            # Training pads on the right; generation on the left so every row ends where generation starts.
            sl = slice(0, len(ids)) if train else slice(length - len(ids), length)
            input_ids[i, sl] = torch.tensor(ids)
            attention[i, sl] = 1
            if train:
                labels[i, sl] = torch.tensor(rows_labels[i])
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention,
            "ids": [str(s.get("id", i)) for i, s in enumerate(samples)],
            "modalities": [s["modality"] for s in samples],
            "questions": [str(s.get("question", "")) for s in samples],
            "answers": [str(s.get("answer", "")) for s in samples],
            "truncated": truncated,
        }
        if train:
            batch["labels"] = labels
        # Feature extraction stays float32 when the caller collates inside torch.autocast: Whisper's log-mel
        # runs torch matmuls on the CPU, which autocast would turn into bfloat16 (and numpy cannot take those).
        with torch.autocast("cpu", enabled=False):
            for modality, (rows, values) in media.items():
                if rows:
                    batch[modality] = {"rows": torch.tensor(rows, dtype=torch.long), **self.encoders[modality].preprocess(values)}
        return batch


class UniflowModel(nn.Module):
    """Encoders f_m + projectors P_m + LLM (Eq. 2–6). Wrap with :func:`uniflow_cli.models.lora.add_lora`.

    Submodules (their names are the PEFT key names' stems): ``llm``, ``encoders.<m>``, ``projectors.<m>``.
    """

    def __init__(self, llm: nn.Module, tokenizer: Any, encoders: dict[str, Any], settings: ModelSettings, fingerprint: str) -> None:
        super().__init__()
        self.llm = llm
        self.tokenizer = tokenizer
        self.settings = settings
        self.fingerprint = fingerprint
        self._encoder_wrappers = dict(encoders)  # preprocessing + call conventions (not modules)
        self.encoders = nn.ModuleDict({m: e.model for m, e in encoders.items()})
        d_llm = int(llm.get_input_embeddings().weight.shape[1])
        self.projectors = nn.ModuleDict({m: nn.Linear(e.hidden_size, d_llm) for m, e in encoders.items()})
        for p in self.llm.parameters():
            p.requires_grad_(False)
        for p in self.encoders.parameters():
            p.requires_grad_(False)
        positions = getattr(getattr(llm, "config", None), "max_position_embeddings", None)
        self.collator = Collator(
            tokenizer, settings.prompt, self._encoder_wrappers, settings.tokens_per_modality,
            max_positions=positions if isinstance(positions, int) and positions > 0 else None,
        )

    @property
    def modalities(self) -> list[str]:
        return list(self.encoders.keys())

    @property
    def max_length(self) -> int:
        """The default token budget of one sequence (:data:`DEFAULT_MAX_LENGTH`, capped at the LLM's positions)."""
        return self.collator.max_length

    def collate(self, samples: Sequence[dict[str, Any]], *, train: bool = True, max_length: int | None = None) -> dict[str, Any]:
        """Samples → batch (module docstring). ``train=False`` gives a left-padded prompt-only batch;
        every row is cut to ``max_length`` tokens (default :attr:`max_length`)."""
        return self.collator(samples, train=train, max_length=max_length)

    def encode(self, modality: str, inputs: dict[str, Any]) -> torch.Tensor:
        """Eq. 2–3 for the rows of one modality: ``(n, tokens_per_modality, d_llm)``."""
        wrapper = self._encoder_wrappers[modality]
        # Call through the (possibly LoRA-wrapped) module in self.encoders, not the original reference.
        wrapper.model = self.encoders[modality]
        # The encoder may be stored in bfloat16 (build_base dtype): its float inputs (pixels, mel features,
        # waveforms) must match without relying on autocast; integer inputs (masks, lengths) stay as they are.
        # An encoder rewired to float32 math (models.upcast) takes float32 inputs: no rounding of the pixels.
        encoder = self.encoders[modality]
        dtype = torch.float32 if is_upcast(encoder) else frozen_dtype(encoder)
        model_inputs = {
            k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items() if k != "rows"
        }
        hidden, lengths, has_cls = wrapper.encode(model_inputs)
        pooled = pool(hidden, lengths, has_cls, self.settings.pool, self.settings.pool_tokens)
        projector = self.projectors[modality]
        return projector(pooled.to(next(projector.parameters()).dtype))  # the projector trains in float32

    def embed(self, batch: dict[str, Any]) -> torch.Tensor:
        """Eq. 4: token embeddings with the projected modality features written into their slots."""
        input_ids = batch["input_ids"]
        embeds = self.llm.get_input_embeddings()(input_ids.clamp(min=0))
        for modality, slot in SLOT_IDS.items():
            mask = input_ids == slot
            if modality not in batch:
                if bool(mask.any()):
                    raise ModelError(f"batch has {modality} slots but no {modality} inputs", fix="build batches with model.collate")
                continue
            if modality not in self.encoders:
                raise DataError(f"batch holds {modality} inputs but the model has no {modality} encoder", fix="add the modality to [model]")
            feats = self.encode(modality, batch[modality]).to(embeds.dtype)
            rows = batch[modality]["rows"]
            expected = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device).index_add_(0, rows, torch.full_like(rows, feats.shape[1]))
            if not torch.equal(mask.sum(dim=1), expected):
                raise ModelError(f"{modality} slots do not match the encoded features", fix="build batches with model.collate")
            # Rows are ascending, so row-major order of the mask matches the order of feats.
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), feats.reshape(-1, feats.shape[-1]))
        return embeds

    @property
    def base_dtype(self) -> torch.dtype:
        """The dtype the frozen LLM is stored in (``build_base(..., dtype=...)``; float32 by default)."""
        return frozen_dtype(self.llm)

    def forward(self, batch: dict[str, Any], *, full_logits: bool = True) -> Any:
        """Eq. 6: ``.loss`` (float32 mean over answer tokens) and ``.logits``.

        ``full_logits=True``: the LLM's own output, logits at every position (B, L, vocab).
        ``full_logits=False`` with labels: an :class:`AnswerOutput` — the LM head runs only on the answer
        positions (the loss needs nothing else), same loss. Without labels, or for an LLM whose head is
        more than ``lm_head(hidden)`` (:func:`answer_head`), the full path runs.
        """
        embeds = self.embed(batch)
        labels = batch.get("labels")
        head = answer_head(self.llm) if not full_logits and labels is not None else None
        if head is None:
            return self.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=labels, use_cache=False)
        decoder, lm_head = head
        hidden = decoder(inputs_embeds=embeds, attention_mask=batch["attention_mask"], use_cache=False)[0]
        # HF's causal-LM loss: position t predicts token t+1, so hidden[:, :-1] is scored against labels[:, 1:].
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        logits = lm_head(hidden[:, :-1][keep])
        # Mean over the kept tokens in float32, as HF's loss; with no answer token both give NaN (0/0).
        loss = nn.functional.cross_entropy(logits.float(), targets[keep])
        return AnswerOutput(loss=loss, logits=logits, labels=targets[keep], rows=keep.nonzero()[:, 0])

    @torch.no_grad()
    def generate(self, batch: dict[str, Any], max_new_tokens: int = 32) -> list[str]:
        """Greedy answers for a ``train=False`` batch (decoded, special tokens removed, stripped)."""
        if "labels" in batch:
            raise ModelError("generate() needs a prompt-only batch", fix="use model.collate(samples, train=False)")
        embeds = self.embed(batch)
        tok = self.tokenizer
        out = self.llm.generate(
            inputs_embeds=embeds,
            attention_mask=batch["attention_mask"],
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        return [text.strip() for text in tok.batch_decode(out, skip_special_tokens=True)]


def unwrap(model: Any) -> Any:
    """The :class:`UniflowModel` inside a PeftModel (or the model itself)."""
    # Here, next to the class it looks for: models.lora imports it from this module, never the other way round.
    if isinstance(model, UniflowModel) or getattr(type(model), "uniflow_base", False):
        return model
    base = model.get_base_model() if hasattr(model, "get_base_model") else None
    # uniflow_base: another task's model with the same small interface (models.classify.SequenceClassifier).
    if isinstance(base, UniflowModel) or getattr(type(base), "uniflow_base", False):
        return base
    raise UsageError(f"expected a UniflowModel or a PeftModel around one, got {type(model).__name__}", fix="build it with load_model()")


def collate(samples: Sequence[dict[str, Any]], model: Any, *, train: bool = True, max_length: int | None = None) -> dict[str, Any]:
    """Module-level form of :meth:`UniflowModel.collate` (accepts the PEFT-wrapped model too)."""
    return unwrap(model).collate(samples, train=train, max_length=max_length)
