"""The one sample schema every shard, test split and consumer (training, evaluation) shares.

A row is one question/answer pair in one modality. Media are embedded as bytes so that a shard
directory is self-contained (it can be copied to a client machine alone). Audio stays undecoded
(``Audio(decode=False)``) because datasets' own audio decoding needs torchcodec, which does not work
beside the CPU torch build; :func:`uniflow_cli.data.media.load_audio` decodes it with soundfile.
"""

from __future__ import annotations

from typing import Any

MODALITIES: tuple[str, ...] = ("image", "audio", "text")
SAMPLING_RATE = 16_000
COLUMNS: tuple[str, ...] = ("id", "modality", "question", "answer", "image", "audio", "label")


def features():
    """The ``datasets.Features`` of a shard (built lazily: importing datasets is slow)."""
    import datasets

    return datasets.Features(
        {
            "id": datasets.Value("string"),
            "modality": datasets.Value("string"),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "image": datasets.Image(),
            "audio": datasets.Audio(sampling_rate=SAMPLING_RATE, decode=False),
            "label": datasets.Value("string"),
        }
    )


def make_row(
    *,
    id: str,
    modality: str,
    question: str,
    answer: str,
    image_bytes: bytes | None = None,
    audio_bytes: bytes | None = None,
    label: str | None = None,
) -> dict[str, Any]:
    """One schema row; ``label`` defaults to the answer (the partition label)."""
    if modality not in MODALITIES:
        raise ValueError(f"modality {modality!r} is not one of {MODALITIES}")
    return {
        "id": id,
        "modality": modality,
        "question": question,
        "answer": answer,
        "image": {"bytes": image_bytes, "path": None} if image_bytes is not None else None,
        # A path with a .wav suffix tells any reader the container format of the bytes.
        "audio": {"bytes": audio_bytes, "path": f"{id}.wav"} if audio_bytes is not None else None,
        "label": answer if label is None else label,
    }


def rows_to_dataset(rows: list[dict[str, Any]]):
    """A ``datasets.Dataset`` with the shard schema (column order fixed, so bytes are reproducible).

    The Arrow table is built directly: ``Dataset.from_dict`` would run ``Audio.encode_example``, which
    imports torchcodec even for ready WAV bytes (and torchcodec does not work beside the CPU torch).
    """
    import datasets
    import pyarrow as pa
    from datasets.table import InMemoryTable

    feats = features()
    table = pa.Table.from_pydict({name: [row[name] for row in rows] for name in COLUMNS}, schema=feats.arrow_schema)
    return datasets.Dataset(InMemoryTable(table), info=datasets.DatasetInfo(features=feats))
