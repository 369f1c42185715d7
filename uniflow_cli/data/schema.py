"""The one sample schema every shard, test split and consumer (training, evaluation) shares.

A row is one question/answer pair in one modality; a sentence-pair row (NLI) keeps its second text in
``text_pair`` (None everywhere else). Media are embedded as bytes so that a shard
directory is self-contained (it can be copied to a client machine alone). Audio stays undecoded
(``Audio(decode=False)``) because datasets' own audio decoding needs torchcodec, which does not work
beside the CPU torch build; :func:`uniflow_cli.data.media.load_audio` decodes it with soundfile.
"""

from __future__ import annotations

from typing import Any

MODALITIES: tuple[str, ...] = ("image", "audio", "text")
SAMPLING_RATE = 16_000
# text_pair comes last: shards written before it existed gain it as a null column on read, in the same place.
COLUMNS: tuple[str, ...] = ("id", "modality", "question", "answer", "image", "audio", "label", "text_pair")
OPTIONAL_COLUMNS: tuple[str, ...] = ("text_pair",)  # may be absent from an older shard (read as all None)


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
            "text_pair": datasets.Value("string"),
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
    text_pair: str | None = None,
) -> dict[str, Any]:
    """One schema row; ``label`` defaults to the answer (the partition label); ``text_pair`` is the second
    text of a sentence pair (an NLI hypothesis), None for single texts and every QA row."""
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
        "text_pair": text_pair,
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
    # .get for the optional columns only: a row built by hand before text_pair existed still has every other key.
    table = pa.Table.from_pydict(
        {name: [row.get(name) if name in OPTIONAL_COLUMNS else row[name] for row in rows] for name in COLUMNS}, schema=feats.arrow_schema
    )
    return datasets.Dataset(InMemoryTable(table), info=datasets.DatasetInfo(features=feats))
