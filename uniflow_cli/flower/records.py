"""Adapters ↔ Flower records. Tensors travel as float32 arrays under their PEFT key names.

float32 because it is what uniflow stores and fuses in (an ArrayRecord cannot carry bfloat16), and
because the round trip float32 → numpy → float32 is exact: that is what makes the Flower path
byte-identical to the file-drop path. Keys are inserted in sorted order so that a reply and the global
line up position by position (Flower's server-side DP clipping subtracts them by position).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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


def history_id(adapter: LoadedAdapter, round_: int) -> str:
    """The identity of a published global as the server wrote it: the sha256 of its tensors (and residual) file.

    A node compares it with the copy in its cache; it never recomputes it, so nodes need not serialise
    byte-identically to the server (another safetensors version) for the cache to work.
    """
    meta = adapter.meta
    if meta is None or not meta.sha256:
        raise AdapterError(f"the global of round {round_} carries no sha256 in its uniflow.json", fix="re-publish it with uniflow aggregate")
    return f"{meta.sha256}/{meta.residual_sha256 or '-'}"


def global_header(adapter: LoadedAdapter, *, round_: int, method: str, history: Sequence[tuple[int, LoadedAdapter]] = ()) -> str:
    """What a client needs besides the arrays to rebuild the global exactly (JSON for a ConfigRecord).

    ``history`` names every earlier global the client folds into its base (fedex, flora) with its
    identity; the arrays of only those the node does not hold yet travel in the history record.
    """
    meta = adapter.meta
    return json.dumps(
        {
            "round": round_,
            "method": method,
            "base_fingerprint": meta.base_fingerprint if meta is not None else None,
            "peft_config": adapter.peft_config,
            "history": {str(r): {"peft_config": h.peft_config, "id": history_id(h, r)} for r, h in history},
        },
        sort_keys=True,
    )


def history_record(history: Sequence[tuple[int, LoadedAdapter]]) -> ArrayRecord | None:
    """Whole earlier globals (LoRA tensors + fedex's residual) under ``<round>/lora/`` and ``<round>/residual/``."""
    payload: dict[str, Any] = {}
    for r, adapter in history:
        payload.update({f"{r}/lora/{k}": v for k, v in adapter.tensors.items()})
        payload.update({f"{r}/residual/{k}": v for k, v in (adapter.residual or {}).items()})
    return tensors_to_record(payload) if payload else None


@dataclass
class ReceivedGlobal:
    """A train message decoded: the global to start from, and the earlier globals the header names."""

    start: LoadedAdapter
    round: int
    method: str
    history: dict[int, tuple[dict[str, Any], str]]  # round → (peft config, identity): all a client must fold
    sent: dict[int, LoadedAdapter]  # round → the earlier globals whose arrays came with this message


def decode_global(config: ConfigRecord, arrays: ArrayRecord, history: ArrayRecord | None) -> ReceivedGlobal:
    """The inverse of the server's encoding."""
    if HEADER_KEY not in config:
        raise AdapterError(f"the train message has no {HEADER_KEY!r} config entry", fix="run the ServerApp of uniflow (uniflow_cli.flower.server_app)")
    header = json.loads(str(config[HEADER_KEY]))
    meta = AdapterMeta(role="global", base_fingerprint=header["base_fingerprint"], round=int(header["round"]), method=header["method"])
    start = LoadedAdapter(None, dict(header["peft_config"]), record_to_tensors(arrays, where="global"), meta)
    named = {int(r): (dict(entry["peft_config"]), str(entry["id"])) for r, entry in header["history"].items()}
    parts: dict[int, dict[str, dict[str, Any]]] = {}
    if history is not None:
        for key, tensor in record_to_tensors(history, where="history").items():
            r, kind, name = key.split("/", 2)
            parts.setdefault(int(r), {"lora": {}, "residual": {}})[kind][name] = tensor
    unnamed = sorted(set(parts) - set(named))
    if unnamed:
        raise AdapterError(f"the train message carries arrays of round(s) {unnamed} that its header does not name", fix="run the ServerApp of uniflow")
    sent = {}
    for r, got in parts.items():
        global_meta = AdapterMeta(role="global", base_fingerprint=header["base_fingerprint"], round=r, method=header["method"])
        sent[r] = LoadedAdapter(None, named[r][0], got["lora"], global_meta, got["residual"] or None)
    return ReceivedGlobal(start, int(header["round"]), str(header["method"]), named, sent)
