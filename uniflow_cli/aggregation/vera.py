"""Every aggregation method on VeRA adapters: pure math on tensors (no paths, no printing).

VeRA (PEFT ``VeraConfig``) adapts each target linear layer with ONE pair of frozen random projections,
shared by every layer and every client — ``vera_A`` (r × max d_in) and ``vera_B`` (max d_out × r), sliced
to the layer as ``A = vera_A[:, :d_in]`` and ``B = vera_B[:d_out, :]`` — and trains two vectors per layer,
``d = vera_lambda_d`` (r) and ``b = vera_lambda_b`` (d_out)::

    ΔW = Λ_b B Λ_d A        (Λ_x = diag(x); no α/r scaling)

``Λ_d A`` (r × d_in) is the layer's input-side factor and ``Λ_b B`` (d_out × r) its output-side factor:
they play LoRA's A and B. The registry's facts about A therefore apply to d and those about B to b
(uploads, frozen A → frozen d, private B → private b), and every definition below is the LoRA method's
definition applied to those effective factors, restricted to what a VeRA adapter can publish (vectors
over the fixed A, B). docs/aggregation.md, "VeRA", has the table and the derivation of FedA².

The target is U = Σ_k w_k Λ_{b_k} B Λ_{d_k} A (Eq. 10), never formed except by FedEx's dense residual
and :func:`vera_target` (reference). FedA²'s b needs only the r×r Gram AAᵀ and d_out×r products.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from uniflow_cli.aggregation import linalg
from uniflow_cli.aggregation.registry import (  # noqa: F401  (re-exported)
    UNDEFINED_FOR_VERA,
    VERA_METHODS,
    MethodSpec,
    check_family,
    method_spec,
)
from uniflow_cli.errors import (
    AggregationError,
    IncompatibleAdaptersError,
    UsageError,
)

if TYPE_CHECKING:
    from uniflow_cli.aggregation.core import AggregationOptions

Tensor = torch.Tensor
F64 = torch.float64


# ------------------------------------------------------------------------------------------ the adapter
def slice_projections(vera_A: Tensor, vera_B: Tensor, d_in: int, d_out: int) -> tuple[Tensor, Tensor]:
    """A layer's A (r × d_in) and B (d_out × r), sliced from the shared projections as PEFT's forward does."""
    for name, tensor in (("vera_A", vera_A), ("vera_B", vera_B)):
        if not isinstance(tensor, Tensor) or tensor.dim() != 2:
            raise IncompatibleAdaptersError(f"{name} must be a 2-D tensor, got {_shape(tensor)}", fix="re-create the round-0 global")
    if vera_A.shape[0] != vera_B.shape[1]:
        raise IncompatibleAdaptersError(f"vera_A has rank {vera_A.shape[0]} but vera_B has rank {vera_B.shape[1]}", fix="re-create the round-0 global")
    if not (0 < d_in <= vera_A.shape[1] and 0 < d_out <= vera_B.shape[0]):
        raise IncompatibleAdaptersError(
            f"a {d_out}×{d_in} layer does not fit the projections vera_A {list(vera_A.shape)}, vera_B {list(vera_B.shape)}",
            fix="use the projections of the model the adapter was built for",
        )
    return vera_A[:, :d_in], vera_B[:d_out, :]


def effective_factors(A: Tensor, B: Tensor, d: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """The LoRA-shaped factors (Λ_b B, Λ_d A) of one VeRA layer, in the inputs' working dtype."""
    dtype = linalg.work_dtype(A, B, d, b)
    return b.to(dtype)[:, None] * B.to(dtype), d.to(dtype)[:, None] * A.to(dtype)


def vera_delta(A: Tensor, B: Tensor, d: Tensor, b: Tensor) -> Tensor:
    """The dense ΔW = Λ_b B Λ_d A (d_out × d_in, the base weight's orientation unless ``fan_in_fan_out``).

    A reference for tests and FedEx's residual: d_out × d_in is exactly what the methods avoid forming.
    """
    B_eff, A_eff = effective_factors(A, B, d, b)
    return B_eff @ A_eff


def vera_target(A: Tensor, B: Tensor, ds: Sequence[Tensor], bs: Sequence[Tensor], weights: Tensor) -> Tensor:
    """The dense U = Σ_k w_k Λ_{b_k} B Λ_{d_k} A (Eq. 10 on VeRA), as one product of stacked factors."""
    factors = [effective_factors(A, B, d, b) for d, b in zip(ds, bs)]
    return linalg.dense_target([f[0] for f in factors], [f[1] for f in factors], weights)


