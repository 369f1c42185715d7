"""Update defenses against a bad client: norm bounding (Sun et al. 2019) and robust sums (Yin et al. 2018).

Pure functions on tensors, no paths, no printing (definitions and exactness: docs/aggregation.md, "Defenses").

- **Norm bounding** (``--clip-update-norm C``): per layer, a client's update is its ΔW_k − ΔW_start,k (the
  global it started from, in the output's scaling), measured from 2r×2r Grams (:func:`update_norm`) and
  clipped to norm C by :func:`clip_layer`: exactly c·(ΔW_k − ΔW_start,k) in the target U (a rank-2r pair per
  clipped client), and, for the factor averages, the start's factors plus c_F times their deviations, c_F
  the smallest scale at which that pair's own update has norm C. Non-LoRA tensors: :func:`clip_tensor`.
- **Robust sums** (``--robust median|trimmed-mean:β``): :func:`weighted_median` and :func:`trimmed_mean`,
  coordinate-wise, with the signature of :func:`.linalg.weighted_average` they replace (:func:`combiner`).

Importing this module costs no torch (the settings check ``--robust`` with it): torch is imported inside the
functions that compute.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from uniflow_cli.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

ROBUST_KINDS = ("median", "trimmed-mean")
ROBUST_EXAMPLE = "median"


def robust_undefined() -> dict[str, str]:
    """Method → why ``--robust`` has no meaning for it: the registry's ``MethodSpec.robust_undefined``."""
    from uniflow_cli.aggregation.registry import SPECS

    return {name: spec.robust_undefined for name, spec in SPECS.items() if spec.robust_undefined is not None}


_TIE = 1e-12  # relative tolerance of the weighted median's "cumulative weight = 1/2" (round-off in Σ w)


@dataclass(frozen=True)
class RobustSpec:
    """A parsed ``--robust``: ``median``, or ``trimmed-mean`` with its β in (0, 0.5)."""

    kind: str
    beta: float | None = None

    def __str__(self) -> str:
        return self.kind if self.beta is None else f"{self.kind}:{self.beta:g}"

    def trimmed(self, k: int) -> int:
        """Values dropped on each side of a coordinate among ``k`` clients: ⌊βk⌋ (0 for the median)."""
        return 0 if self.beta is None else math.floor(self.beta * k + 1e-9)  # 0.29·100 is 28.999…: still 29

    @property
    def min_clients(self) -> int:
        """The fewest clients the sum is defined for: 3 for the median (of 2 it is their mean), else the
        smallest K with ⌊βK⌋ ≥ 1 (at least one value trimmed on each side; β < 0.5 leaves K − 2⌊βK⌋ ≥ 1)."""
        if self.beta is None:
            return 3
        k = 1
        while self.trimmed(k) < 1 or k - 2 * self.trimmed(k) < 1:
            k += 1
        return k


