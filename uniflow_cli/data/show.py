"""``uniflow data show``: a few samples of a shard as plain dicts, with media previews saved to files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from uniflow_cli.data.build import load_split
from uniflow_cli.data.media import encode_wav, load_audio, load_image
from uniflow_cli.data.schema import SAMPLING_RATE
from uniflow_cli.errors import ConfigError


def show_samples(path: str | Path, *, n: int = 3, preview_dir: Path | None = None) -> tuple[int, list[dict[str, Any]]]:
    """(number of rows, the first ``n`` samples summarised). With ``preview_dir`` (created atomically,
    must not exist) each sample's image is saved as PNG and its audio as 16 kHz WAV there."""
    if n < 1:
        raise ConfigError.invalid("n", n, "must be >= 1", example=3)
    ds = load_split(path)
    # One row of every modality first (a mixed shard shows each kind), then the following rows.
    mods = ds["modality"]
    firsts = sorted({m: i for i, m in reversed(list(enumerate(mods)))}.values())
    picked = firsts[:n] + [i for i in range(len(ds)) if i not in firsts][: max(0, n - len(firsts))]
    rows = [ds[i] for i in sorted(picked)]
    out = []
    media: list[tuple[str, bytes | Any]] = []
    for row in rows:
        item = {k: row[k] for k in ("id", "modality", "question", "answer", "label")}
        item["text_pair"] = row["text_pair"]  # the hypothesis of a sentence pair (None for a single text)
        if row["image"] is not None:
            im = load_image(row["image"])
            item["media"] = f"image {im.width}×{im.height}"
            media.append((f"{row['id']}.png", im))
        elif row["audio"] is not None:
            wave = load_audio(row["audio"])
            item["media"] = f"audio {len(wave) / SAMPLING_RATE:.2f} s, peak {float(abs(wave).max()):.2f}"
            media.append((f"{row['id']}.wav", encode_wav(wave)))
        else:
            item["media"] = "text"
        out.append(item)
    if preview_dir is not None and media:
        from uniflow_cli.atomic import publish_dir

        with publish_dir(Path(preview_dir)) as tmp:
            for name, obj in media:
                if isinstance(obj, bytes):
                    (tmp / name).write_bytes(obj)
                else:
                    obj.save(tmp / name, format="PNG")
        for item, (name, _obj) in zip([i for i in out if i["media"] != "text"], media):
            item["preview"] = str(Path(preview_dir) / name)
    return len(ds), out