def vera_relative_error(A: Tensor, B: Tensor, d: Tensor, b: Tensor, ds: Sequence[Tensor], bs: Sequence[Tensor], weights: Tensor) -> float:
    """‖Λ_b B Λ_d A − U‖_F / ‖U‖_F from Gram matrices of the effective factors (no d_out × d_in product)."""
    B_out, A_out = effective_factors(A, B, d, b)
    factors = [effective_factors(A, B, dk, bk) for dk, bk in zip(ds, bs)]
    return linalg.relative_error(B_out, A_out, [f[0] for f in factors], [f[1] for f in factors], weights)


def average(vectors: Sequence[Tensor], weights: Tensor) -> Tensor:
    """Σ_k w_k x_k (:func:`linalg.weighted_average`), except that equal inputs return their value exactly.

    Rounding would otherwise move Σ_k w_k x by an ulp, so a set of unchanged clients would drift the
    global every round, and FedA²'s shared-d case (below) could not return the clients' b exactly.
    """
    first = vectors[0]
    if all(torch.equal(v, first) for v in vectors[1:]):
        return first.to(linalg.work_dtype(*vectors)).clone()
    return linalg.weighted_average(vectors, weights)


# ------------------------------------------------------------------------------------------ FedA² for VeRA
@dataclass(frozen=True)
class VeraSolve:
    """How FedA²'s rows were solved for one layer."""

    branch: str  # "plain" (every row's Gram > 0), "ridge" (λ added to some or all rows), "pinv" (rows set to 0)
    cond: float  # max_i g_i / min_i g_i over the rows' Grams g_i (inf when a row is singular)
    singular_rows: int  # rows with g_i ≤ rcond · max_j g_j


def row_grams(A: Tensor, B: Tensor, d_bar: Tensor) -> Tensor:
    """H (d_out × r, float64) with H d = (B_i Λ_d (AAᵀ) Λ_d̄ B_iᵀ)_i for any d: every row's scalars in one matrix.

    Row i of the fit is b_i v_i with v_i = B_i Λ_d̄ A; ⟨v_i, B_i Λ_{d_k} A⟩ = B_i Λ_d̄ G Λ_{d_k} B_iᵀ with
    G = AAᵀ (r × r) = Σ_j H_ij d_kj, where H = ((B Λ_d̄) G) ∘ B. Cost O(r²(d_in + d_out)), never d_out × d_in.
    """
    A64, B64 = A.to(F64), B.to(F64)
    G = A64 @ A64.T
    return ((B64 * d_bar.to(F64)[None, :]) @ G) * B64


def row_denominators(g: Tensor, lambda_: float, ridge: str, rcond: float) -> tuple[Tensor, Tensor, VeraSolve]:
    """Eq. 13's case split on each row's 1×1 Gram g_i = ‖v_i‖²: the denominators and the rows set to 0.

    The problem is diagonal in b, so each row is its own Eq. 13: a row is singular when
    g_i ≤ rcond · max_j g_j (the pseudo-inverse's cut). ``auto`` adds λ to the singular rows only
    (Eq. 13), ``always`` to every row (Table 12), ``never`` none; a singular row without λ gets
    b_i = 0, the minimum-norm solution (its v_i ≈ 0, so b_i barely changes ΔW).
    Returns (denominator per row, with 1 where zeroed; mask of rows set to 0; the solve's summary).
    """
    if ridge not in ("auto", "always", "never"):
        raise ValueError(f"unknown ridge mode {ridge!r}")
    g = g.clamp_min(0.0)  # a PSD quadratic form; round-off may dip below 0 when AAᵀ is singular
    hi, lo = float(g.max()), float(g.min())
    singular = g <= rcond * hi if hi > 0 else torch.ones_like(g, dtype=torch.bool)
    count = int(singular.sum())
    cond = math.inf if count else hi / lo
    if lambda_ > 0 and ridge == "always":
        return g + lambda_, torch.zeros_like(singular), VeraSolve("ridge", cond, count)
    if lambda_ > 0 and ridge == "auto":
        return torch.where(singular, g + lambda_, g), torch.zeros_like(singular), VeraSolve("ridge" if count else "plain", cond, count)
    return torch.where(singular, torch.ones_like(g), g), singular, VeraSolve("pinv" if count else "plain", cond, count)


