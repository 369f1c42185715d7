"""VeRA aggregation math (issue 15, item 4): hand computations, dense least-squares references and PEFT's forward."""

from __future__ import annotations

import contextlib
import math
import time

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from uniflow_cli.aggregation import AggregationOptions, normalize_weights, vera
from uniflow_cli.aggregation.registry import METHOD_NAMES
from uniflow_cli.errors import (
    AggregationError,
    ConfigError,
    IncompatibleAdaptersError,
    UsageError,
)

F64 = torch.float64


def fuse(A, B, ds, bs, weights, method="fedA2", *, lambda_=1.0, ridge="auto", start_d=None):
    x = vera.VeraLayerInputs(A, B, ds, bs, weights, start_d=start_d)
    return vera.fuse_vera_layer(x, AggregationOptions(method=method, lambda_=lambda_, ridge=ridge))


def random_layer(seed, r, d_in, d_out, k, dtype=F64):
    """Shared A, B and k clients' (d, b), all non-zero (b starts at 0 in PEFT; trained b is not)."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(r, d_in, generator=gen, dtype=F64).to(dtype)
    B = torch.randn(d_out, r, generator=gen, dtype=F64).to(dtype)
    ds = [torch.randn(r, generator=gen, dtype=F64).to(dtype) for _ in range(k)]
    bs = [torch.randn(d_out, generator=gen, dtype=F64).to(dtype) for _ in range(k)]
    return A, B, ds, bs


def dense_target(A, B, ds, bs, weights):
    w = normalize_weights(weights)
    return sum(wk * vera.vera_delta(A.to(F64), B.to(F64), d.to(F64), b.to(F64)) for wk, d, b in zip(w.tolist(), ds, bs))


def dense_fedA2_b(A, B, ds, bs, weights, lambda_=0.0):
    """The reference: for every row i, lstsq of b_i·v_i ≈ U_i over the flattened d_in values (ridge: a √λ row)."""
    w = normalize_weights(weights)
    d_bar = sum(wk * d.to(F64) for wk, d in zip(w.tolist(), ds))
    U = dense_target(A, B, ds, bs, weights)
    V = (B.to(F64) * d_bar[None, :]) @ A.to(F64)  # row i is v_i = B_i Λ_d̄ A
    b = []
    for v_i, u_i in zip(V, U):
        M, y = v_i[:, None], u_i[:, None]
        if lambda_ > 0:
            M = torch.cat([M, torch.full((1, 1), math.sqrt(lambda_), dtype=F64)])
            y = torch.cat([y, torch.zeros((1, 1), dtype=F64)])
        b.append(torch.linalg.lstsq(M, y, driver="gelsd").solution.item())
    return torch.tensor(b, dtype=F64)


def rel(a, b):
    return float((a.to(F64) - b.to(F64)).norm() / b.to(F64).norm())


# ---------------------------------------------------------------------------------------------- hand-computed
def one_by_one():
    # A = 2, B = 3 (r = d_in = d_out = 1). Client 0: d = 1, b = 1 (ΔW = 6); client 1: d = 3, b = 2 (ΔW = 36).
    def t(v):
        return torch.tensor(v, dtype=F64)

    return t([[2.0]]), t([[3.0]]), [t([1.0]), t([3.0])], [t([1.0]), t([2.0])]


@pytest.mark.parametrize(
    "method, lambda_, ridge, d, b",
    [
        ("fedit", 1.0, "auto", 1.5, 1.25),  # d̄ = .75·1 + .25·3, b̄ = .75·1 + .25·2
        ("fedA2", 1.0, "auto", 1.5, 1.5),  # U = .75·6 + .25·36 = 13.5, v = 3·1.5·2 = 9: b = 13.5/9
        ("fedA2", 0.0, "never", 1.5, 1.5),
        ("fedA2", 1.0, "always", 1.5, 121.5 / 82),  # b = v·U / (v² + λ) = 9·13.5 / 82
        ("fedsa", 1.0, "auto", 1.5, None),
    ],
)
def test_hand_computed_1x1(method, lambda_, ridge, d, b):
    # Prepare
    A, B, ds, bs = one_by_one()
    # Execute
    out = fuse(A, B, ds, bs, [3, 1], method, lambda_=lambda_, ridge=ridge)
    # Assert
    assert out.d.item() == pytest.approx(d, rel=1e-15)
    assert (out.b is None) if b is None else out.b.item() == pytest.approx(b, rel=1e-15)


def test_hand_computed_1x1_fedex_and_ffa():
    A, B, ds, bs = one_by_one()
    fedex = fuse(A, B, ds, bs, [3, 1], "fedex")
    assert fedex.residual.item() == pytest.approx(13.5 - 1.25 * 3 * 1.5 * 2, rel=1e-15)  # U − b̄·B·d̄·A = 2.25
    # FFA: d frozen at 1 on both clients, so ΔW is linear in b and b̄ = 1.25 reproduces U = 7.5 exactly.
    ffa = fuse(A, B, [ds[0], ds[0]], bs, [3, 1], "ffa", start_d=ds[0].clone())
    assert ffa.d.item() == 1.0 and ffa.b.item() == pytest.approx(1.25, rel=1e-15)
    assert vera.vera_delta(A, B, ffa.d, ffa.b).item() == pytest.approx(0.75 * 6 + 0.25 * 12, rel=1e-15)


def test_hand_computed_2x2():
    # Prepare: A = I, B = [[1, 1], [0, 2]]; client 0: d = (1, 0), b = (1, 1); client 1: d = (0, 1), b = (2, 3).
    A, B = torch.eye(2, dtype=F64), torch.tensor([[1.0, 1.0], [0.0, 2.0]], dtype=F64)
    ds = [torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)]
    bs = [torch.tensor([1.0, 1.0], dtype=F64), torch.tensor([2.0, 3.0], dtype=F64)]
    # Execute
    out = fuse(A, B, ds, bs, [1, 1])
    # Assert: U = ½([[1, 0], [0, 0]] + [[0, 2], [0, 6]]); d̄ = (½, ½); v_0 = (½, ½), v_1 = (0, 1);
    # b_0 = ⟨v_0, U_0⟩ / ‖v_0‖² = (¼ + ½) / ½ = 1.5, b_1 = 3 / 1 = 3.
    assert torch.equal(out.d, torch.tensor([0.5, 0.5], dtype=F64))
    assert torch.allclose(out.b, torch.tensor([1.5, 3.0], dtype=F64), rtol=1e-15, atol=0)
    assert out.branch == "plain" and out.singular_rows == 0 and out.cond == pytest.approx(2.0)  # g = (½, 1)


@pytest.mark.parametrize(
    "lambda_, ridge, b, branch",
    [
        (0.0, "auto", [1.5, 0.0], "pinv"),  # the dead row's minimum-norm b is 0
        (1.0, "auto", [1.5, 0.0], "ridge"),  # λ only on the dead row: the live row stays exact
        (1.0, "always", [0.75 / 1.5, 0.0], "ridge"),  # λ on every row shrinks the live one too
        (0.0, "never", [1.5, 0.0], "pinv"),
    ],
)
def test_a_dead_row_gets_b_zero(lambda_, ridge, b, branch):
    # B's second row is 0, so v_1 = B_1 Λ_d̄ A = 0: b_1 does not change ΔW (whose row 1 is 0 for every b).
    A, B = torch.eye(2, dtype=F64), torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=F64)
    ds = [torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)]
    bs = [torch.tensor([1.0, 1.0], dtype=F64), torch.tensor([2.0, 3.0], dtype=F64)]
    out = fuse(A, B, ds, bs, [1, 1], lambda_=lambda_, ridge=ridge)
    assert torch.allclose(out.b, torch.tensor(b, dtype=F64), rtol=1e-15, atol=0)
    assert (out.branch, out.singular_rows, out.cond) == (branch, 1, math.inf)


# ---------------------------------------------------------------------------------------------- vs dense lstsq
SHAPES = [(1, 1, 1, 1), (3, 8, 6, 2), (4, 5, 9, 3), (6, 4, 7, 4), (2, 16, 3, 5)]  # (r, d_in, d_out, K); r > d_in too


@pytest.mark.parametrize("r, d_in, d_out, k", SHAPES)
@pytest.mark.parametrize("lambda_, ridge", [(0.0, "never"), (1.0, "auto"), (0.3, "always"), (2.0, "always")])
def test_fedA2_matches_dense_least_squares(r, d_in, d_out, k, lambda_, ridge):
    A, B, ds, bs = random_layer(10 * r + k, r, d_in, d_out, k)
    weights = list(range(1, k + 1))
    out = fuse(A, B, ds, bs, weights, lambda_=lambda_, ridge=ridge)
    expected = dense_fedA2_b(A, B, ds, bs, weights, lambda_ if ridge == "always" else 0.0)  # auto: no row singular
    assert out.branch == ("ridge" if ridge == "always" else "plain")
    assert rel(out.b, expected) <= 1e-10
    assert rel(out.d, sum(w * d for w, d in zip(normalize_weights(weights).tolist(), ds))) <= 1e-14


@pytest.mark.parametrize("r, d_in, d_out, k", SHAPES[1:])
def test_fedA2_is_the_best_b_for_d_bar(r, d_in, d_out, k):
    # FedIT's (d̄, b̄) lies in the family FedA² minimises over, so FedA² (λ = 0) is never worse; errors via Grams = dense.
    A, B, ds, bs = random_layer(r + 7 * k, r, d_in, d_out, k)
    w = normalize_weights([3] + [1] * (k - 1))
    U = dense_target(A, B, ds, bs, w.tolist())
    fedA2, fedit = (fuse(A, B, ds, bs, w.tolist(), m, lambda_=0.0, ridge="never") for m in ("fedA2", "fedit"))
    errors = [vera.vera_relative_error(A, B, o.d, o.b, ds, bs, w) for o in (fedA2, fedit)]
    for o, error in zip((fedA2, fedit), errors):
        assert error == pytest.approx(rel(vera.vera_delta(A, B, o.d, o.b), U), rel=1e-8)
    assert errors[0] <= errors[1] + 1e-12


def test_fedex_residual_restores_U():
    A, B, ds, bs = random_layer(3, 4, 9, 6, 3)
    out = fuse(A, B, ds, bs, [1, 2, 4], "fedex")
    assert rel(vera.vera_delta(A, B, out.d, out.b) + out.residual, dense_target(A, B, ds, bs, [1, 2, 4])) <= 1e-12


def test_shared_d_makes_fedA2_exact_and_equal_to_fedit():
    # Every client kept d (FFA-like): U is a VeRA update, FedA² returns b̄ bit for bit and ΔW = U.
    A, B, ds, bs = random_layer(4, 3, 8, 5, 3, dtype=torch.float32)
    shared = [ds[0].clone() for _ in ds]
    fedA2, fedit = (fuse(A, B, shared, bs, [1, 2, 3], m, ridge="never") for m in ("fedA2", "fedit"))
    assert torch.equal(fedA2.b, fedit.b) and torch.equal(fedA2.d, ds[0])
    assert vera.vera_relative_error(A, B, fedA2.d, fedA2.b, shared, bs, normalize_weights([1, 2, 3])) < 1e-7


@pytest.mark.parametrize("method", ["fedit", "fedA2", "fedex", "ffa", "fedsa"])
def test_identical_clients_are_returned_exactly(method):
    A, B, ds, bs = random_layer(5, 4, 7, 6, 1, dtype=torch.float32)
    k = 3
    out = fuse(A, B, [ds[0].clone()] * k, [bs[0].clone()] * k, [1, 2, 3], method, start_d=ds[0].clone())
    assert out.d.dtype == torch.float32 and torch.equal(out.d, ds[0])
    if out.b is not None:
        assert out.b.dtype == torch.float32 and torch.equal(out.b, bs[0])
    if out.residual is not None:
        assert float(out.residual.abs().max()) <= 1e-6
    assert out.branch in ("-", "plain")


def test_same_inputs_give_the_same_bytes():
    A, B, ds, bs = random_layer(6, 5, 12, 10, 4, dtype=torch.float32)
    first, second = (fuse(A, B, ds, bs, [4, 3, 2, 1]) for _ in range(2))
    assert first.b.dtype == torch.float32 and torch.equal(first.b, second.b) and torch.equal(first.d, second.d)


# ---------------------------------------------------------------------------------------------- never d_out × d_in
class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any torch operation produces inside the block."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_fedA2_never_builds_a_d_out_by_d_in_tensor():
    # 4096 × 4096 would be 16.8M values per client; FedA² for VeRA needs only d_out × r and r × r.
    r, d, k = 4, 4096, 3
    A, B, ds, bs = random_layer(8, r, d, d, k, dtype=torch.float32)
    with _LargestTensor() as probe:
        out = fuse(A, B, ds, bs, [1, 2, 3], lambda_=1.0, ridge="always")
    assert probe.largest <= r * d  # A itself is r × d_in: nothing bigger is made
    with _LargestTensor() as control:  # the probe does see a dense ΔW when one is built
        vera.vera_delta(A[:, :512], B[:512], ds[0], bs[0][:512])
    assert control.largest == 512 * 512
    start = time.perf_counter()
    fuse(A, B, ds, bs, [1, 2, 3])
    assert time.perf_counter() - start < 1.0
    assert out.b.shape == (d,) and bool(torch.isfinite(out.b).all())


# ---------------------------------------------------------------------------------------------- methods on VeRA
def test_every_method_is_defined_or_refused_for_vera():
    assert set(vera.VERA_METHODS) | set(vera.UNDEFINED_FOR_VERA) == set(METHOD_NAMES)
    assert not set(vera.VERA_METHODS) & set(vera.UNDEFINED_FOR_VERA)


@pytest.mark.parametrize("method", ["svd", "flora", "flexlora", "hetlora", "fedsvd"])
def test_undefined_methods_name_the_defined_ones(method):
    A, B, ds, bs = random_layer(0, 2, 3, 3, 2)
    with pytest.raises(ConfigError, match=rf'method="{method}" is not defined for VeRA .*; defined: fedit, ffa, fedsa, feddpa, fedex, fedA2'):
        fuse(A, B, ds, bs, [1, 1], method)


def test_unknown_method_is_the_registry_error():
    with pytest.raises(ConfigError, match=r'method="fedA3" is not one of .* \(did you mean fedA2\?\)'):
        vera.vera_method("fedA3")


def test_fedsa_needs_only_d_and_publishes_no_b():
    A, B, ds, _ = random_layer(1, 3, 4, 5, 2)
    out = fuse(A, B, ds, [None, None], [1, 3], "fedsa")
    assert out.b is None and torch.allclose(out.d, 0.25 * ds[0] + 0.75 * ds[1], rtol=1e-15)


def test_ffa_checks_that_d_stayed_frozen():
    A, B, ds, bs = random_layer(2, 3, 4, 5, 2)
    start = ds[0].clone()
    assert torch.equal(fuse(A, B, [None, None], bs, [1, 1], "ffa", start_d=start).d, start)  # b-only uploads
    with pytest.raises(AggregationError, match=r"ffa: client 1 changed the frozen vera_lambda_d of layer \(max \|Δd\| = .* vs the start\)"):
        fuse(A, B, [start, start + 1e-6], bs, [1, 1], "ffa", start_d=start)
    with pytest.raises(UsageError, match="ffa: clients did not upload vera_lambda_d of layer and no starting global"):
        fuse(A, B, [None, None], bs, [1, 1], "ffa")


# ---------------------------------------------------------------------------------------------- bad inputs
def _bad(case):
    A, B, ds, bs = random_layer(0, 3, 4, 5, 2, dtype=torch.float32)
    weights, method = [1, 2], "fedA2"
    if case == "nan d":
        ds[1] = ds[1].clone(); ds[1][0] = float("nan")
    elif case == "inf b":
        bs[0] = bs[0].clone(); bs[0][2] = float("inf")
    elif case == "short d":
        ds[0] = ds[0][:2]
    elif case == "long b":
        bs[1] = torch.zeros(6)
    elif case == "int d":
        ds[0] = torch.ones(3, dtype=torch.int64)
    elif case == "list d":
        ds[0] = [0.1, 0.1, 0.1]
    elif case == "B rank":
        B = B[:, :2]
    elif case == "A 1-D":
        A = A[0]
    elif case == "nan A":
        A = A.clone(); A[0, 0] = float("nan")
    elif case == "no d":
        ds[1] = None
    elif case == "no b":
        bs[0], method = None, "fedit"
    elif case == "weights":
        weights = [1]
    elif case == "zero weight":
        weights = [1, 0]
    elif case == "no clients":
        ds, bs, weights = [], [], []
    return A, B, ds, bs, weights, method


@pytest.mark.parametrize(
    "case, error, message",
    [
        ("nan d", AggregationError, r"client 1: vera_lambda_d of layer contains NaN or Inf"),
        ("inf b", AggregationError, r"client 0: vera_lambda_b of layer contains NaN or Inf"),
        ("short d", IncompatibleAdaptersError, r"client 0: vera_lambda_d of layer is shape \[2\] torch.float32, expected a floating tensor of shape \[3\]"),
        ("long b", IncompatibleAdaptersError, r"client 1: vera_lambda_b of layer is shape \[6\] .* shape \[5\]"),
        ("int d", IncompatibleAdaptersError, r"client 0: vera_lambda_d of layer is shape \[3\] torch.int64, expected a floating"),
        ("list d", IncompatibleAdaptersError, r"client 0: vera_lambda_d of layer is list, expected"),
        ("B rank", IncompatibleAdaptersError, r"vera_B of layer is shape \[5, 2\], expected 2-D \(d_out × 3\)"),
        ("A 1-D", IncompatibleAdaptersError, r"vera_A of layer is shape \[4\], expected 2-D"),
        ("nan A", AggregationError, r"vera_A of layer contains NaN or Inf"),
        ("no d", IncompatibleAdaptersError, r"client 1 has no vera_lambda_d for layer\. Fix: method fedA2 needs every client's vera_lambda_d"),
        ("no b", IncompatibleAdaptersError, r"client 0 has no vera_lambda_b for layer\. Fix: method fedit needs"),
        ("weights", UsageError, r"layer: 2 d, 2 b, 1 weights"),
        ("zero weight", UsageError, r"client weight 0 must be a finite number > 0"),
        ("no clients", UsageError, r"no client vectors given"),
    ],
)
def test_bad_inputs_are_refused_before_any_math(case, error, message):
    A, B, ds, bs, weights, method = _bad(case)
    with pytest.raises(error, match=message):
        fuse(A, B, ds, bs, weights, method)


@pytest.mark.parametrize(
    "d_in, d_out, message",
    [(7, 5, r"a 5×7 layer does not fit the projections vera_A \[3, 6\], vera_B \[8, 3\]"), (6, 9, "a 9×6 layer does not fit")],
)
def test_slice_projections_refuses_a_layer_larger_than_the_projections(d_in, d_out, message):
    with pytest.raises(IncompatibleAdaptersError, match=message):
        vera.slice_projections(torch.zeros(3, 6), torch.zeros(8, 3), d_in, d_out)


# ---------------------------------------------------------------------------------------------- against PEFT
def _peft_vera(r=3, **config):
    peft = pytest.importorskip("peft")

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.v = torch.nn.Linear(6, 5), torch.nn.Linear(4, 7)  # different shapes: the projections are sliced

    torch.manual_seed(0)
    unsaved = config.get("save_projection") is False  # PEFT warns that the projections will be regenerated
    with pytest.warns(UserWarning, match="save_projection") if unsaved else contextlib.nullcontext():
        return peft.get_peft_model(Two(), peft.VeraConfig(r=r, target_modules=["q", "v"], **config))


@pytest.mark.parametrize("name", ["q", "v"])
def test_vera_delta_is_peft_forward_difference(name):
    # Prepare: PEFT's VeRA on two linear layers, with trained-looking vectors.
    model = _peft_vera()
    layer = getattr(model.base_model.model, name)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.vera_lambda_d["default"].copy_(torch.randn(3, generator=gen))
        layer.vera_lambda_b["default"].copy_(torch.randn(layer.out_features, generator=gen))
    # Execute: on the identity, F.linear gives ΔWᵀ.
    eye = torch.eye(layer.in_features)
    with torch.no_grad():
        got = (layer(eye) - layer.base_layer(eye)).T
    A, B = vera.slice_projections(model.base_model.vera_A["default"], model.base_model.vera_B["default"], layer.in_features, layer.out_features)
    expected = vera.vera_delta(A, B, layer.vera_lambda_d["default"].detach(), layer.vera_lambda_b["default"].detach())
    # Assert: the same matrix (float32 round-off only), and PEFT's own merge formula agrees.
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(layer.get_delta_weight("default"), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("save_projection, projection_keys", [(True, {"base_model.vera_A": (3, 6), "base_model.vera_B": (7, 3)}), (False, {})])
def test_peft_vera_state_dict_facts(save_projection, projection_keys):
    # The facts the aggregation relies on, pinned for the installed PEFT: key names, shapes, dtype, init values.
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(_peft_vera(save_projection=save_projection))
    vectors = {"base_model.model.q.vera_lambda_b": (5,), "base_model.model.q.vera_lambda_d": (3,),
               "base_model.model.v.vera_lambda_b": (7,), "base_model.model.v.vera_lambda_d": (3,)}
    assert {k: tuple(v.shape) for k, v in state.items()} == {**vectors, **projection_keys}
    assert all(v.dtype == torch.float32 for v in state.values())
    assert not state["base_model.model.q.vera_lambda_b"].any()  # b starts at 0: ΔW = 0 at round 0
    assert torch.equal(state["base_model.model.q.vera_lambda_d"], torch.full((3,), 0.1))  # d_initial
