"""Text-to-speech with espeak-ng into 16 kHz mono WAV, cached on disk by (text, voice, speed).

The HeySQuAD recipe: questions spoken by a machine. espeak-ng is a small Debian package; one call
synthesises a short question in ~10 ms, so clips are produced by a few concurrent processes (threads
only wait on subprocesses). Each clip is cached under ``$UNIFLOW_CACHE/data/spoken-qa`` (default
``~/.cache/uniflow``) and written atomically, so concurrent runs can share the cache safely.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from uniflow_cli.errors import DataError, MissingDependencyError

# English voices × espeak variants (male/female/"klatt" timbres) for speaker variety.
VOICES: tuple[str, ...] = (
    "en-us+m1",
    "en-us+f2",
    "en-gb+m3",
    "en-gb+f4",
    "en-gb-scotland+m2",
    "en-029+f3",
    "en-us-nyc+m4",
    "en-gb-x-rp+f1",
)
SPEEDS: tuple[int, ...] = (130, 150, 170, 190)  # words per minute (espeak's default is 175)
CACHE_VERSION = "v1"  # bump when the synthesis recipe changes, so stale clips are never reused

Progress = Callable[[int], None]


def cache_root() -> Path:
    """``$UNIFLOW_CACHE`` or ``~/.cache/uniflow``."""
    env = os.environ.get("UNIFLOW_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "uniflow"


def espeak_binary() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise MissingDependencyError(
            "espeak-ng is not installed (not found on PATH); spoken-qa synthesises its questions with it",
            fix="apt-get install espeak-ng",
        )
    return exe


def clip_path(text: str, voice: str, speed: int) -> Path:
    key = hashlib.sha256(f"{CACHE_VERSION}\0{voice}\0{speed}\0{text}".encode()).hexdigest()
    return cache_root() / "data" / "spoken-qa" / key[:2] / f"{key}.wav"


def _synthesise_one(exe: str, text: str, voice: str, speed: int) -> bytes:
    import soundfile as sf

    from uniflow_cli.data.media import encode_wav, resample

    # The text goes through stdin so a question starting with '-' can never be read as an option.
    proc = subprocess.run(
        [exe, "-v", voice, "-s", str(speed), "--stdout"], input=text.encode(), capture_output=True, check=False
    )
    if proc.returncode != 0 or not proc.stdout:
        raise DataError(
            f"espeak-ng failed for voice {voice!r} on {text!r}: {proc.stderr.decode(errors='replace').strip()}",
            fix="check 'espeak-ng --voices' lists the English voices (apt-get install espeak-ng)",
        )
    wave, sr = sf.read(io.BytesIO(proc.stdout), dtype="float32")
    return encode_wav(resample(wave, sr))


def _cached_or_synth(exe: str | None, text: str, voice: str, speed: int) -> bytes:
    path = clip_path(text, voice, speed)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    assert exe is not None
    data = _synthesise_one(exe, text, voice, speed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the whole clip or none
    return data


def synthesise(
    items: Sequence[tuple[str, str, int]], *, workers: int | None = None, progress: Progress | None = None
) -> list[bytes]:
    """WAV bytes (16 kHz mono PCM16) for each ``(text, voice, speed)``, from the cache when present."""
    missing = [it for it in items if not clip_path(*it).is_file()]
    exe = espeak_binary() if missing else None  # fail before any work, only when synthesis is needed
    workers = workers or max(2, 2 * (os.cpu_count() or 1))
    out: list[bytes] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for data in pool.map(lambda it: _cached_or_synth(exe, *it), items):
            out.append(data)
            if progress:
                progress(1)
    return out