def fedA2_b(A: Tensor, B: Tensor, d_bar: Tensor, ds: Sequence[Tensor], bs: Sequence[Tensor], weights: Tensor, *,
            lambda_: float, ridge: str, rcond: float) -> tuple[Tensor, VeraSolve]:
    """b = argmin ‖Λ_b B Λ_d̄ A − U‖_F² + λ‖b‖² (λ per :func:`row_denominators`), row by row, in closed form.

    b_i = Σ_k w_k b_{k,i} B_i Λ_d̄ G Λ_{d_k} B_iᵀ / (B_i Λ_d̄ G Λ_d̄ B_iᵀ [+ λ]). All float64; returned in
    the inputs' working dtype. When every client has the same d (= d̄), U is itself a VeRA update and the
    solution is Σ_k w_k b_k (times g/(g+λ) on regularised rows): computed so, it returns the clients'
    shared b exactly instead of a ratio of two rounded sums.
    """
    dtype = linalg.work_dtype(A, B, d_bar, *ds, *bs)
    H = row_grams(A, B, d_bar)
    g = H @ d_bar.to(F64)
    den, zeroed, solve = row_denominators(g, lambda_, ridge, rcond)
    if all(torch.equal(d, d_bar) for d in ds):
        b = average(bs, weights).to(F64) * (g.clamp_min(0.0) / den)
    else:
        numerator = torch.zeros_like(g)
        for d, b_k, w in zip(ds, bs, weights.tolist()):
            numerator.add_(b_k.to(F64) * (H @ d.to(F64)), alpha=w)
        b = numerator / den
    return torch.where(zeroed, torch.zeros_like(b), b).to(dtype), solve


def lora_fair_b(A: Tensor, B: Tensor, d_bar: Tensor, b_bar: Tensor, ds: Sequence[Tensor], bs: Sequence[Tensor], weights: Tensor, *,
                lambda_: float, ridge: str, rcond: float) -> tuple[Tensor, VeraSolve]:
    """LoRA-FAIR on VeRA: b = b̄ + Δb, Δb = argmin ‖Λ_{b̄+Δb} B Λ_d̄ A − U‖_F² + λ‖Δb‖², row by row in closed form.

    Row i is FedA²'s one-unknown problem regularised toward b̄_i instead of 0: Δb_i = (⟨v_i, U_i⟩ − b̄_i g_i) /
    (g_i + λ), so b_i = (⟨v_i, U_i⟩ + λ b̄_i) / (g_i + λ). λ applies on every row (``auto``/``always``: it is
    LoRA-FAIR's regulariser); ``never`` drops it, and a row with a singular Gram (g_i ≤ rcond · max g) then
    keeps b̄_i (the minimum-norm correction, 0). All float64; returned in the inputs' working dtype. With
    every d equal to d̄, U is a VeRA update that b̄ already fits: b̄ is returned exactly.
    """
    dtype = linalg.work_dtype(A, B, d_bar, b_bar, *ds, *bs)
    H = row_grams(A, B, d_bar)
    g = (H @ d_bar.to(F64)).clamp_min(0.0)
    den, zeroed, solve = row_denominators(g, lambda_, "never" if ridge == "never" else "always", rcond)
    if all(torch.equal(d, d_bar) for d in ds):
        return b_bar.to(dtype).clone(), solve
    numerator = torch.zeros_like(g)
    for d, b_k, w in zip(ds, bs, weights.tolist()):
        numerator.add_(b_k.to(F64) * (H @ d.to(F64)), alpha=w)
    b_bar64 = b_bar.to(F64)
    delta = (numerator - b_bar64 * g) / den
    return (b_bar64 + torch.where(zeroed, torch.zeros_like(delta), delta)).to(dtype), solve


# ------------------------------------------------------------------------------------------ the methods
@dataclass(frozen=True)
class VeraLayerInputs:
    """One VeRA layer of K clients, as uploaded (unvalidated: :func:`fuse_vera_layer` checks it)."""

    A: Tensor  # r × d_in: vera_A sliced to the layer (:func:`slice_projections`)
    B: Tensor  # d_out × r: vera_B sliced
    ds: Sequence[Tensor | None]  # each client's vera_lambda_d (r), None where it did not upload d
    bs: Sequence[Tensor | None]  # each client's vera_lambda_b (d_out), None where it did not upload b
    weights: Sequence[float]  # raw client weights as numbers (examples, uniform or given): core.normalize_weights
    start_d: Tensor | None = None  # the d of the global the clients started from (the frozen d of FFA)
    labels: Sequence[str] | None = None  # client names for messages (default "client k")
    module: str = "layer"  # the layer's name for messages


