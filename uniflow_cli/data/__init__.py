"""Data: built-in datasets, user datasets, the shard schema and partitioning into client shards.

Light to import: ``datasets``/``PIL``/``soundfile`` are imported inside the functions that need them.
"""

from uniflow_cli.data.build import (
    PartitionRequest,
    check_partition_info,
    load_split,
    partition,
    plan_partition,
    read_partition_info,
    resolve_source,
    write_partition,
)
from uniflow_cli.data.media import load_audio, load_image
from uniflow_cli.data.partition import SCHEMES, label_entropy, label_histogram, parse_clients, partition_indices
from uniflow_cli.data.schema import COLUMNS, MODALITIES, SAMPLING_RATE, features

__all__ = [
    "COLUMNS",
    "MODALITIES",
    "SAMPLING_RATE",
    "SCHEMES",
    "PartitionRequest",
    "check_partition_info",
    "features",
    "label_entropy",
    "label_histogram",
    "load_audio",
    "load_image",
    "load_split",
    "parse_clients",
    "partition",
    "partition_indices",
    "plan_partition",
    "read_partition_info",
    "resolve_source",
    "write_partition",
]
