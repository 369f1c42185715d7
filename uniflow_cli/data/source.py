"""A dataset ready to be partitioned: cheap metadata for every row, media fetched only on demand.

Partitioning picks indices from labels alone; only the chosen rows are then materialised (images
read, questions synthesised), so asking for 2,000 spoken questions never synthesises 28,000.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from uniflow_cli.errors import DataError

# Row roles: a row may go to training, to the test set, or (no predefined split) either.
EITHER, TRAIN, TEST = 0, 1, 2

Progress = Callable[[int], None]
Fetch = Callable[[Sequence[int], "Progress | None"], list[dict[str, Any]]]
Check = Callable[[Sequence[int]], None]


@dataclass
class Source:
    """One input dataset. ``fetch(indices, progress)`` returns schema rows for those local indices;
    ``check(indices)``, if set, raises for rows whose media ``fetch`` would refuse, without reading them."""

    name: str
    modality: str
    kind: str  # "builtin" | "user"
    questions: list[str]
    answers: list[str]
    roles: np.ndarray  # int8 per row: EITHER / TRAIN / TEST
    fetch: Fetch
    label_columns: dict[str, list[str]] = field(default_factory=dict)
    path: str | None = None
    check: Check | None = None

    def __post_init__(self) -> None:
        self.label_columns.setdefault("answer", self.answers)

    def __len__(self) -> int:
        return len(self.questions)

    def labels(self, column: str | None) -> list[str]:
        """The partition labels (``column`` None → the answer)."""
        column = column or "answer"
        if column not in self.label_columns:
            raise DataError(
                f"label column {column!r} not in dataset {self.name} (present: {', '.join(sorted(self.label_columns))})",
                fix="pass one of those as --label-column",
            )
        return self.label_columns[column]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "modality": self.modality,
            "path": self.path,
            "rows": len(self),
            "predefined_test_rows": int((self.roles == TEST).sum()),
        }
