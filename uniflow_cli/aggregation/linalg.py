"""Per-layer linear algebra of federated LoRA aggregation (paper §3.2, Eq. 8–13; Appendix C).

Pure functions on tensors: no paths, no printing. Conventions for one LoRA layer and K clients:
``A_k`` is ``r × d_in``, ``B_k`` is ``d_out × r`` and already carries the client's PEFT scaling relative
to the output's (see :mod:`uniflow_cli.aggregation.core`), ``w`` are normalised client weights. The
target of every method is the weighted full-rank update (Eq. 10)::

    U = Σ_k w_k B_k A_k

which is never formed for real-sized layers: everything below works on the stacked factors
``P = [w_1 B_1 … w_K B_K]`` (d_out × Kr) and ``Q = [A_1; …; A_K]`` (Kr × d_in), so ``U = P Q``, and on
r×r or Kr×Kr Gram matrices. Sums run in (at least) float32; r×r solves and Gram traces in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Tensor = torch.Tensor
Combine = Callable[[Sequence[Tensor], Tensor], Tensor]  # a weighted sum Σ w_k T_k, or its robust replacement (:mod:`.robust`)


def work_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 when any input already is (low-precision storage is promoted)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def weighted_average(tensors: Sequence[Tensor], weights: Tensor) -> Tensor:
    """Σ_k w_k T_k in float32 (float64 for float64 inputs) — Eq. 9 for A, FedAvg for the rest."""
    dtype = work_dtype(*tensors)
    total = torch.zeros(tensors[0].shape, dtype=dtype)
    for tensor, weight in zip(tensors, weights.tolist()):
        total.add_(tensor.to(dtype), alpha=weight)
    return total


def pad_rank(A: Tensor, B: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Zero-pad a LoRA pair to ``rank`` (HetLoRA / paper E.4): extra rows of A and columns of B are 0,
    so ``B A`` is unchanged."""
    r = A.shape[0]
    if r == rank:
        return A, B
    if r > rank:
        raise ValueError(f"cannot pad rank {r} down to {rank}")
    A_pad = torch.zeros((rank, A.shape[1]), dtype=A.dtype)
    A_pad[:r] = A
    B_pad = torch.zeros((B.shape[0], rank), dtype=B.dtype)
    B_pad[:, :r] = B
    return A_pad, B_pad


