"""Decode the media of a schema row: images with PIL, audio with soundfile + soxr.

Accepted values are what a shard yields (``datasets.Image`` decodes to ``PIL.Image``; ``Audio(decode=False)``
yields ``{"bytes", "path"}``) and what users hand in (a path, raw bytes, a dict with bytes or path).
Never torchaudio/torchcodec: both fail beside the CPU torch build.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from uniflow_cli.data.schema import SAMPLING_RATE
from uniflow_cli.errors import DataError


def _bytes_or_path(value: Any, kind: str) -> bytes | Path:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (str, Path)):
        return Path(value)
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return bytes(value["bytes"])
        if value.get("path"):
            return Path(value["path"])
    raise DataError(f"no {kind} in value of type {type(value).__name__}", fix=f"pass a {kind} path, bytes or a {{'bytes','path'}} dict")


def load_image(value: Any):
    """Return an RGB ``PIL.Image`` from a PIL image, path, bytes or ``{"bytes","path"}`` dict."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    src = _bytes_or_path(value, "image")
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        where = src if isinstance(src, Path) else f"{len(src)} bytes"
        raise DataError(f"unreadable image {where}: {exc}", fix="check that the file is a PNG/JPEG image") from exc


def resample(wave: np.ndarray, sr: int, target: int = SAMPLING_RATE) -> np.ndarray:
    """Mono float32 at ``target`` Hz (soxr's high-quality resampler; a no-op when rates match)."""
    import soxr

    if wave.ndim == 2:  # soundfile gives frames × channels; average to mono
        wave = wave.mean(axis=1)
    wave = np.ascontiguousarray(wave, dtype=np.float32)
    if sr != target:
        wave = soxr.resample(wave, sr, target).astype(np.float32, copy=False)
    return wave


def load_audio(value: Any, sampling_rate: int = SAMPLING_RATE) -> np.ndarray:
    """Return mono float32 samples in [-1, 1] at ``sampling_rate`` Hz."""
    import soundfile as sf

    if isinstance(value, dict) and value.get("array") is not None:  # an already decoded datasets dict
        return resample(np.asarray(value["array"]), int(value.get("sampling_rate") or sampling_rate), sampling_rate)
    src = _bytes_or_path(value, "audio")
    try:
        wave, sr = sf.read(io.BytesIO(src) if isinstance(src, bytes) else str(src), dtype="float32", always_2d=False)
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        where = src if isinstance(src, Path) else f"{len(src)} bytes"
        raise DataError(f"unreadable audio {where}: {exc}", fix="check that the file is a WAV/FLAC/OGG file") from exc
    return resample(wave, sr, sampling_rate)


def encode_wav(wave: np.ndarray, sampling_rate: int = SAMPLING_RATE) -> bytes:
    """16-bit PCM WAV bytes of a mono float waveform (compact, and readable by every tool)."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(wave, -1.0, 1.0), sampling_rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()
