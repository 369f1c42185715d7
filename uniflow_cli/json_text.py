"""JSON every reader accepts: NaN and ±inf become null (Python's ``json`` would write ``NaN``, which jq and
``JSON.parse`` reject), keys become strings. Used for ``--json`` output (cli/console.py) and sweep rows."""

from __future__ import annotations

import math
from typing import Any


def strict(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None, recursively (dicts, lists, tuples)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value
