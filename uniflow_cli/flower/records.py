"""Adapters ↔ Flower records. Tensors travel as float32 arrays under their PEFT key names.

float32 because it is what uniflow stores and fuses in (an ArrayRecord cannot carry bfloat16), and
because the round trip float32 → numpy → float32 is exact: that is what makes the Flower path
byte-identical to the file-drop path. Keys are inserted in sorted order so that a reply and the global
line up position by position (Flower's server-side DP clipping subtracts them by position).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord

from uniflow_cli.adapters import AdapterMeta, LoadedAdapter
from uniflow_cli.errors import AdapterError

HEADER_KEY = "uniflow.global"  # in the train ConfigRecord: the global's metadata (JSON)
HISTORY_KEY = "uniflow-history"  # ArrayRecord: earlier globals that fedex/flora fold into the base
REPLY_KEY = "uniflow"  # ConfigRecord in a client's reply: client id, base fingerprint, peft config


def tensors_to_record(tensors: Mapping[str, Any]) -> ArrayRecord:
    import torch

    record = ArrayRecord()
    for key in sorted(tensors):
        record[key] = Array(tensors[key].detach().to("cpu", torch.float32).contiguous().numpy())
    return record


def record_to_tensors(record: ArrayRecord, *, where: str = "message") -> dict[str, Any]:
    import numpy as np
    import torch

    out = {}
    for key in record.keys():
        array = record[key].numpy()
        if array.dtype != np.float32:
            raise AdapterError(f"{where}: array {key!r} is {array.dtype}, uniflow exchanges float32", fix="send float32 arrays (uniflow's ClientApp does)")
        out[key] = torch.from_numpy(np.array(array, copy=True))
    return out


def global_header(adapter: LoadedAdapter, *, round_: int, method: str, history: Sequence[tuple[int, LoadedAdapter]] = ()) -> str:
    """What a client needs besides the arrays to rebuild the global exactly (JSON for a ConfigRecord)."""
    meta = adapter.meta
    return json.dumps(
        {
            "round": round_,
            "method": method,
            "base_fingerprint": meta.base_fingerprint if meta is not None else None,
            "peft_config": adapter.peft_config,
            "history": {str(r): h.peft_config for r, h in history},
        },
        sort_keys=True,
    )


def history_record(history: Sequence[tuple[int, LoadedAdapter]], method: str) -> ArrayRecord | None:
    """fedex: every earlier residual; flora: every earlier (merged-into-base) global. Else nothing."""
    payload: dict[str, Any] = {}
    for r, adapter in history:
        if method == "fedex" and adapter.residual:
            payload.update({f"{r}/residual/{k}": v for k, v in adapter.residual.items()})
        elif method == "flora":
            payload.update({f"{r}/lora/{k}": v for k, v in adapter.tensors.items()})
    return tensors_to_record(payload) if payload else None


def decode_global(config: ConfigRecord, arrays: ArrayRecord, history: ArrayRecord | None) -> tuple[LoadedAdapter, list[tuple[int, LoadedAdapter]], int, str]:
    """The inverse of the server's encoding: (global adapter, history, its round t, method)."""
    if HEADER_KEY not in config:
        raise AdapterError(f"the train message has no {HEADER_KEY!r} config entry", fix="run the ServerApp of uniflow (uniflow_cli.flower.server_app)")
    header = json.loads(str(config[HEADER_KEY]))
    meta = AdapterMeta(role="global", base_fingerprint=header["base_fingerprint"], round=int(header["round"]), method=header["method"])
    start = LoadedAdapter(None, dict(header["peft_config"]), record_to_tensors(arrays, where="global"), meta)
    rounds: dict[int, dict[str, dict[str, Any]]] = {}
    if history is not None:
        for key, tensor in record_to_tensors(history, where="history").items():
            r, kind, name = key.split("/", 2)
            rounds.setdefault(int(r), {"residual": {}, "lora": {}})[kind][name] = tensor
    past = []
    for r in sorted(int(k) for k in header["history"]):
        parts = rounds.get(r, {"residual": {}, "lora": {}})
        past.append((r, LoadedAdapter(None, dict(header["history"][str(r)]), parts["lora"], None, parts["residual"] or None)))
    return start, past, int(header["round"]), str(header["method"])
