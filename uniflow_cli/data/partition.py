"""Pure index splitting for federated partitions: labels in, per-client index arrays out. No I/O.

Schemes (the usual federated-learning recipes):

* ``iid`` — a uniform random split.
* ``dirichlet`` — label skew: each client k draws label proportions p_k ~ Dir(alpha·1) and fills its
  quota by sampling labels from p_k without replacement from the pool (labels that run out are
  dropped and p_k renormalised; clients take turns in chunks so none gets only leftovers). Smaller ``alpha`` → fewer labels per client. Quotas are exact, so
  clients still hold the requested number of samples (the paper's 2,000 per client).
* ``quantity`` — size skew: client sizes ∝ Dir(alpha·1) (each at least one sample), labels iid.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import numpy as np

from uniflow_cli.errors import ConfigError, DataError, UsageError

SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "quantity")
_ROUNDS = 20  # dirichlet: clients fill their quotas in this many interleaved turns


def even_sizes(total: int, num_clients: int) -> list[int]:
    """``total`` split into ``num_clients`` sizes differing by at most one (larger first)."""
    base, extra = divmod(total, num_clients)
    return [base + (1 if k < extra else 0) for k in range(num_clients)]


def _check(n: int, num_clients: int, scheme: str, alpha: float) -> None:
    if scheme not in SCHEMES:
        raise UsageError(f"unknown partition scheme {scheme!r}", fix=f"use one of: {', '.join(SCHEMES)}")
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ConfigError.invalid("num_clients", num_clients, "must be >= 1", example=5)
    if n == 0:
        raise DataError("the dataset is empty (0 samples to partition)", fix="check the dataset path and its split")
    if num_clients > n:
        raise DataError(
            f"more clients ({num_clients}) than samples ({n})", fix=f"use at most {n} clients or a larger dataset"
        )
    if scheme in ("dirichlet", "quantity") and not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ConfigError.invalid("alpha", alpha, "must be a finite number > 0 (smaller = more skew)", example=0.5)


def _quantity_sizes(total: int, num_clients: int, alpha: float, rng: np.random.Generator) -> list[int]:
    # Each client gets one sample for sure, the rest is shared by Dirichlet proportions; rounding by
    # largest remainder keeps the sum exact.
    p = rng.dirichlet(np.full(num_clients, float(alpha)))
    if not np.all(np.isfinite(p)) or p.sum() <= 0:  # tiny alpha can underflow to all zeros
        p = np.eye(num_clients)[rng.integers(num_clients)]
    spare = total - num_clients
    raw = p / p.sum() * spare
    sizes = np.floor(raw).astype(np.int64)
    short = spare - int(sizes.sum())
    order = np.argsort(-(raw - sizes), kind="stable")
    sizes[order[:short]] += 1
    return [int(s) + 1 for s in sizes]


def _dirichlet_fill(
    codes: np.ndarray, num_classes: int, sizes: Sequence[int], alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    pools = [rng.permutation(np.flatnonzero(codes == c)) for c in range(num_classes)]
    taken = np.zeros(num_classes, dtype=np.int64)
    avail = np.array([len(p) for p in pools], dtype=np.int64)
    props = np.nan_to_num(rng.dirichlet(np.full(num_classes, float(alpha)), size=len(sizes)), nan=0.0)
    parts: list[list[np.ndarray]] = [[] for _ in sizes]
    need = np.array(sizes, dtype=np.int64)
    # Clients take turns in small chunks: filled one after another, the first client would pick from the
    # full pool and the last only from leftovers (a visible order bias when the pool is tight).
    chunk = max(1, -(-max(sizes) // _ROUNDS))
    while need.sum() > 0:
        for k in range(len(sizes)):
            want = int(min(chunk, need[k]))
            while want > 0:
                p = props[k] * (avail > 0)
                if p.sum() <= 0:  # this client's labels ran out: continue with what is left, in proportion
                    p = avail.astype(np.float64)
                counts = np.minimum(rng.multinomial(want, p / p.sum()), avail)
                for c in np.flatnonzero(counts):
                    parts[k].append(pools[c][taken[c] : taken[c] + counts[c]])
                taken += counts
                avail -= counts
                got = int(counts.sum())
                want -= got
                need[k] -= got
    out = [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts]
    return out


def partition_indices(
    labels: Sequence[Hashable],
    num_clients: int,
    *,
    scheme: str = "iid",
    alpha: float = 0.5,
    sizes: int | Sequence[int] | None = None,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split indices ``0..len(labels)-1`` among ``num_clients`` clients; returns sorted int64 arrays.

    ``sizes``: per-client sample counts (an int means the same for all; ``None`` uses every sample,
    split evenly). For ``quantity`` only the total ``sum(sizes)`` matters; it is re-divided with
    Dirichlet(``alpha``) proportions. The arrays are disjoint; unused samples (``sum(sizes) < n``)
    are left out. Same inputs and seed → same output.
    """
    n = len(labels)
    _check(n, num_clients, scheme, alpha)
    if sizes is None:
        sizes = even_sizes(n, num_clients)
    elif isinstance(sizes, (int, np.integer)):
        sizes = [int(sizes)] * num_clients
    sizes = [int(s) for s in sizes]
    if len(sizes) != num_clients:
        raise UsageError(f"{len(sizes)} sizes given for {num_clients} clients", fix="give one size per client")
    if any(s < 1 for s in sizes):
        raise UsageError(f"client sizes {sizes} must all be >= 1", fix="ask for at least one sample per client")
    total = sum(sizes)
    if total > n:
        raise DataError(
            f"{num_clients} clients × requested sizes need {total} samples but only {n} are available",
            fix=f"lower the per-client count to at most {n // num_clients}, or add data",
        )
    rng = np.random.default_rng(seed)
    if scheme == "quantity":
        sizes = _quantity_sizes(total, num_clients, alpha, rng)
    if scheme in ("iid", "quantity"):
        perm = rng.permutation(n)[:total]
        bounds = np.cumsum([0, *sizes])
        return [np.sort(perm[bounds[k] : bounds[k + 1]]).astype(np.int64) for k in range(num_clients)]
    # dirichlet: classes ordered by their string form, so the result does not depend on input order of labels
    classes = sorted({str(x) for x in labels})
    index = {c: i for i, c in enumerate(classes)}
    codes = np.fromiter((index[str(x)] for x in labels), dtype=np.int64, count=n)
    return [a.astype(np.int64) for a in _dirichlet_fill(codes, len(classes), sizes, alpha, rng)]


