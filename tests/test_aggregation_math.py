"""The aggregation math, checked against hand computations and dense reference formulas (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from uniflow_cli.aggregation import AggregationOptions, ClientUpdate, aggregate, linalg
from uniflow_cli.errors import AggregationError, ConfigError, IncompatibleAdaptersError, UsageError
from tests.lora_factory import MODULES, PREFIX, delta, lora_tensors, peft_config

Q = "model.layers.0.self_attn.q_proj"


def clients(*tensor_sets, configs=None):
    configs = configs or [peft_config()] * len(tensor_sets)
    return [ClientUpdate(f"client {i}", t, c) for i, (t, c) in enumerate(zip(tensor_sets, configs))]


def dense_U(tensor_sets, configs, weights, module=Q):
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    return sum(wk * delta(t, c, module) for wk, t, c in zip(w.tolist(), tensor_sets, configs))


def rel(a, b):
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------------- hand-computed
def test_fedit_hand_computed():
    # Prepare: one 1×1 layer, rank 1, scaling alpha/r = 1. Client 0: A=2, B=3; client 1: A=4, B=5; weights 3:1.
    mod = {"m": (1, 1)}
    c0 = {PREFIX + "m.lora_A.weight": torch.tensor([[2.0]]), PREFIX + "m.lora_B.weight": torch.tensor([[3.0]])}
    c1 = {PREFIX + "m.lora_A.weight": torch.tensor([[4.0]]), PREFIX + "m.lora_B.weight": torch.tensor([[5.0]])}
    cfg = peft_config(r=1, lora_alpha=1.0, modules=mod)
    # Execute
    result = aggregate(clients(c0, c1, configs=[cfg, cfg]), [3, 1], AggregationOptions(method="fedit"))
    # Assert: A = 0.75·2 + 0.25·4 = 2.5, B = 0.75·3 + 0.25·5 = 3.5; U = 0.75·6 + 0.25·20 = 9.5; BA = 8.75.
    assert result.tensors[PREFIX + "m.lora_A.weight"].item() == pytest.approx(2.5)
    assert result.tensors[PREFIX + "m.lora_B.weight"].item() == pytest.approx(3.5)
    assert result.layers[0].rel_error == pytest.approx(abs(8.75 - 9.5) / 9.5, rel=1e-6)


def test_fedA2_hand_computed_rank1():
    # Same data: Ā = 2.5, U = 9.5, so B = U Ā / Ā² = 9.5 / 2.5 = 3.8 exactly (ĀĀᵀ = 6.25 is invertible).
    c0 = {PREFIX + "m.lora_A.weight": torch.tensor([[2.0]], dtype=torch.float64), PREFIX + "m.lora_B.weight": torch.tensor([[3.0]], dtype=torch.float64)}
    c1 = {PREFIX + "m.lora_A.weight": torch.tensor([[4.0]], dtype=torch.float64), PREFIX + "m.lora_B.weight": torch.tensor([[5.0]], dtype=torch.float64)}
    cfg = peft_config(r=1, lora_alpha=1.0, modules={"m": (1, 1)})
    result = aggregate(clients(c0, c1, configs=[cfg, cfg]), [3, 1], AggregationOptions(method="fedA2", lambda_=1.0))
    assert result.tensors[PREFIX + "m.lora_B.weight"].item() == pytest.approx(3.8, rel=1e-12)
    assert result.layers[0].branch == "plain"
    assert result.layers[0].rel_error == pytest.approx(0.0, abs=1e-7)


# ---------------------------------------------------------------------------------------------- vs dense formulas
@pytest.mark.parametrize("lambda_, ridge", [(0.0, "never"), (0.5, "always"), (2.0, "always")])
def test_fedA2_matches_dense_formula(lambda_, ridge):
    sets = [lora_tensors(seed, r=3) for seed in range(4)]
    cfg = peft_config(r=3)
    weights = [1, 2, 3, 4]
    result = aggregate(clients(*sets, configs=[cfg] * 4), weights, AggregationOptions(method="fedA2", lambda_=lambda_, ridge=ridge))
    w = torch.tensor(weights, dtype=torch.float64) / 10
    for module in MODULES:
        key = PREFIX + module
        A_bar = sum(wk * t[key + ".lora_A.weight"] for wk, t in zip(w.tolist(), sets))
        s = cfg["lora_alpha"] / cfg["r"]
        U = dense_U(sets, [cfg] * 4, weights, module) / s  # in B's units
        expected = linalg.fedA2_B_dense(A_bar, U, lambda_)
        assert rel(result.tensors[key + ".lora_B.weight"], expected) <= 1e-8
        assert rel(result.tensors[key + ".lora_A.weight"], A_bar) <= 1e-12


def test_fedA2_is_exact_when_clients_share_A():
    A = {m: torch.randn(2, d_in, generator=torch.Generator().manual_seed(7), dtype=torch.float64) for m, (_, d_in) in MODULES.items()}
    sets = [lora_tensors(seed, A=A) for seed in range(3)]
    cfg = peft_config()
    result = aggregate(clients(*sets, configs=[cfg] * 3), [5, 1, 2], AggregationOptions(method="fedA2", lambda_=0.0, ridge="never"))
    for module in MODULES:
        U = dense_U(sets, [cfg] * 3, [5, 1, 2], module)
        assert rel(delta(result.tensors, result.peft_config, module), U) <= 1e-10
    assert all(layer.rel_error < 1e-7 for layer in result.layers)


def test_svd_matches_dense_truncated_svd():
    sets = [lora_tensors(seed, r=2) for seed in range(3)]
    cfg = peft_config(r=2)
    result = aggregate(clients(*sets, configs=[cfg] * 3), [1, 1, 1], AggregationOptions(method="svd"))
    for module in MODULES:
        U = dense_U(sets, [cfg] * 3, [1, 1, 1], module)
        u, s, vh = torch.linalg.svd(U)
        best = (u[:, :2] * s[:2]) @ vh[:2]
        assert rel(delta(result.tensors, result.peft_config, module), best) <= 1e-8
        # Eckart–Young: the error equals the tail of the singular values.
        layer = next(l for l in result.layers if l.module == PREFIX + module)
        assert layer.rel_error == pytest.approx(float(s[2:].norm() / s.norm()), rel=1e-6)


def test_relative_error_matches_dense():
    sets = [lora_tensors(seed) for seed in range(3)]
    w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    As = [t[PREFIX + Q + ".lora_A.weight"] for t in sets]
    Bs = [t[PREFIX + Q + ".lora_B.weight"] for t in sets]
    B_out, A_out = torch.randn(6, 2, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)
    U = linalg.dense_target(Bs, As, w)
    assert linalg.relative_error(B_out, A_out, Bs, As, w) == pytest.approx(rel(B_out @ A_out, U), rel=1e-10)


# ---------------------------------------------------------------------------------------------- Eq. 13 branches
@pytest.mark.parametrize(
    "singular, lambda_, ridge, expected",
    [
        (False, 1.0, "auto", "plain"),
        (True, 1.0, "auto", "ridge"),
        (True, 0.0, "auto", "pinv"),
        (False, 1.0, "always", "ridge"),
        (True, 1.0, "never", "pinv"),
        (False, 0.0, "never", "plain"),
    ],
)
def test_eq13_branch_selection(singular, lambda_, ridge, expected):
    A = torch.randn(3, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    if singular:
        A[2] = A[0]  # ĀĀᵀ loses rank
    decision = linalg.choose_ridge_branch(A @ A.T, lambda_, ridge, 1e-7)
    assert decision.branch == expected
    assert math.isinf(decision.cond) == singular


def test_ridge_solution_on_singular_gram_matches_dense():
    # K = 1 with a rank-deficient A: auto takes the ridge branch, and B equals U Aᵀ (AAᵀ + λI)⁻¹.
    t = lora_tensors(3, r=3)
    for module in MODULES:
        t[PREFIX + module + ".lora_A.weight"][2] = t[PREFIX + module + ".lora_A.weight"][0]
    cfg = peft_config(r=3)
    result = aggregate(clients(t, configs=[cfg]), [1], AggregationOptions(method="fedA2", lambda_=0.3))
    key = PREFIX + Q
    U = t[key + ".lora_B.weight"] @ t[key + ".lora_A.weight"]
    assert {l.branch for l in result.layers} == {"ridge"}
    assert rel(result.tensors[key + ".lora_B.weight"], linalg.fedA2_B_dense(t[key + ".lora_A.weight"], U, 0.3)) <= 1e-8


# ---------------------------------------------------------------------------------------------- per-method semantics
def test_k1_returns_the_input():
    t = lora_tensors(0, dtype=torch.float32)
    for method in ("fedit", "fedA2", "fedex"):
        result = aggregate(clients(t), [7], AggregationOptions(method=method))
        for key, value in t.items():
            assert torch.allclose(result.tensors[key], value, rtol=1e-5, atol=1e-6), (method, key)
    fedit = aggregate(clients(t), [7], AggregationOptions(method="fedit"))
    assert all(torch.equal(fedit.tensors[k], v) for k, v in t.items())


def test_zero_padding_heterogeneous_ranks():
    small, large = lora_tensors(0, r=2), lora_tensors(1, r=4)
    cfgs = [peft_config(r=2, lora_alpha=4.0), peft_config(r=4, lora_alpha=8.0)]
    result = aggregate(clients(small, large, configs=cfgs), [1, 1], AggregationOptions(method="fedit"))
    key = PREFIX + Q
    assert result.peft_config["r"] == 4
    A = result.tensors[key + ".lora_A.weight"]
    expected_A = 0.5 * torch.cat([small[key + ".lora_A.weight"], torch.zeros(2, 8, dtype=torch.float64)]) + 0.5 * large[key + ".lora_A.weight"]
    assert torch.allclose(A, expected_A)
    # flora stacks the true ranks (2 + 4 = 6) and is exact.
    flora = aggregate(clients(small, large, configs=cfgs), [1, 1], AggregationOptions(method="flora"))
    assert flora.peft_config["r"] == 6 and flora.merge_into_base
    assert rel(delta(flora.tensors, flora.peft_config, Q), dense_U([small, large], cfgs, [1, 1])) <= 1e-12


def test_scaling_is_folded_before_mixing():
    # Clients with different alphas and rsLoRA: the fused ΔW (exact case: shared A) must equal Σ w_k s_k B_k A_k.
    A = {m: torch.randn(2, d_in, generator=torch.Generator().manual_seed(1), dtype=torch.float64) for m, (_, d_in) in MODULES.items()}
    sets = [lora_tensors(s, A=A) for s in range(3)]
    cfgs = [peft_config(lora_alpha=4.0), peft_config(lora_alpha=16.0), peft_config(lora_alpha=3.0, use_rslora=True)]
    result = aggregate(clients(*sets, configs=cfgs), [1, 2, 3], AggregationOptions(method="fedA2", lambda_=0.0))
    assert rel(delta(result.tensors, result.peft_config, Q), dense_U(sets, cfgs, [1, 2, 3])) <= 1e-10


def test_ffa_keeps_A_and_checks_it_is_frozen():
    A = {m: torch.randn(2, d_in, generator=torch.Generator().manual_seed(2), dtype=torch.float64) for m, (_, d_in) in MODULES.items()}
    sets = [lora_tensors(s, A=A) for s in range(2)]
    result = aggregate(clients(*sets), [1, 1], AggregationOptions(method="ffa"))
    assert torch.equal(result.tensors[PREFIX + Q + ".lora_A.weight"], A[Q])
    moved = lora_tensors(5, A={m: a + 1e-3 for m, a in A.items()})
    with pytest.raises(AggregationError, match=r"client 2 changed the frozen .*lora_A"):
        aggregate(clients(*sets, moved), [1, 1, 1], AggregationOptions(method="ffa"))


def test_ffa_without_A_uploads_needs_start():
    t = {k: v for k, v in lora_tensors(0).items() if "lora_B" in k}
    with pytest.raises(UsageError, match="no starting global was given"):
        aggregate(clients(t), [1], AggregationOptions(method="ffa"))
    start = ClientUpdate("start", lora_tensors(9), peft_config())
    result = aggregate(clients(t), [1], AggregationOptions(method="ffa"), start=start)
    assert torch.equal(result.tensors[PREFIX + Q + ".lora_A.weight"], start.tensors[PREFIX + Q + ".lora_A.weight"])


def test_fedsa_publishes_no_B():
    only_A = [{k: v for k, v in lora_tensors(s).items() if "lora_A" in k} for s in range(2)]
    result = aggregate(clients(*only_A), [1, 1], AggregationOptions(method="fedsa"))
    assert not any("lora_B" in k for k in result.tensors)
    assert all(layer.rel_error is None for layer in result.layers)


def test_fedex_residual_restores_U():
    sets = [lora_tensors(s) for s in range(3)]
    cfg = peft_config()
    result = aggregate(clients(*sets, configs=[cfg] * 3), [1, 1, 2], AggregationOptions(method="fedex"))
    for module in MODULES:
        total = delta(result.tensors, result.peft_config, module) + result.residual[module + ".weight"].to(torch.float64)
        assert rel(total, dense_U(sets, [cfg] * 3, [1, 1, 2], module)) <= 1e-6


def test_non_lora_tensors_are_weighted_averages():
    extra = "base_model.model.projector.weight"
    sets = [lora_tensors(s, extra={extra: torch.full((2, 3), float(s))}) for s in range(2)]
    result = aggregate(clients(*sets), [1, 3], AggregationOptions(method="fedA2"))
    assert torch.allclose(result.tensors[extra], torch.full((2, 3), 0.75, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------- validation
def test_rank_mismatch_inside_a_client_is_refused():
    t = lora_tensors(0)
    t[PREFIX + Q + ".lora_B.weight"] = torch.randn(6, 3, dtype=torch.float64)
    with pytest.raises(IncompatibleAdaptersError, match="lora_A of rank 2 but lora_B of rank 3"):
        aggregate(clients(t), [1], AggregationOptions(method="fedit"))


def test_different_targets_are_refused():
    other = lora_tensors(1, modules={Q: (6, 8)})
    with pytest.raises(IncompatibleAdaptersError, match="targets different modules"):
        aggregate(clients(lora_tensors(0), other), [1, 1], AggregationOptions(method="fedit"))


def test_nan_is_refused():
    bad = lora_tensors(1)
    bad[PREFIX + Q + ".lora_B.weight"][0, 0] = float("nan")
    with pytest.raises(AggregationError, match="client 1: tensor .*lora_B.weight contains NaN"):
        aggregate(clients(lora_tensors(0), bad), [1, 1], AggregationOptions(method="fedA2"))


@pytest.mark.parametrize(
    "kwargs, message",
    [({"method": "fedavg"}, 'method="fedavg" is not one of fedit, ffa'), ({"lambda_": -1.0}, r"lambda=-1.0 must be a finite number >= 0\. Fix: set lambda = 1.0"),
     ({"ridge": "sometimes"}, 'ridge="sometimes" is not one of auto'), ({"rcond": 0.0}, r"rcond=0.0 must be in \(0, 1\)"),
     ({"rcond": "tiny"}, 'rcond="tiny" must be in')],
)
def test_options_are_validated_in_library_terms(kwargs, message):
    # The library names the field, never a CLI flag: the CLI and Flower each re-word it (ConfigError.field).
    with pytest.raises(ConfigError, match=message) as info:
        AggregationOptions(**kwargs)
    assert "--" not in str(info.value) and info.value.field == next(iter(kwargs))


@pytest.mark.parametrize("weights, message", [([1, 0], "weight 0"), ([1, -2], "weight -2"), ([1], "1 weights for 2 clients")])
def test_weights_are_validated(weights, message):
    with pytest.raises(UsageError, match=message):
        aggregate(clients(lora_tensors(0), lora_tensors(1)), weights, AggregationOptions(method="fedit"))


def test_the_core_asks_the_method_spec_not_its_name(monkeypatch):
    # A renamed copy of each method behaves like the original: core.py branches on the spec's properties
    # (frozen_A, stacks_ranks/merges_into_base, private_B, residual), never on ``method.name``.
    import dataclasses

    from uniflow_cli.aggregation import core, methods, registry

    for name in ("ffa", "flora", "fedsa", "fedex"):
        spec = dataclasses.replace(registry.SPECS[name], name=f"my-{name}")
        monkeypatch.setitem(registry.SPECS, spec.name, spec)
        monkeypatch.setitem(core.METHODS, spec.name, methods.Method(spec, core.METHODS[name].fuse))
    sets = [lora_tensors(s) for s in range(2)]
    only_B = [{k: v for k, v in t.items() if "lora_B" in k} for t in sets]
    with pytest.raises(UsageError, match="my-ffa: clients did not upload lora_A"):
        aggregate(clients(*only_B), [1, 1], AggregationOptions(method="my-ffa"))
    for name in ("flora", "fedsa", "fedex"):
        uploads = sets if name != "fedsa" else [{k: v for k, v in t.items() if "lora_A" in k} for t in sets]
        ours = aggregate(clients(*uploads), [1, 3], AggregationOptions(method=f"my-{name}"))
        theirs = aggregate(clients(*uploads), [1, 3], AggregationOptions(method=name))
        assert ours.peft_config == theirs.peft_config and ours.merge_into_base == theirs.merge_into_base
        assert ours.notes == [note.replace(f"{name}:", f"my-{name}:", 1) for note in theirs.notes] and ours.notes
        assert ours.tensors.keys() == theirs.tensors.keys() and all(torch.equal(ours.tensors[k], theirs.tensors[k]) for k in ours.tensors)
        assert (ours.residual is None) == (theirs.residual is None)
