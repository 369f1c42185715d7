"""Modality encoders f_m (Eq. 2): wrap an HF vision or audio model and its input preprocessing.

Every encoder yields ``(hidden_states (B, T, d), lengths (B,), has_cls)``: ``lengths`` counts the valid
tokens of each row (audio clips differ in length), ``has_cls`` says whether token 0 is a CLS token.

* Vision (DINOv2, ViT, CLIP/SigLIP vision towers): images are resized to ``image_size`` (bicubic) and
  normalised with the model's mean/std (ImageNet's unless the dir's preprocessor config says otherwise);
  positional embeddings are interpolated to that size, so small CPU-friendly inputs work.
* Whisper encoder: log-mel features padded/truncated to ``audio_max_seconds`` (not Whisper's 30 s); the
  positional table is cut to match, which is what lets short clips through (HF's encoder insists on an
  input of exactly ``2 × max_source_positions`` frames).
* wav2vec2 / HuBERT style (raw waveform): padded to the longest clip with an attention mask.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from uniflow_cli.errors import ModelError

if TYPE_CHECKING:  # pragma: no cover
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SAMPLING_RATE = 16_000
WHISPER_HOP = 160  # samples per mel frame; the encoder's stride-2 conv halves the frame count


@dataclass
class VisionEncoder:
    model: Any
    image_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    has_cls: bool = True
    interpolate: bool = False  # pass interpolate_pos_encoding=True (ViT/CLIP/SigLIP; DINOv2 always does)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def preprocess(self, images: list[Any]) -> dict[str, Any]:
        import numpy as np
        import torch
        from PIL import Image

        from uniflow_cli.data.media import load_image

        arrays = []
        for image in images:
            img = load_image(image).resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
            arrays.append(np.asarray(img, dtype=np.float32) / 255.0)
        pixels = (np.stack(arrays) - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return {"pixel_values": torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))}

    def encode(self, inputs: dict[str, Any]) -> tuple[Any, Any, bool]:
        import torch

        kwargs = {"interpolate_pos_encoding": True} if self.interpolate else {}
        hidden = self.model(pixel_values=inputs["pixel_values"], **kwargs).last_hidden_state
        lengths = torch.full((hidden.shape[0],), hidden.shape[1], dtype=torch.long)
        return hidden, lengths, self.has_cls


@dataclass
class WhisperAudioEncoder:
    model: Any  # transformers WhisperEncoder with its positional table cut to max_positions
    max_seconds: float

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.d_model)

    @property
    def n_samples(self) -> int:
        return int(round(self.max_seconds * SAMPLING_RATE))

    @property
    def n_frames(self) -> int:
        return 2 * self.model.config.max_source_positions

    def preprocess(self, audios: list[Any]) -> dict[str, Any]:
        import torch
        from transformers import WhisperFeatureExtractor

        from uniflow_cli.data.media import load_audio

        extractor = WhisperFeatureExtractor(feature_size=self.model.config.num_mel_bins)
        waves = [load_audio(a)[: self.n_samples] for a in audios]
        feats = extractor(
            waves, sampling_rate=SAMPLING_RATE, padding="max_length", max_length=self.n_samples, truncation=True, return_tensors="pt"
        ).input_features[..., : self.n_frames]
        lengths = torch.tensor([max(1, math.ceil(len(w) / WHISPER_HOP / 2)) for w in waves], dtype=torch.long)
        return {"input_features": feats, "lengths": lengths.clamp(max=self.n_frames // 2)}

    def encode(self, inputs: dict[str, Any]) -> tuple[Any, Any, bool]:
        hidden = self.model(input_features=inputs["input_features"]).last_hidden_state
        return hidden, inputs["lengths"], False


@dataclass
class WaveformAudioEncoder:
    model: Any  # wav2vec2 / HuBERT / any model taking input_values
    extractor: Any
    max_seconds: float

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def preprocess(self, audios: list[Any]) -> dict[str, Any]:
        from uniflow_cli.data.media import load_audio

        waves = [load_audio(a)[: int(self.max_seconds * SAMPLING_RATE)] for a in audios]
        out = self.extractor(waves, sampling_rate=SAMPLING_RATE, padding=True, return_attention_mask=True, return_tensors="pt")
        return {"input_values": out.input_values, "attention_mask": out.attention_mask}

    def encode(self, inputs: dict[str, Any]) -> tuple[Any, Any, bool]:
        hidden = self.model(input_values=inputs["input_values"], attention_mask=inputs["attention_mask"]).last_hidden_state
        lengths = self.model._get_feat_extract_output_lengths(inputs["attention_mask"].sum(-1)).long().clamp(min=1, max=hidden.shape[1])
        return hidden, lengths, False


def cut_whisper_positions(encoder: Any, max_seconds: float) -> Any:
    """Shrink a WhisperEncoder's positional table to ``max_seconds`` (see the module docstring)."""
    import torch

    positions = int(math.ceil(max_seconds * SAMPLING_RATE / WHISPER_HOP / 2))
    full = encoder.embed_positions.weight.shape[0]
    if positions > full:
        raise ModelError(f"audio_max_seconds={max_seconds} needs {positions} positions, the encoder has {full}", fix="lower audio_max_seconds")
    config = copy.deepcopy(encoder.config)
    config.max_source_positions = positions
    encoder.config = config
    encoder.max_source_positions = positions
    # In the table's own dtype, so a bfloat16 encoder stays bfloat16 throughout.
    table = torch.nn.Embedding(positions, encoder.embed_positions.weight.shape[1], dtype=encoder.embed_positions.weight.dtype)
    table.weight.data.copy_(encoder.embed_positions.weight.data[:positions])
    table.requires_grad_(False)
    encoder.embed_positions = table
    return encoder