def label_histogram(labels: Sequence[Hashable], indices: np.ndarray) -> dict[str, int]:
    """``{label: count}`` of one client's samples, most frequent first (ties by label)."""
    counts: dict[str, int] = {}
    for i in indices:
        key = str(labels[int(i)])
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def label_entropy(labels: Sequence[Hashable], indices: np.ndarray) -> float:
    """Shannon entropy (bits) of one client's label distribution: low = skewed."""
    counts = np.array(list(label_histogram(labels, indices).values()), dtype=np.float64)
    if counts.sum() == 0:
        return 0.0
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def parse_clients(spec: str) -> list[tuple[str, int]]:
    """Parse ``"image:5,audio:5,mixed:3"`` into ``[("image", 5), ("audio", 5), ("mixed", 3)]``."""
    kinds = ("image", "audio", "text", "mixed")
    out: list[tuple[str, int]] = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        kind, sep, count = part.partition(":")
        kind = kind.strip().lower()
        if not sep or kind not in kinds or not count.strip().isdigit() or int(count) < 1:
            raise UsageError(
                f"bad --clients entry {part!r}", fix=f"write KIND:COUNT with KIND in {'|'.join(kinds)}, e.g. image:5,audio:5"
            )
        if any(k == kind for k, _ in out):
            raise UsageError(f"--clients names {kind!r} twice", fix="give each kind once, e.g. image:5,audio:5")
        out.append((kind, int(count)))
    if not out:
        raise UsageError(f"--clients {spec!r} names no clients", fix="e.g. --clients image:5,audio:5")
    return out