@dataclass
class VeraLayerOutput:
    d: Tensor
    b: Tensor | None  # None: each client keeps its own b (FedSA)
    residual: Tensor | None = None  # FedEx: U − Λ_b B Λ_d A, dense d_out × d_in, to add to W0
    branch: str = "-"
    cond: float | None = None
    singular_rows: int = 0


@dataclass(frozen=True)
class _Layer:
    """Validated inputs: working dtype, normalised float64 weights."""

    A: Tensor
    B: Tensor
    ds: list[Tensor | None]
    bs: list[Tensor | None]
    weights: Tensor
    start_d: Tensor | None


def _fedit(x: _Layer, options: AggregationOptions) -> VeraLayerOutput:
    return VeraLayerOutput(average(x.ds, x.weights), average(x.bs, x.weights))


def _ffa(x: _Layer, options: AggregationOptions) -> VeraLayerOutput:
    # d is frozen: _validate set start_d (the start's, else the first upload) and checked every uploaded d
    # equals it bitwise, so ΔW is linear in b and b̄ reproduces U exactly.
    return VeraLayerOutput(x.start_d.clone(), average(x.bs, x.weights))  # type: ignore[union-attr] - set for frozen d


def _fedsa(x: _Layer, options: AggregationOptions) -> VeraLayerOutput:
    return VeraLayerOutput(average(x.ds, x.weights), None)


def _fedex(x: _Layer, options: AggregationOptions) -> VeraLayerOutput:
    d, b = average(x.ds, x.weights), average(x.bs, x.weights)
    residual = vera_target(x.A, x.B, x.ds, x.bs, x.weights) - vera_delta(x.A, x.B, d, b)
    return VeraLayerOutput(d, b, residual=residual)


def _fedA2(x: _Layer, options: AggregationOptions) -> VeraLayerOutput:
    d_bar = average(x.ds, x.weights)
    b, solve = fedA2_b(x.A, x.B, d_bar, x.ds, x.bs, x.weights, lambda_=options.lambda_, ridge=options.ridge, rcond=options.rcond)
    return VeraLayerOutput(d_bar, b, branch=solve.branch, cond=solve.cond, singular_rows=solve.singular_rows)


def _lora_fair(x: _Layer, options: AggregationOptions) -> VeraLayerOutput:
    d_bar, b_bar = average(x.ds, x.weights), average(x.bs, x.weights)
    b, solve = lora_fair_b(x.A, x.B, d_bar, b_bar, x.ds, x.bs, x.weights, lambda_=options.lambda_, ridge=options.ridge, rcond=options.rcond)
    return VeraLayerOutput(d_bar, b, branch=solve.branch, cond=solve.cond, singular_rows=solve.singular_rows)


_FUSE: dict[str, Callable[[_Layer, AggregationOptions], VeraLayerOutput]] = {
    "fedit": _fedit, "ffa": _ffa, "fedsa": _fedsa, "feddpa": _fedit, "fedex": _fedex, "fedA2": _fedA2, "lora-fair": _lora_fair,
}
# Which methods have a VeRA form, and why the others have none, is a fact of the method: the registry's.
assert set(_FUSE) == set(VERA_METHODS), "every method the registry defines on VeRA needs its fuse here"


def vera_method(name: object) -> MethodSpec:
    """The spec of a method defined on VeRA, or a ConfigError naming the ones that are."""
    return check_family(method_spec(name), "vera")


def fuse_vera_layer(x: VeraLayerInputs, options: AggregationOptions) -> VeraLayerOutput:
    """Fuse one VeRA layer with ``options.method``: validate everything, then compute."""
    spec = vera_method(options.method)
    return _FUSE[spec.name](_validate(x, spec), options)


# ------------------------------------------------------------------------------------------ validation
def _shape(value: object) -> str:
    return f"shape {list(value.shape)}" if isinstance(value, Tensor) else type(value).__name__


def _checked(value: object, shape: tuple[int, ...], what: str, fix: str) -> Tensor:
    """A floating tensor of exactly ``shape`` with finite values, or a one-line error naming ``what``."""
    if not isinstance(value, Tensor) or not value.is_floating_point() or tuple(value.shape) != shape:
        got = f"{_shape(value)} {value.dtype}" if isinstance(value, Tensor) else _shape(value)
        raise IncompatibleAdaptersError(f"{what} is {got}, expected a floating tensor of shape {list(shape)}", fix=fix)
    if not bool(torch.isfinite(value).all()):
        raise AggregationError(f"{what} contains NaN or Inf", fix=fix)
    return value