def parse_robust(value: object, *, field: str = "robust") -> RobustSpec | None:
    """``median`` | ``trimmed-mean:β`` (β in (0, 0.5)) → a RobustSpec; None → None; else one ConfigError."""
    if value is None:
        return None
    text = value.strip() if isinstance(value, str) else value
    if text == "median":
        return RobustSpec("median")
    if isinstance(text, str) and text.split(":", 1)[0] == "trimmed-mean":
        raw = text.split(":", 1)[1] if ":" in text else ""
        try:
            beta = float(raw)
        except ValueError:
            raise ConfigError.invalid(field, value, "needs its trimmed share β in (0, 0.5) after the colon", example="trimmed-mean:0.1") from None
        if not (math.isfinite(beta) and 0 < beta < 0.5):
            raise ConfigError.invalid(field, value, f"has β = {beta:g}, outside (0, 0.5)", example="trimmed-mean:0.1")
        return RobustSpec("trimmed-mean", beta)
    close = difflib.get_close_matches(str(text).split(":", 1)[0], ROBUST_KINDS, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise ConfigError.invalid(field, value, f"is not median or trimmed-mean:β{hint}", example="trimmed-mean:0.1" if close == ["trimmed-mean"] else ROBUST_EXAMPLE)


def robust_methods() -> tuple[str, ...]:
    """The methods ``--robust`` is defined for, in the registry's order."""
    from uniflow_cli.aggregation.registry import METHOD_NAMES

    undefined = robust_undefined()
    return tuple(name for name in METHOD_NAMES if name not in undefined)


def check_robust_method(robust: RobustSpec | None, method: str, *, field: str = "robust") -> None:
    """One ConfigError when ``method`` takes a sum that ``--robust`` cannot replace (why, and who accepts it)."""
    undefined = robust_undefined()
    if robust is not None and method in undefined:
        raise ConfigError.invalid(field, str(robust), f"is not defined for method {method}: {undefined[method]}; methods that "
                                  f"accept it: {', '.join(robust_methods())}", fix="use one of those methods (e.g. fedA2), or aggregate without a robust sum")


def check_robust_clients(robust: RobustSpec | None, k: int, *, field: str = "robust") -> None:
    """One ConfigError when ``k`` clients are too few for ``robust`` (what it needs, and why)."""
    if robust is None or k >= robust.min_clients:
        return
    why = "of fewer it is their mean" if robust.beta is None else f"⌊β·K⌋ = ⌊{robust.beta:g}·{k}⌋ = {robust.trimmed(k)} trims nothing"
    raise ConfigError.invalid(field, str(robust), f"needs at least {robust.min_clients} clients ({why}); {k} given",
                              fix=f"aggregate at least {robust.min_clients} clients, or without a robust sum")


def check_clip_norm(value: object, *, field: str = "clip_update_norm") -> None:
    """C must be a finite number > 0 (None: no clipping)."""
    ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0)
    if not ok:
        raise ConfigError.invalid(field, value, "must be a finite number > 0", example=1.0)


# --------------------------------------------------------------------------------------------------
# Robust sums: coordinate-wise, replacing Σ_k w_k X_k
# --------------------------------------------------------------------------------------------------
_CHUNK = 1 << 22  # K × coordinates sorted per pass: bounds the memory of a large non-LoRA tensor's sort


