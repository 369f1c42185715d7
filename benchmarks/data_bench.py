"""Data benchmarks: spoken-question synthesis and partitioning speed.

    .venv/bin/python benchmarks/data_bench.py                # all (≈1 min on 2 cores)
    .venv/bin/python benchmarks/data_bench.py --spoken 200   # quicker

Measures (each in a fresh temporary cache/output, so nothing is reused between runs):
1. spoken-qa: synthesise N questions with espeak-ng into 16 kHz WAV (cold cache), then the same again (warm).
2. partition_indices on 40,000 labels into 20 clients (iid, dirichlet alpha 0.5, quantity), pure index math.
3. ``uniflow partition`` end to end: easy-vqa + text-qa, 10 image + 10 text clients × 2,000 rows = 40,000
   rows + 2 × 200 test rows written as HF datasets (read PNGs, build Arrow, save_to_disk, atomic publish).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def _t(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bench_spoken(n: int, workers: int | None) -> None:
    from uniflow_cli.data import builtin

    with tempfile.TemporaryDirectory() as cache:
        os.environ["UNIFLOW_CACHE"] = cache
        src = builtin.spoken_qa(0, workers=workers)
        idx = np.random.default_rng(0).choice(len(src), size=n, replace=False).tolist()
        cold, rows = _t(lambda: src.fetch(idx))
        warm, _ = _t(lambda: src.fetch(idx))
        seconds = sum((len(r["audio"]["bytes"]) - 44) / 2 / 16_000 for r in rows)
        mb = sum(len(r["audio"]["bytes"]) for r in rows) / 1e6
    print(
        f"spoken-qa: {n} questions, workers={workers or 'auto'}: cold {cold:.1f} s ({1000 * cold / n:.1f} ms/question), "
        f"warm (cached) {warm:.2f} s; {seconds / 60:.1f} min of audio, {mb:.0f} MB WAV"
    )


def bench_indices(n: int, clients: int) -> None:
    from uniflow_cli.data.partition import label_entropy, partition_indices

    labels = [f"c{i}" for i in np.random.default_rng(0).integers(0, 13, size=n)]
    for scheme in ("iid", "dirichlet", "quantity"):
        dt, parts = _t(lambda: partition_indices(labels, clients, scheme=scheme, alpha=0.5, seed=0))
        ent = np.mean([label_entropy(labels, p) for p in parts])
        print(f"partition_indices: {n} rows → {clients} clients, {scheme}: {1000 * dt:.1f} ms (mean label entropy {ent:.2f} bits)")


def bench_end_to_end(clients: int, per_client: int) -> None:
    from uniflow_cli.data import PartitionRequest, partition

    with tempfile.TemporaryDirectory() as tmp:
        req = PartitionRequest(
            datasets=["easy-vqa", "text-qa"], clients=[("image", clients // 2), ("text", clients - clients // 2)],
            scheme="dirichlet", alpha=0.5,
            train_per_client=per_client, test_per_modality=200, seed=0,
        )
        dt, _ = _t(lambda: partition(req, Path(tmp) / "data"))
        size = sum(f.stat().st_size for f in (Path(tmp) / "data").rglob("*") if f.is_file()) / 1e6
    print(f"uniflow partition easy-vqa + text-qa (dirichlet 0.5): {clients} clients × {per_client} rows (+200 test): {dt:.1f} s, {size:.0f} MB written")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spoken", type=int, default=2000, help="spoken questions to synthesise (0: skip)")
    ap.add_argument("--workers", type=int, default=None, help="concurrent espeak-ng processes (default 2 × cores)")
    ap.add_argument("--rows", type=int, default=40_000)
    ap.add_argument("--clients", type=int, default=20)
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} CPU cores")
    if args.spoken:
        bench_spoken(args.spoken, args.workers)
    bench_indices(args.rows, args.clients)
    bench_end_to_end(args.clients, args.rows // args.clients)


if __name__ == "__main__":
    main()