def _is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def check_hf_dir(path: str | Path, role: str) -> Path:
    p = Path(path).expanduser()
    if not _is_hf_dir(p):
        raise ModelError(
            f"{role} path {p} is not a Hugging Face model directory (no config.json)",
            fix=f"point {role} to a directory saved with save_pretrained (config.json + *.safetensors)",
        )
    return p


def _from_pretrained(auto: Any, path: Path, dtype: torch.dtype | None) -> Any:
    """``auto.from_pretrained`` straight into ``dtype`` (None = float32): no float32 copy of a bfloat16 base."""
    import torch

    # low_cpu_mem_usage: transformers < 5 otherwise builds randomly initialised weights first (≥ 5 always skips that).
    return auto.from_pretrained(path, dtype=dtype or torch.float32, low_cpu_mem_usage=True)


def load_vision_dir(path: Path, image_size: int, dtype: torch.dtype | None = None) -> VisionEncoder:
    """Any local HF vision model that AutoModel loads (DINOv2, ViT, CLIP/SigLIP: their vision tower), in ``dtype``."""
    from transformers import AutoModel

    model = _from_pretrained(AutoModel, path, dtype)
    if hasattr(model, "vision_model"):  # CLIP / SigLIP dual encoders: keep the vision tower only
        model = model.vision_model
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    pre = path / "preprocessor_config.json"
    if pre.is_file():
        cfg = json.loads(pre.read_text(encoding="utf-8"))
        mean = tuple(cfg.get("image_mean", mean))
        std = tuple(cfg.get("image_std", std))
    model_type = getattr(model.config, "model_type", "")
    if not hasattr(model.config, "hidden_size"):
        raise ModelError(f"image encoder {path} ({model_type}) has no hidden_size", fix="use a ViT/DINOv2/CLIP/SigLIP vision model")
    return VisionEncoder(
        model.eval(),
        image_size,
        mean,
        std,
        has_cls="siglip" not in model_type,
        interpolate=model_type not in ("dinov2",),
    )


def load_audio_dir(path: Path, max_seconds: float, dtype: torch.dtype | None = None) -> WhisperAudioEncoder | WaveformAudioEncoder:
    """A local HF Whisper dir (encoder taken, positions cut) or a waveform model (wav2vec2, HuBERT), in ``dtype``."""
    from transformers import AutoConfig, AutoFeatureExtractor, AutoModel

    config = AutoConfig.from_pretrained(path)
    if config.model_type == "whisper":
        model = _from_pretrained(AutoModel, path, dtype)
        encoder = model.get_encoder() if hasattr(model, "get_encoder") else model.encoder
        return WhisperAudioEncoder(cut_whisper_positions(encoder, max_seconds).eval(), max_seconds)
    model = _from_pretrained(AutoModel, path, dtype).eval()
    try:
        extractor = AutoFeatureExtractor.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"audio encoder {path} has no feature extractor config", fix="save the model's processor into the dir too") from exc
    return WaveformAudioEncoder(model, extractor, max_seconds)