def _client_vectors(x: VeraLayerInputs, spec: MethodSpec, labels: Sequence[str], r: int, d_out: int) -> tuple[list, list]:
    """Every client's d and b, checked: present where the method needs them, the layer's length, finite."""
    ds: list[Tensor | None] = []
    bs: list[Tensor | None] = []
    for label, d, b in zip(labels, x.ds, x.bs):
        for name, value, needed, length, out in (("d", d, spec.needs_A, r, ds), ("b", b, spec.needs_B, d_out, bs)):
            if value is None and needed:
                raise IncompatibleAdaptersError(f"{label} has no vera_lambda_{name} for {x.module}",
                                                fix=f"method {spec.name} needs every client's vera_lambda_{name}")
            what = f"{label}: vera_lambda_{name} of {x.module}"
            out.append(None if value is None else _checked(value, (length,), what, "drop this client or retrain it"))
    return ds, bs


def _frozen_d(x: VeraLayerInputs, spec: MethodSpec, ds: list[Tensor | None], labels: Sequence[str], r: int) -> Tensor | None:
    """FFA's frozen d: the start's (or else the first upload's), which every uploaded d must equal bitwise."""
    if x.start_d is not None:
        reference, ref_label = _checked(x.start_d, (r,), f"the starting global's vera_lambda_d of {x.module}", "start from the global the clients trained from"), "the start"
    elif any(d is not None for d in ds):
        reference, ref_label = next((d, lab) for d, lab in zip(ds, labels) if d is not None)
    else:
        raise UsageError(f"{spec.name}: clients did not upload vera_lambda_d of {x.module} and no starting global was given",
                         fix="give the global adapter the clients trained from as the start (it holds the frozen d)")
    for d, label in zip(ds, labels):
        if d is not None and not torch.equal(d.to(reference.dtype), reference):
            diff = float((d.to(F64) - reference.to(F64)).abs().max())
            raise AggregationError(f"{spec.name}: {label} changed the frozen vera_lambda_d of {x.module} (max |Δd| = {diff:.3g} vs {ref_label})",
                                   fix=f"{spec.name} clients must not train vera_lambda_d; retrain with it frozen")
    return reference


def _validate(x: VeraLayerInputs, spec: MethodSpec) -> _Layer:
    """Check one layer's inputs for ``spec`` (shapes consistent, finite, weights valid); cast to the working dtype."""
    # Imported here, not at the top: core imports the method table, which will bind these functions.
    from uniflow_cli.aggregation.core import normalize_weights

    k = len(x.ds)
    if k == 0:
        raise UsageError("no client vectors given", fix="pass one or more VeRA client adapters")
    if len(x.bs) != k or len(x.weights) != k or (x.labels is not None and len(x.labels) != k):
        sizes = f"{k} d, {len(x.bs)} b, {len(x.weights)} weights" + (f", {len(x.labels)} labels" if x.labels is not None else "")
        raise UsageError(f"{x.module}: {sizes} — one of each per client is needed", fix="give exactly one weight per client")
    weights = normalize_weights(x.weights)
    if not isinstance(x.A, Tensor) or x.A.dim() != 2:
        raise IncompatibleAdaptersError(f"vera_A of {x.module} is {_shape(x.A)}, expected 2-D (r × d_in)", fix="slice the shared projections with slice_projections")
    r = x.A.shape[0]
    A = _checked(x.A, tuple(x.A.shape), f"vera_A of {x.module}", "re-create the round-0 global")
    if not isinstance(x.B, Tensor) or x.B.dim() != 2 or x.B.shape[1] != r:
        raise IncompatibleAdaptersError(f"vera_B of {x.module} is {_shape(x.B)}, expected 2-D (d_out × {r})", fix="use the vera_A and vera_B of one adapter")
    B = _checked(x.B, tuple(x.B.shape), f"vera_B of {x.module}", "re-create the round-0 global")
    labels = list(x.labels) if x.labels is not None else [f"client {i}" for i in range(k)]
    ds, bs = _client_vectors(x, spec, labels, r, B.shape[0])
    start_d = _frozen_d(x, spec, ds, labels, r) if spec.frozen_A else None
    dtype = linalg.work_dtype(A, B, *(v for v in (*ds, *bs, start_d) if v is not None))

    def cast(v: Tensor | None) -> Tensor | None:
        return None if v is None else v.to(dtype)

    return _Layer(A.to(dtype), B.to(dtype), [cast(d) for d in ds], [cast(b) for b in bs], weights, cast(start_d))
