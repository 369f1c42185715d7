"""The ``--plot`` heat map: share of each label in each client's shard (rows = clients)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MAX_LABELS = 30  # beyond this the columns are unreadable; the most frequent labels overall are shown


def plot_label_shares(info: dict[str, Any], path: Path) -> Path:
    """Write a PNG heat map from a ``partition.json`` summary; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    clients = info["clients"]
    totals: dict[str, int] = {}
    for c in clients:
        for label, n in c["label_histogram"].items():
            totals[label] = totals.get(label, 0) + n
    labels = [k for k, _ in sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))][:MAX_LABELS]
    share = np.array(
        [[c["label_histogram"].get(lab, 0) / max(c["count"], 1) for lab in labels] for c in clients], dtype=float
    )
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(labels) + 2), max(3.0, 0.3 * len(clients) + 1.5)))
    im = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(float(share.max()), 1e-9))
    ax.set_xticks(range(len(labels)), labels, rotation=70, fontsize=7)
    ax.set_yticks(range(len(clients)), [f"{c['id']} ({'+'.join(c['modalities'])})" for c in clients], fontsize=7)
    ax.set_xlabel("label" + (f" (top {MAX_LABELS} of {len(totals)})" if len(totals) > MAX_LABELS else ""))
    ax.set_ylabel("client")
    alpha = f", alpha={info['alpha']}" if info.get("alpha") is not None else ""
    ax.set_title(f"Label share per client ({info['scheme']}{alpha}, seed {info['seed']})", fontsize=9)
    fig.colorbar(im, ax=ax, label="share of the client's samples")
    fig.tight_layout()
    # No metadata (software version/date) in the file: the same partition gives the same PNG bytes.
    fig.savefig(path, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path