def _coordinatewise(tensors: Sequence[Tensor], weights: Tensor, reduce: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """``reduce`` (K × n values, K weights → n) over every coordinate, in float64 chunks; the result in the
    inputs' working dtype (float32, or float64 for float64 inputs), as :func:`.linalg.weighted_average`."""
    import torch

    from uniflow_cli.aggregation.linalg import work_dtype

    dtype = work_dtype(*tensors)
    flat = [t.reshape(-1) for t in tensors]
    n = flat[0].numel()
    out = torch.empty(n, dtype=dtype)
    w = weights.to(torch.float64)
    step = max(1, _CHUNK // len(flat))
    for lo in range(0, n, step):
        values = torch.stack([f[lo:lo + step].to(torch.float64) for f in flat])
        out[lo:lo + step] = reduce(values, w).to(dtype)
    return out.reshape(tensors[0].shape)


def _median(values: Tensor, w: Tensor) -> Tensor:
    import torch

    sorted_, order = torch.sort(values, dim=0, stable=True)
    cumulative = torch.cumsum(w[order], dim=0)
    half, tol = float(w.sum()) / 2, _TIE * float(w.sum())
    lower = (cumulative >= half - tol).to(torch.int8).argmax(dim=0, keepdim=True)  # the first index reaching 1/2
    upper = (cumulative > half + tol).to(torch.int8).argmax(dim=0, keepdim=True)  # the first passing it
    return ((sorted_.gather(0, lower) + sorted_.gather(0, upper)) / 2).squeeze(0)


def weighted_median(tensors: Sequence[Tensor], weights: Tensor) -> Tensor:
    """The coordinate-wise weighted median: per coordinate, the value where the clients' cumulative weight (in
    sorted order) reaches 1/2 — the midpoint of the two values around it when it is exactly 1/2 (uniform
    weights, even K: the usual median). Equal inputs give their value exactly."""
    return _coordinatewise(tensors, weights, _median)


def trimmed_mean(tensors: Sequence[Tensor], weights: Tensor, beta: float) -> Tensor:
    """The coordinate-wise β-trimmed weighted mean: per coordinate, the ⌊βK⌋ smallest and ⌊βK⌋ largest
    values are dropped (ties in client order) and the rest averaged with their weights renormalised.
    Uniform weights give Yin et al.'s trimmed mean."""
    m = RobustSpec("trimmed-mean", beta).trimmed(len(tensors))

    def reduce(values: Tensor, w: Tensor) -> Tensor:
        import torch

        sorted_, order = torch.sort(values, dim=0, stable=True)
        kept, kept_w = sorted_[m:len(tensors) - m], w[order[m:len(tensors) - m]]
        return (kept * kept_w).sum(dim=0) / kept_w.sum(dim=0)

    return _coordinatewise(tensors, weights, reduce)


def combiner(robust: RobustSpec | None) -> Callable[[Sequence[Tensor], Tensor], Tensor]:
    """The weighted sum every method takes: Σ w_k X_k (:func:`.linalg.weighted_average`), or the robust one."""
    from uniflow_cli.aggregation import linalg

    if robust is None:
        return linalg.weighted_average
    if robust.beta is None:
        return weighted_median
    beta = robust.beta
    return lambda tensors, weights: trimmed_mean(tensors, weights, beta)


# --------------------------------------------------------------------------------------------------
# Norm bounding
# --------------------------------------------------------------------------------------------------
def _inner(X1: Tensor, Y1: Tensor, X2: Tensor, Y2: Tensor) -> float:
    """⟨X1 Y1, X2 Y2⟩_F = Σ (X1ᵀX2 ∘ Y1Y2ᵀ): r×r products only, float64."""
    import torch

    X1, Y1, X2, Y2 = (t.to(torch.float64) for t in (X1, Y1, X2, Y2))
    return float(((X1.T @ X2) * (Y1 @ Y2.T)).sum())


def update_norm(B: Tensor, A: Tensor, B0: Tensor | None, A0: Tensor | None) -> float:
    """‖B A − B0 A0‖_F (B0 A0 = 0 when None) from the 2r×2r Gram of the stacked pair [B, −B0][A; A0]."""
    import torch

    if B0 is None or A0 is None:
        P, Q = B, A
    else:
        P = torch.cat([B.to(torch.float64), -B0.to(torch.float64)], dim=1)
        Q = torch.cat([A.to(torch.float64), A0.to(torch.float64)], dim=0)
    square = _inner(P, Q, P, Q)
    if not math.isfinite(square):  # a Gram beyond float64 (values near 1e154): the update is as large as it gets
        return math.inf
    return math.sqrt(max(square, 0.0))  # round-off can dip an exact 0 below 0


def factor_scale(B: Tensor, A: Tensor, B0: Tensor, A0: Tensor, bound: float) -> float:
    """The smallest c ∈ (0, 1] at which the pair (A0 + cΔA, B0 + cΔB) has ‖B(c)A(c) − B0A0‖_F = ``bound``
    (1.0 when the whole update is within it).

    B(c)A(c) − B0A0 = cL + c²Q with L = B0ΔA + ΔB A0 and Q = ΔBΔA, so its squared norm is the quartic
    φ(c) = c²‖L‖² + 2c³⟨L,Q⟩ + c⁴‖Q‖² (Grams only). φ is monotone between the roots of φ'(c)/2c =
    ‖L‖² + 3c⟨L,Q⟩ + 2c²‖Q‖²; the first piece that reaches bound² is bisected, keeping φ(c) ≤ bound²."""
    import torch

    dA, dB = A.to(torch.float64) - A0.to(torch.float64), B.to(torch.float64) - B0.to(torch.float64)
    PL, QL = torch.cat([B0.to(torch.float64), dB], dim=1), torch.cat([dA, A0.to(torch.float64)], dim=0)
    a, b, d = _inner(PL, QL, PL, QL), _inner(PL, QL, dB, dA), _inner(dB, dA, dB, dA)

    def phi(c: float) -> float:
        return c * c * (a + 2 * c * b + c * c * d)

    target = bound * bound
    if phi(1.0) <= target:
        return 1.0
    knots = sorted(c for c in _quadratic_roots(2 * d, 3 * b, a) if 0.0 < c < 1.0)
    for lo, hi in zip([0.0, *knots], [*knots, 1.0]):
        if phi(hi) < target:
            continue
        for _ in range(200):  # monotone on [lo, hi]: φ(lo) < target ≤ φ(hi)
            mid = (lo + hi) / 2
            if mid in (lo, hi):
                break
            lo, hi = (mid, hi) if phi(mid) < target else (lo, mid)
        return lo
    return 1.0  # unreachable: φ(1) > target


def _quadratic_roots(p: float, q: float, r: float) -> list[float]:
    """Real roots of p·c² + q·c + r (linear when p = 0)."""
    if p == 0.0:
        return [-r / q] if q != 0.0 else []
    disc = q * q - 4 * p * r
    if disc < 0:
        return []
    root = math.sqrt(disc)
    return [(-q - root) / (2 * p), (-q + root) / (2 * p)]


@dataclass
class ClippedLayer:
    """One layer's clients after clipping: the factors the factor averages take, the exact target pairs
    (None: the factors are the target), each client's pre-clip update norm and its two scales."""

    As: list[Any]
    Bs: list[Any]
    target: tuple[list[Any], list[Any]] | None
    norms: list[float]
    scales: list[float]  # c: the update's scale in the target U (1.0: not clipped)
    factor_scales: list[float]  # c_F: the factors' deviations' scale (= c where a factor is frozen)


def clip_layer(As: Sequence[Tensor | None], Bs: Sequence[Tensor | None], A0s: Sequence[Tensor | None], B0s: Sequence[Tensor | None],
               bound: float, s_out: float, mode: str) -> ClippedLayer:
    """Clip every client's update of one layer to ‖s_out·(ΔW_k − ΔW_start,k)‖_F ≤ ``bound``.

    Factors arrive as the core hands them to the methods (scaling folded into B relative to ``s_out``,
    ranks padded); ``A0s``/``B0s`` are each client's start pair in the same units. ``mode``:
    ``pair`` (A and B trained), ``B`` (A frozen at A0: As may be None), ``A`` (only A uploaded: its deviation
    ‖A_k − A0‖ by its own norm, unscaled — the server never sees B), ``zero`` (the start's ΔW is 0: FLoRA's
    clients train a fresh LoRA on the merged base; B is scaled).
    """
    out = ClippedLayer([], [], None, [], [], [])
    targets: tuple[list[Any], list[Any]] = ([], [])
    for A, B, A0, B0 in zip(As, Bs, A0s, B0s):
        A_new, B_new, pair, norm, c, c_f = _clip_client(A, B, A0, B0, bound, s_out, mode)
        out.As.append(A_new)
        out.Bs.append(B_new)
        targets[0].append(pair[0])
        targets[1].append(pair[1])
        out.norms.append(norm)
        out.scales.append(c)
        out.factor_scales.append(c_f)
    if mode == "pair" and any(c < 1.0 for c in out.scales):
        out.target = targets
    return out


def _clip_client(A: Any, B: Any, A0: Any, B0: Any, bound: float, s_out: float, mode: str) -> tuple[Any, Any, tuple[Any, Any], float, float, float]:
    """(A', B', the exact target pair (B_U, A_U), pre-clip norm, c, c_F) of one client of one layer."""
    import torch

    if mode == "A":
        norm = float(torch.linalg.vector_norm(A.to(torch.float64) - A0.to(torch.float64)))
        c = min(1.0, bound / norm) if norm > 0 else 1.0
        return (A0.to(A.dtype) + (A - A0.to(A.dtype)) * c if c < 1.0 else A), B, (B, A), norm, c, c
    A_eff = A0 if mode == "B" else A
    norm = s_out * update_norm(B, A_eff, None if mode == "zero" else B0, None if mode == "zero" else A0)
    c = min(1.0, bound / norm) if norm > 0 else 1.0  # an overflowing (inf) norm: c = 0, the start's own factors
    if c == 1.0:
        return A, B, (B, A), norm, 1.0, 1.0
    if mode == "zero":
        return A, B * c, (B * c, A), norm, c, c
    if mode == "B":
        B_new = B0.to(B.dtype) + (B - B0.to(B.dtype)) * c
        return A, B_new, (B_new, A0), norm, c, c
    c_f = factor_scale(B, A, B0, A0, bound / s_out) if c > 0.0 else 0.0
    A_new, B_new = A0.to(A.dtype) + (A - A0.to(A.dtype)) * c_f, B0.to(B.dtype) + (B - B0.to(B.dtype)) * c_f
    # ΔW_start + c·(ΔW_k − ΔW_start) = c·B_k A_k + (1 − c)·B0 A0: one rank-2r pair, exact.
    pair = (torch.cat([B * c, B0.to(B.dtype) * (1.0 - c)], dim=1), torch.cat([A, A0.to(A.dtype)], dim=0))
    return A_new, B_new, pair, norm, c, c_f


def clip_tensor(X: Tensor, X0: Tensor, bound: float) -> tuple[Tensor, float, float]:
    """A non-LoRA tensor's deviation from the start clipped by its own norm: (X0 + c(X − X0), ‖X − X0‖_F, c)."""
    import torch

    norm = float(torch.linalg.vector_norm(X.to(torch.float64) - X0.to(torch.float64)))
    c = min(1.0, bound / norm) if norm > 0 else 1.0
    if c == 1.0:
        return X, norm, 1.0
    dtype = torch.float64 if X.dtype == torch.float64 else torch.float32
    return X0.to(dtype) + (X.to(dtype) - X0.to(dtype)) * c, norm, c


# --------------------------------------------------------------------------------------------------
# What the report says
# --------------------------------------------------------------------------------------------------
@dataclass
class DefenseLog:
    """Per layer (LoRA module or non-LoRA key): every client's pre-clip norm and scales, in client order."""

    labels: list[str]
    bound: float | None
    robust: RobustSpec | None
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, layer: str, norms: Sequence[float], scales: Sequence[float], factor_scales: Sequence[float] | None = None) -> None:
        self.rows.append({"layer": layer, "clipped": sum(c < 1.0 for c in scales), "update_norms": list(norms), "scales": list(scales),
                          "factor_scales": list(factor_scales if factor_scales is not None else scales)})

    def clipped_clients(self) -> list[dict[str, Any]]:
        """The clients clipped in at least one layer: how many layers, their largest pre-clip norm."""
        rows = []
        for k, label in enumerate(self.labels):
            hits = [row for row in self.rows if row["scales"][k] < 1.0]
            if hits:
                rows.append({"client": label, "layers": len(hits), "of": len(self.rows), "max_update_norm": max(r["update_norms"][k] for r in hits)})
        return rows

    def summary(self) -> dict[str, Any]:
        """For the global's summary and ``--json``: the settings and who was clipped."""
        return {"clip_update_norm": self.bound, "robust": str(self.robust) if self.robust else None,
                "clipped_clients": [row["client"] for row in self.clipped_clients()]}

    def report(self) -> dict[str, Any]:
        """For ``--report``: the summary, the clipped clients and every layer's row."""
        finite = lambda v: v if math.isfinite(v) else None
        rows = [{**row, "update_norms": [finite(v) for v in row["update_norms"]]} for row in self.rows]
        clipped = [{**row, "max_update_norm": finite(row["max_update_norm"])} for row in self.clipped_clients()]
        return {**self.summary(), "clipped": clipped, "layers": rows}
