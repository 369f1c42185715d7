"""One function per aggregation method, each fusing ONE LoRA layer, bound to its spec (:mod:`.registry`).

Every method receives the clients' factors of a layer, rank-padded and with each client's PEFT scaling
folded into B relative to the output's scaling, so that for every method the published adapter's
ΔW = s_out · B · A is exactly what the method defines (design table):

| method | global A | global B |
|---|---|---|
| fedit | Σ w_k A_k | Σ w_k B_k |
| ffa   | A_0 (frozen) | Σ w_k B_k |
| fedsa | Σ w_k A_k | — (clients keep their own B) |
| feddpa | Σ w_k A_k | Σ w_k B_k (the global adapter; each client's local adapter never leaves it) |
| fedex | Σ w_k A_k | Σ w_k B_k, plus the dense residual U − B̄Ā folded into W_0 |
| fedA2 | Ā = Σ w_k A_k | U Āᵀ (ĀĀᵀ + λI)⁻¹ (Eq. 13) |
| svd   | top-r factors of U | |
| flora | stack [w_k A_k] | stack [B_k] (rank Σ r_k, to be merged into the base) |
| lora-fair | Ā = Σ w_k A_k | B̄ + (U − B̄Ā)Āᵀ (ĀĀᵀ + λI)⁻¹ (FedA²'s solve regularised toward B̄) |
| flexlora | top-r_max factors of U (as svd); each client starts from its top r_k | |
| hetlora | Σ p_k A_k, p_k ∝ w_k ‖B_k A_k‖_F | Σ p_k B_k; each client starts from the first r_k components |
| fedsvd | Vᵀ of B̄ A_start = UΣVᵀ (orthonormal rows) | UΣ, with B̄ = Σ w_k B_k (A frozen on the clients) |
| rolora, odd rounds | A_start (frozen) | Σ w_k B_k (as ffa) |
| rolora, even rounds | Σ w_k A_k | B_start (frozen) |

Every Σ w_k X_k above is ``x.combine`` and every U is read from ``x.UBs``/``x.UAs``: the seam of the update
defenses (:mod:`.robust`, docs/aggregation.md "Defenses") — robust sums, and the exactly clipped target.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from uniflow_cli.aggregation import linalg
from uniflow_cli.aggregation.registry import SPECS, MethodSpec

Tensor = torch.Tensor


@dataclass(frozen=True)
class LayerInputs:
    As: Sequence[Tensor | None]  # r_max × d_in each (None where a client did not upload A)
    Bs: Sequence[Tensor | None]  # d_out × r_max each, scaling folded (None where not uploaded)
    weights: Tensor  # normalised, float64
    start_A: Tensor | None  # the A of the global the clients started from (FFA)
    lambda_: float
    ridge: str
    rcond: float
    # The one seam of the defenses (:mod:`.robust`): every weighted sum a method takes is ``combine`` (Σ w_k X_k,
    # or a robust sum), and its target U = Σ w_k B_k A_k is read from ``UBs``/``UAs`` — the factors themselves,
    # or, with clipped clients, (B_k, A_k) pairs of rank up to 2r whose products are the clipped ΔW_k exactly.
    combine: Callable[[Sequence[Tensor], Tensor], Tensor] = linalg.weighted_average
    target: tuple[Sequence[Tensor], Sequence[Tensor]] | None = None  # (UBs, UAs)
    start_B: Tensor | None = None  # the B of the global the clients started from, scaling folded (RoLoRA's A rounds)

    @property
    def UBs(self) -> Sequence[Tensor]:
        return self.target[0] if self.target is not None else self.Bs  # type: ignore[return-value]

    @property
    def UAs(self) -> Sequence[Tensor]:
        return self.target[1] if self.target is not None else self.As  # type: ignore[return-value]


@dataclass
class LayerOutput:
    A: Tensor
    B: Tensor | None
    residual: Tensor | None = None  # FedEx: U − B A, in the output's (unscaled) units
    branch: str = "-"
    cond: float | None = None


def _fedit(x: LayerInputs) -> LayerOutput:
    return LayerOutput(x.combine(x.As, x.weights), x.combine(x.Bs, x.weights))


def _ffa(x: LayerInputs) -> LayerOutput:
    # A is frozen at its initial value on every client; core._plan checked that it really is.
    A = x.start_A if x.start_A is not None else x.As[0]
    return LayerOutput(A.to(linalg.work_dtype(A)).clone(), x.combine(x.Bs, x.weights))


def _frozen_B(x: LayerInputs) -> LayerOutput:
    # RoLoRA's A rounds: every client trained A under the start's B (never sent), so Σ w_k B A_k = B Ā exactly.
    A = x.combine(x.As, x.weights)
    return LayerOutput(A, x.start_B.to(A.dtype).clone())  # type: ignore[union-attr] - core checked the start has it


def _fedsa(x: LayerInputs) -> LayerOutput:
    return LayerOutput(x.combine(x.As, x.weights), None)


def _fedex(x: LayerInputs) -> LayerOutput:
    A = x.combine(x.As, x.weights)
    B = x.combine(x.Bs, x.weights)
    U = linalg.dense_target(x.UBs, x.UAs, x.weights)
    return LayerOutput(A, B, residual=U - B.to(U.dtype) @ A.to(U.dtype))


def _fedA2(x: LayerInputs) -> LayerOutput:
    A_bar = x.combine(x.As, x.weights)
    combine = None if x.combine is linalg.weighted_average else x.combine  # the plain sum accumulates in place
    B, solve = linalg.fedA2_B(A_bar, x.UAs, x.UBs, x.weights, lambda_=x.lambda_, ridge=x.ridge, rcond=x.rcond, combine=combine)
    return LayerOutput(A_bar, B.to(A_bar.dtype), branch=solve.branch, cond=solve.cond)


def _svd(x: LayerInputs) -> LayerOutput:
    dtype = linalg.work_dtype(*x.As, *x.Bs)
    B, A = linalg.truncated_svd_factors(x.UBs, x.UAs, x.weights, x.As[0].shape[0])
    return LayerOutput(A.to(dtype), B.to(dtype))


def _lora_fair(x: LayerInputs) -> LayerOutput:
    A_bar, B_bar = x.combine(x.As, x.weights), x.combine(x.Bs, x.weights)
    combine = None if x.combine is linalg.weighted_average else x.combine
    B, solve = linalg.lora_fair_B(A_bar, B_bar, x.UAs, x.UBs, x.weights, lambda_=x.lambda_, ridge=x.ridge, rcond=x.rcond, combine=combine)
    return LayerOutput(A_bar, B.to(A_bar.dtype), branch=solve.branch, cond=solve.cond)


def _hetlora(x: LayerInputs) -> LayerOutput:
    # Zero-padded factors (core) averaged with HetLoRA's per-layer sparsity weights instead of the plain ones.
    weights = linalg.norm_weights(x.As, x.Bs, x.weights)
    return LayerOutput(x.combine(x.As, weights), x.combine(x.Bs, weights))


def _fedsvd(x: LayerInputs) -> LayerOutput:
    # A is frozen at the start's on every client (core checked any uploaded A), so U = B̄ A exactly.
    A = x.start_A if x.start_A is not None else x.As[0]
    B_bar = x.combine(x.Bs, x.weights)
    dtype = linalg.work_dtype(A, B_bar)
    B, A_new = linalg.orthonormal_refactor(B_bar, A)
    return LayerOutput(A_new.to(dtype), B.to(dtype))


def _flora(x: LayerInputs) -> LayerOutput:
    dtype = linalg.work_dtype(*x.As, *x.Bs)
    A = torch.cat([A.to(dtype) * w for A, w in zip(x.As, x.weights.tolist())], dim=0)
    B = torch.cat([B.to(dtype) for B in x.Bs], dim=1)
    return LayerOutput(A, B)


@dataclass(frozen=True)
class Method:
    """A method's spec (what it is: :mod:`.registry`) bound to the function that fuses one layer."""

    spec: MethodSpec
    fuse: Callable[[LayerInputs], LayerOutput]

    def __getattr__(self, name: str) -> object:  # name, needs_A, frozen_A, stacks_ranks, ... from the spec
        return getattr(self.spec, name)

    def in_phase(self, phase: str) -> Method:
        """An alternating method (RoLoRA) in one phase: B rounds fuse as FFA, A rounds keep the start's B."""
        if not self.spec.alternates:
            return self
        return Method(self.spec.in_phase(phase), _ffa if phase == "B" else _frozen_B)


def _alternating(x: LayerInputs) -> LayerOutput:
    raise AssertionError("an alternating method is fused in one of its phases (Method.in_phase), never as itself")


_FUSE: dict[str, Callable[[LayerInputs], LayerOutput]] = {
    "fedit": _fedit, "ffa": _ffa, "fedsa": _fedsa, "feddpa": _fedit, "fedex": _fedex, "fedA2": _fedA2, "svd": _svd, "flora": _flora,
    # FlexLoRA's server is the SVD optimum at the padded rank r_max; what differs is each client's start.
    "lora-fair": _lora_fair, "flexlora": _svd, "hetlora": _hetlora, "fedsvd": _fedsvd, "rolora": _alternating,
}
METHODS: dict[str, Method] = {name: Method(spec, _FUSE[name]) for name, spec in SPECS.items()}
