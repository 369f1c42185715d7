"""Model configuration: which base (preset or local dirs), pooling, input sizes and the prompt strings.

Pure dataclasses (no torch) so that the CLI and ``uniflow.toml`` handling stay fast. Names follow the
paper: Eq. 3's ``Pool`` and projector ``P``, Eq. 4's ``P_before``, ``P_gap``, ``P_after`` (Table 5).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from uniflow_cli.errors import ConfigError, UsageError
from uniflow_cli.settings import check_field_types, check_keys
from uniflow_cli.settings import toml_type as _toml_type

PRESETS = ("smol", "tiny-random", "random-1b", "random-7b", "custom")
MODALITIES = ("image", "audio")  # text needs no encoder
POOLS = ("cls", "mean", "adaptive")

@dataclass
class PromptSettings:
    """Eq. 4: ``X = [e_BOS, P_before, ⊕_m X^m, P_gap, Q, P_after]`` with the strings of the paper's Table 5.

    ``P_before`` = "Start of the conversation." + "### Human: <modality>"; ``P_gap`` = "</modality>" +
    "Now, here's the question based on the above features:". Each modality's projected tokens are
    wrapped in its own tag pair (``<Image>`` ... ``</Image>``), which is how the ``<modality>`` placeholder
    of Table 5 generalises to several modalities (⊕). Text-only samples use ``gap_text_only`` instead of
    ``gap`` because there are no features to refer to. With ``use_chat_template`` (and an LLM whose
    tokenizer has one, like SmolLM2-Instruct) the whole human turn is placed in the LLM's user message
    and the answer follows the assistant header; this keeps instruction-tuned LLMs on their training
    format. The answer is terminated by the tokenizer's EOS token.
    """

    before: str = "Start of the conversation. ### Human: "
    modality_open: str = "<{Modality}>"
    modality_close: str = "</{Modality}>"
    gap: str = " Now, here's the question based on the above features: "
    gap_text_only: str = "Now, here's the question: "
    after: str = " Based on the above input and question, please provide your response."
    use_chat_template: bool = True

    def __post_init__(self) -> None:
        check_field_types(self, "model.prompt")
        for name in ("modality_open", "modality_close"):
            value = getattr(self, name)
            try:
                value.format(Modality="Image", modality="image")
            except (KeyError, IndexError, ValueError) as exc:
                raise ConfigError(
                    f"prompt {name}={value!r} is not a valid template ({exc})",
                    fix="use only the placeholders {Modality} or {modality}, e.g. '<{Modality}>'",
                ) from None

    def tag(self, which: str, modality: str) -> str:
        template = self.modality_open if which == "open" else self.modality_close
        return template.format(Modality=modality.capitalize(), modality=modality)


@dataclass
class ModelSettings:
    """The ``[model]`` section of ``uniflow.toml``.

    * ``preset``: ``smol`` (embedded real weights: SmolLM2-135M-Instruct + DINOv2-small + Whisper tiny.en
      encoder), ``tiny-random`` (same architectures, tiny random weights: tests), ``random-1b`` /
      ``random-7b`` (Llama-3.2-1B / Llama-2-7B shapes with encoders to match, random weights: memory and
      speed at real size, :mod:`uniflow_cli.models.scale`), or ``custom`` (local HF directories given in
      ``llm``, ``image_encoder``, ``audio_encoder``).
    * ``modalities``: which encoders to build (``image``, ``audio``); text never needs one.
    * ``pool``: Eq. 3's Pool — ``cls`` (the encoder's first token, 1 token), ``mean`` (1 token) or
      ``adaptive`` (adaptive average pooling of the patch/frame sequence to ``pool_tokens`` tokens, the
      default: a few tokens keep coarse spatial/temporal layout at negligible cost).
    * ``image_size``: square input side in pixels (DINOv2 patch 14: 112 px → 8×8 patches, cheap on CPU).
    * ``audio_max_seconds``: longest clip; shorter clips are padded only to this length, never to
      Whisper's 30 s (the encoder's positional table is cut to match), longer ones are truncated.
    """

    SECTION: ClassVar[str] = "model"

    preset: str = "smol"
    llm: str | None = None
    image_encoder: str | None = None
    audio_encoder: str | None = None
    modalities: list[str] = field(default_factory=lambda: ["image", "audio"])
    pool: str = "adaptive"
    pool_tokens: int = 4
    image_size: int = 112
    audio_max_seconds: float = 10.0
    prompt: PromptSettings = field(default_factory=PromptSettings)

    def __post_init__(self) -> None:
        if isinstance(self.prompt, dict):
            self.prompt = PromptSettings(**check_keys(self.prompt, PromptSettings, "uniflow.toml [model.prompt]"))
        if not isinstance(self.prompt, PromptSettings):
            raise ConfigError(f"prompt={self.prompt!r} must be a table, not {_toml_type(self.prompt)}", fix="write it as [model.prompt]")
        check_field_types(self, "model", skip=("prompt",))
        if self.preset not in PRESETS:
            raise UsageError(f"unknown model preset {self.preset!r}", fix=f"use one of {', '.join(PRESETS)}")
        self.modalities = list(self.modalities)
        bad = [m for m in self.modalities if m not in MODALITIES]
        if bad:
            raise ConfigError(
                f"unknown modality {bad[0]!r} in model modalities", fix=f"use a subset of {','.join(MODALITIES)} (text needs no encoder)"
            )
        if len(set(self.modalities)) != len(self.modalities):
            raise ConfigError(f"modalities {self.modalities} lists a modality twice", fix="list each modality once")
        self.modalities = [m for m in MODALITIES if m in self.modalities]  # canonical order → stable fingerprints
        if self.preset == "custom":
            if not self.llm:
                raise ConfigError("preset 'custom' needs an llm directory", fix="set llm = '/path/to/hf-causal-lm' in [model]")
            for m in self.modalities:
                if not getattr(self, f"{m}_encoder"):
                    raise ConfigError(
                        f"preset 'custom' lists modality {m!r} but no {m}_encoder directory",
                        fix=f"set {m}_encoder = '/path/to/hf-encoder' in [model], or drop {m!r} from modalities",
                    )
        elif self.llm or self.image_encoder or self.audio_encoder:
            raise ConfigError(
                f"preset {self.preset!r} takes no llm/image_encoder/audio_encoder paths", fix="set preset = 'custom' to use local directories"
            )
        if self.pool not in POOLS:
            raise ConfigError(f"pool={self.pool!r} is not one of {'|'.join(POOLS)}", fix="use pool = 'adaptive'")
        if not isinstance(self.pool_tokens, int) or not 1 <= self.pool_tokens <= 256:
            raise ConfigError(f"pool_tokens={self.pool_tokens!r} must be an integer in 1..256", fix="use pool_tokens = 4")
        if not isinstance(self.image_size, int) or not 14 <= self.image_size <= 1024:
            raise ConfigError(f"image_size={self.image_size!r} must be an integer in 14..1024", fix="use image_size = 112")
        if not (isinstance(self.audio_max_seconds, (int, float)) and math.isfinite(self.audio_max_seconds)) or not (
            0.5 <= self.audio_max_seconds <= 30.0
        ):
            raise ConfigError(
                f"audio_max_seconds={self.audio_max_seconds!r} must be in [0.5, 30]", fix="use audio_max_seconds = 10"
            )

    @property
    def tokens_per_modality(self) -> int:
        """How many LLM input positions one modality's features occupy."""
        return self.pool_tokens if self.pool == "adaptive" else 1

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for ``uniflow.toml`` (None values dropped: TOML has no null)."""
        data = dataclasses.asdict(self)
        return {k: v for k, v in data.items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ModelSettings:
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"[model] in uniflow.toml must be a table, not {_toml_type(data)}", fix="write it as a [model] table")
        return cls(**check_keys(dict(data or {}), cls, "uniflow.toml [model]"))