def stacked_factors(Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Tensor, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """``P = [w_1 B_1 … w_K B_K]`` and ``Q = [A_1; …; A_K]`` with ``P Q = U`` (Eq. 10)."""
    P = torch.cat([B.to(dtype) * w for B, w in zip(Bs, weights.tolist())], dim=1)
    Q = torch.cat([A.to(dtype) for A in As], dim=0)
    return P, Q


def dense_target(Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Tensor) -> Tensor:
    """The dense U = Σ_k w_k B_k A_k (Eq. 10). Only for FedEx's residual and for reference checks.

    Computed as one product of the stacked factors (inner dimension Kr) rather than K rank-r updates:
    the same flops, but one large matrix product instead of K memory-bound passes over d_out × d_in.
    """
    P, Q = stacked_factors(Bs, As, weights, dtype=work_dtype(*Bs, *As))
    return P @ Q


@dataclass(frozen=True)
class RidgeSolve:
    """How Eq. 13 was solved for one layer."""

    branch: str  # "plain" (ĀĀᵀ invertible), "ridge" (λ added), "pinv" (singular and λ = 0: minimum-norm)
    cond: float  # condition number of ĀĀᵀ (inf when singular)


def gram_condition(G: Tensor) -> tuple[float, float, float]:
    """Smallest and largest eigenvalue of a symmetric PSD Gram matrix, and its condition number."""
    evals = torch.linalg.eigvalsh(G.to(torch.float64))
    lo, hi = float(evals[0]), float(evals[-1])
    cond = hi / lo if lo > 0 else math.inf
    return lo, hi, cond


def choose_ridge_branch(G: Tensor, lambda_: float, ridge: str, rcond: float) -> RidgeSolve:
    """Eq. 13's case split. ĀĀᵀ counts as singular when λ_min(ĀĀᵀ) ≤ rcond · λ_max(ĀĀᵀ).

    ``auto``: λ only where singular (the paper's Eq. 13); ``always``: λ everywhere (Table 12 ablation);
    ``never``: plain least squares (minimum-norm via the pseudo-inverse where singular).
    """
    lo, hi, cond = gram_condition(G)
    singular = hi <= 0.0 or lo <= rcond * hi
    if ridge == "always":
        branch = "ridge" if lambda_ > 0 else ("pinv" if singular else "plain")
    elif ridge == "auto":
        branch = ("ridge" if lambda_ > 0 else "pinv") if singular else "plain"
    elif ridge == "never":
        branch = "pinv" if singular else "plain"
    else:
        raise ValueError(f"unknown ridge mode {ridge!r}")
    return RidgeSolve(branch, math.inf if singular else cond)


def solve_right_spd(M: Tensor, G: Tensor, branch: str, lambda_: float, rcond: float) -> tuple[Tensor, str]:
    """X with X·G' = M where G' = G (+ λI for the ridge branch); float64, Cholesky — never an explicit inverse.

    With G' = L Lᵀ the system is two triangular solves from the right (Y Lᵀ = M, then X L = Y), so the
    d_out × r right-hand side is never transposed or copied. Returns X and the branch actually used (a
    numerically non-PD "plain" Gram falls back to "pinv").
    """
    M64, G64 = M.to(torch.float64), G.to(torch.float64)
    if branch == "pinv":
        return M64 @ torch.linalg.pinv(G64, hermitian=True, rtol=rcond), "pinv"
    Gp = G64 + lambda_ * torch.eye(G64.shape[0], dtype=torch.float64) if branch == "ridge" else G64
    L, info = torch.linalg.cholesky_ex(Gp)
    if int(info) != 0:
        return M64 @ torch.linalg.pinv(Gp, hermitian=True, rtol=rcond), "pinv"
    Y = torch.linalg.solve_triangular(L.T, M64, upper=True, left=False)
    return torch.linalg.solve_triangular(L, Y, upper=False, left=False), branch


def target_times_At(A_bar: Tensor, As: Sequence[Tensor], Bs: Sequence[Tensor], weights: Tensor, combine: Combine | None = None) -> Tensor:
    """U Āᵀ = Σ_k w_k B_k (A_k Āᵀ) (d_out × r): r×r products and d_out×r sums, never U, in the inputs' working
    precision (float32, or float64 for float64 inputs). The right-hand side of FedA²'s and LoRA-FAIR's solves.

    ``combine`` replaces the weighted sum over the K terms B_k (A_k Āᵀ) (``--robust``, :mod:`.robust`)."""
    dtype = work_dtype(A_bar, *As, *Bs)
    A_bar_t = A_bar.to(dtype).T
    if combine is not None:
        return combine([B.to(dtype) @ (A.to(dtype) @ A_bar_t) for B, A in zip(Bs, As)], weights)
    M = torch.zeros((Bs[0].shape[0], A_bar.shape[0]), dtype=dtype)
    for B, A, w in zip(Bs, As, weights.tolist()):
        M.addmm_(B.to(dtype), A.to(dtype) @ A_bar_t, alpha=w)
    return M


def fedA2_B(A_bar: Tensor, As: Sequence[Tensor], Bs: Sequence[Tensor], weights: Tensor, *, lambda_: float, ridge: str, rcond: float,
            combine: Combine | None = None) -> tuple[Tensor, RidgeSolve]:
    """FedA²-LoRA's analytical B (Eq. 11–13) without forming any d_out × d_in matrix.

    B = U Āᵀ (ĀĀᵀ + λI)⁻¹ with U Āᵀ = Σ_k w_k B_k (A_k Āᵀ): r×r products and d_out×r sums, in the
    inputs' working precision (float32, or float64 for float64 inputs); the Gram ĀĀᵀ, the Eq. 13
    decision and the solve in float64.
    """
    M = target_times_At(A_bar, As, Bs, weights, combine)
    A_bar64 = A_bar.to(torch.float64)
    G = A_bar64 @ A_bar64.T
    decision = choose_ridge_branch(G, lambda_, ridge, rcond)
    B_new, used = solve_right_spd(M, G, decision.branch, lambda_, rcond)
    return B_new, RidgeSolve(used, decision.cond)


def fedA2_B_dense(A_bar: Tensor, U: Tensor, lambda_: float = 0.0) -> Tensor:
    """The textbook formula B = U Āᵀ (ĀĀᵀ + λI)⁻¹ on a dense U — a reference for tests, never used at scale."""
    A64, U64 = A_bar.to(torch.float64), U.to(torch.float64)
    G = A64 @ A64.T + lambda_ * torch.eye(A64.shape[0], dtype=torch.float64)
    return U64 @ A64.T @ torch.linalg.inv(G)


def truncated_svd_factors(Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The best rank-``rank`` approximation of U (Eckart–Young) as factors (B, A), without forming U.

    U = P Q = (Q_P R_P)(R_Qᵀ Q_Qᵀ) with thin QRs of P and Qᵀ; the SVD of the small core R_P R_Qᵀ gives
    U = (Q_P X) S (Q_Q Y)ᵀ. The singular values are split evenly: B = Q_P X √S, A = √S (Q_Q Y)ᵀ.
    """
    P, Q = stacked_factors(Bs, As, weights)
    QP, RP = torch.linalg.qr(P)
    QQ, RQ = torch.linalg.qr(Q.T)
    X, S, Yh = torch.linalg.svd(RP @ RQ.T)
    k = min(rank, S.shape[0])
    root = S[:k].sqrt()
    B = (QP @ X[:, :k]) * root
    A = root[:, None] * (Yh[:k] @ QQ.T)
    if k < rank:  # fewer non-trivial directions than the rank: pad with zeros
        A, B = pad_rank(A, B, rank)
    return B, A


def lora_fair_B(A_bar: Tensor, B_bar: Tensor, As: Sequence[Tensor], Bs: Sequence[Tensor], weights: Tensor, *, lambda_: float, ridge: str,
                rcond: float, combine: Combine | None = None) -> tuple[Tensor, RidgeSolve]:
    """LoRA-FAIR's corrected B = B̄ + ΔB with ΔB = argmin ‖U − (B̄ + ΔB)Ā‖_F² + λ‖ΔB‖_F², without forming U.

    The gradient in ΔB vanishes where ΔB (ĀĀᵀ + λI) = U Āᵀ − B̄ ĀĀᵀ: FedA²'s system (Eq. 13) with B̄ĀĀᵀ taken
    off its right-hand side, i.e. regularised toward B̄ instead of toward 0 (λ → 0 gives FedA²'s least
    squares). λ is LoRA-FAIR's own regulariser, so ``auto`` and ``always`` both apply it on every layer;
    ``never`` drops it (plain least squares; where ĀĀᵀ is singular the minimum-norm ΔB, so B stays closest
    to B̄). U Āᵀ from r×r products (:func:`target_times_At`); the Gram, the residual and the solve in float64.
    """
    if ridge not in ("auto", "always", "never"):
        raise ValueError(f"unknown ridge mode {ridge!r}")
    M = target_times_At(A_bar, As, Bs, weights, combine)
    A_bar64, B_bar64 = A_bar.to(torch.float64), B_bar.to(torch.float64)
    G = A_bar64 @ A_bar64.T
    residual = M.to(torch.float64) - B_bar64 @ G  # (U − B̄Ā)Āᵀ
    decision = choose_ridge_branch(G, lambda_, "never" if ridge == "never" else "always", rcond)
    delta, used = solve_right_spd(residual, G, decision.branch, lambda_, rcond)
    return B_bar64 + delta, RidgeSolve(used, decision.cond)


def lora_fair_B_dense(A_bar: Tensor, B_bar: Tensor, U: Tensor, lambda_: float = 0.0) -> Tensor:
    """The textbook B̄ + (U − B̄Ā)Āᵀ(ĀĀᵀ + λI)⁻¹ on a dense U — a reference for tests, never used at scale."""
    A64, B64, U64 = A_bar.to(torch.float64), B_bar.to(torch.float64), U.to(torch.float64)
    G = A64 @ A64.T + lambda_ * torch.eye(A64.shape[0], dtype=torch.float64)
    return B64 + (U64 - B64 @ A64) @ A64.T @ torch.linalg.inv(G)


def update_norms(As: Sequence[Tensor], Bs: Sequence[Tensor]) -> Tensor:
    """‖B_k A_k‖_F of every client (float64) from r×r Grams: ‖BA‖_F² = tr((BᵀB)(AAᵀ)) = Σ (BᵀB ∘ AAᵀ)."""
    norms = []
    for A, B in zip(As, Bs):
        A64, B64 = A.to(torch.float64), B.to(torch.float64)
        norms.append(math.sqrt(max(float(((B64.T @ B64) * (A64 @ A64.T)).sum()), 0.0)))  # round-off can dip below 0
    return torch.tensor(norms, dtype=torch.float64)


def norm_weights(As: Sequence[Tensor], Bs: Sequence[Tensor], weights: Tensor) -> Tensor:
    """HetLoRA's sparsity weights for one layer: w_k ‖B_k A_k‖_F / Σ_j w_j ‖B_j A_j‖_F (B_k with its scaling
    folded, so the norm is ‖s_k B_k A_k‖ up to the common s_out, which the normalisation removes).

    A layer where every update is 0 (round 0: B = 0 everywhere) has no norms to weigh by: it keeps ``weights``.
    """
    raw = weights.to(torch.float64) * update_norms(As, Bs)
    total = float(raw.sum())
    return raw / total if total > 0 else weights.to(torch.float64).clone()


def orthonormal_refactor(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
    """FedSVD's re-factorisation of B A (d_out × r times r × d_in) as (UΣ, Vᵀ), without forming B A. Float64.

    Thin QRs B = Q_B R_B and Aᵀ = Q_A R_A give B A = Q_B (R_B R_Aᵀ) Q_Aᵀ; the SVD of the r×r core, X S Yᵀ,
    gives B A = (Q_B X S)(Q_A Y)ᵀ. So A' = (Q_A Y)ᵀ has orthonormal rows — B A's right singular vectors,
    ordered by σ, completed by orthonormal directions where B A has rank < r — and B' = Q_B X S = UΣ, with
    B'A' = B A exactly. A layer narrower than r (d_in or d_out < r) has fewer directions: zero-padded.
    """
    r = A.shape[0]
    QB, RB = torch.linalg.qr(B.to(torch.float64))
    QA, RA = torch.linalg.qr(A.to(torch.float64).T)
    X, S, Yh = torch.linalg.svd(RB @ RA.T, full_matrices=False)
    k = min(r, S.shape[0])
    B_new, A_new = (QB @ X[:, :k]) * S[:k], Yh[:k] @ QA.T
    if k < r:
        A_new, B_new = pad_rank(A_new, B_new, r)
    return B_new, A_new


def relative_error(B_out: Tensor | None, A_out: Tensor, Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Tensor) -> float:
    """‖B_out A_out − U‖_F / ‖U‖_F from Gram matrices only (no d_out × d_in product).

    With P = [B_out, −w_1 B_1, …], Q = [A_out; A_1; …] the difference is P Q and
    ‖P Q‖_F² = tr((PᵀP)(Q Qᵀ)) = Σ (PᵀP ∘ Q Qᵀ); ‖U‖² is the same sum over the client blocks.
    Returns 0 when U = 0 and the output is 0 too, inf when U = 0 but the output is not.
    """
    P_c, Q_c = stacked_factors(Bs, As, weights)
    r = A_out.shape[0]
    P = torch.cat([B_out.to(torch.float64), -P_c], dim=1)
    Q = torch.cat([A_out.to(torch.float64), Q_c], dim=0)
    H = (P.T @ P) * (Q @ Q.T)
    diff2 = float(H.sum())
    target2 = float(H[r:, r:].sum())
    diff2 = max(diff2, 0.0)  # round-off can make an exact zero slightly negative
    if target2 <= 0.0:
        return 0.0 if diff2 <= 0.0 else math.inf
    return math.sqrt(diff2 / target2)
