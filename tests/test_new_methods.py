"""The methods of issue 18 (item 1): LoRA-FAIR, FlexLoRA, HetLoRA and FedSVD — hand computations, dense
reference formulas on small shapes (heterogeneous ranks and rsLoRA included), the client-side truncation, and
round trips through ``uniflow local-train`` + ``uniflow aggregate`` on tiny-random."""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import pytest
import torch

from tests.cli_runner import ok
from tests.lora_factory import MODULES, PREFIX, delta, lora_tensors, peft_config
from uniflow_cli.aggregation import (
    AggregationOptions,
    ClientUpdate,
    aggregate,
    linalg,
    vera,
)
from uniflow_cli.aggregation.registry import SPECS, check_family, method_spec
from uniflow_cli.aggregation.truncate import client_start, truncate_to_rank
from uniflow_cli.errors import (
    AggregationError,
    ConfigError,
    IncompatibleAdaptersError,
    UsageError,
)

F64 = torch.float64
Q = "model.layers.0.self_attn.q_proj"


def clients(*tensor_sets, configs=None):
    configs = configs or [peft_config()] * len(tensor_sets)
    return [ClientUpdate(f"client {i}", t, c) for i, (t, c) in enumerate(zip(tensor_sets, configs))]


def rel(a, b):
    return float((a.to(F64) - b.to(F64)).norm() / b.to(F64).norm())


def scaling(cfg, r):
    return cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)


def footing(sets, configs, weights, key):
    """The reference's own fold and padding: every client's (A, B) of ``key`` (a PEFT module key) zero-padded
    to r_max, B times s_k / s_out (s_out: the first client's config at rank r_max), the normalised weights and
    U = Σ w_k B_k A_k in B's units — written out here, not taken from the code under test."""
    ranks = [t[key + ".lora_A.weight"].shape[0] for t in sets]
    r_max = max(ranks)
    s_out = scaling(configs[0], r_max)
    As, Bs = [], []
    for t, c, r in zip(sets, configs, ranks):
        A, B = t[key + ".lora_A.weight"].to(F64), t[key + ".lora_B.weight"].to(F64) * (scaling(c, r) / s_out)
        As.append(torch.cat([A, torch.zeros(r_max - r, A.shape[1], dtype=F64)]))
        Bs.append(torch.cat([B, torch.zeros(B.shape[0], r_max - r, dtype=F64)], dim=1))
    w = torch.tensor(weights, dtype=F64) / sum(weights)
    U = sum(wk * B @ A for wk, A, B in zip(w.tolist(), As, Bs))
    return As, Bs, w, U, s_out


def best_rank(U, k):
    u, s, vh = torch.linalg.svd(U.to(F64))
    return (u[:, :k] * s[:k]) @ vh[:k]


# Three clients per case: ranks, alphas and rsLoRA as the federations of the issue mix them.
CASES = {
    "one rank": [peft_config(r=2)] * 3,
    "heterogeneous ranks": [peft_config(r=2, lora_alpha=4.0), peft_config(r=4, lora_alpha=8.0), peft_config(r=3, lora_alpha=3.0)],
    "rsLoRA, heterogeneous": [peft_config(r=4, lora_alpha=4.0, use_rslora=True), peft_config(r=2, lora_alpha=16.0),
                              peft_config(r=3, lora_alpha=3.0, use_rslora=True)],
}
WEIGHTS = [1, 2, 3]


def case(name):
    configs = CASES[name]
    return [lora_tensors(seed, r=c["r"]) for seed, c in enumerate(configs)], configs


# ---------------------------------------------------------------------------------------------- hand-computed
# One 1×1 layer, rank 1, s = α/r = 1. Client 0: A = 2, B = 3; client 1: A = 4, B = 5; weights 3 : 1, so
# Ā = 2.5, B̄ = 3.5, U = 0.75·6 + 0.25·20 = 9.5, UĀᵀ = 23.75, ĀĀᵀ = 6.25.
HAND = [
    # LoRA-FAIR, λ = 1: ΔB = (23.75 − 3.5·6.25) / (6.25 + 1) = 1.875 / 7.25.
    ("lora-fair", 1.0, "auto", 2.5, 3.5 + 1.875 / 7.25),
    ("lora-fair", 1.0, "always", 2.5, 3.5 + 1.875 / 7.25),  # λ applies in both modes: it is LoRA-FAIR's regulariser
    ("lora-fair", 0.0, "always", 2.5, 9.5 / 2.5),  # λ = 0: FedA²'s least squares, 3.8
    ("lora-fair", 1.0, "never", 2.5, 9.5 / 2.5),
    # HetLoRA: ‖ΔW_0‖ = 6, ‖ΔW_1‖ = 20, so p ∝ (3·6, 1·20) = (18, 20) / 38.
    ("hetlora", 1.0, "auto", (18 * 2 + 20 * 4) / 38, (18 * 3 + 20 * 5) / 38),
]


@pytest.mark.parametrize("method, lambda_, ridge, A, B", HAND)
def test_hand_computed_rank1(method, lambda_, ridge, A, B):
    cfg = peft_config(r=1, lora_alpha=1.0, modules={"m": (1, 1)})
    c0 = {PREFIX + "m.lora_A.weight": torch.tensor([[2.0]], dtype=F64), PREFIX + "m.lora_B.weight": torch.tensor([[3.0]], dtype=F64)}
    c1 = {PREFIX + "m.lora_A.weight": torch.tensor([[4.0]], dtype=F64), PREFIX + "m.lora_B.weight": torch.tensor([[5.0]], dtype=F64)}
    result = aggregate(clients(c0, c1, configs=[cfg, cfg]), [3, 1], AggregationOptions(method=method, lambda_=lambda_, ridge=ridge))
    assert result.tensors[PREFIX + "m.lora_A.weight"].item() == pytest.approx(A, rel=1e-12)
    assert result.tensors[PREFIX + "m.lora_B.weight"].item() == pytest.approx(B, rel=1e-12)


def test_flexlora_and_fedsvd_hand_computed():
    cfg = peft_config(r=1, lora_alpha=1.0, modules={"m": (1, 1)})
    a, b = PREFIX + "m.lora_A.weight", PREFIX + "m.lora_B.weight"
    c0, c1 = {a: torch.tensor([[2.0]], dtype=F64), b: torch.tensor([[3.0]], dtype=F64)}, {a: torch.tensor([[4.0]], dtype=F64), b: torch.tensor([[5.0]], dtype=F64)}
    # FlexLoRA: the rank-1 optimum of U = 9.5 is U itself, split √S / √S as svd's: |A| = |B| = √9.5.
    flex = aggregate(clients(c0, c1, configs=[cfg, cfg]), [3, 1], AggregationOptions(method="flexlora"))
    assert abs(flex.tensors[a].item()) == pytest.approx(math.sqrt(9.5), rel=1e-12)
    assert flex.tensors[a].item() * flex.tensors[b].item() == pytest.approx(9.5, rel=1e-12)
    # FedSVD: A frozen at 2 (the start's), B̄ = 0.75·3 + 0.25·5 = 3.5, B̄A = 7 = (±7)(±1): A orthonormal, B = UΣ.
    start = ClientUpdate("start", {a: torch.tensor([[2.0]], dtype=F64), b: torch.tensor([[0.0]], dtype=F64)}, cfg)
    only_B = [{b: c[b]} for c in (c0, c1)]
    svd = aggregate(clients(*only_B, configs=[cfg, cfg]), [3, 1], AggregationOptions(method="fedsvd"), start=start)
    assert abs(svd.tensors[a].item()) == pytest.approx(1.0, rel=1e-12)
    assert svd.tensors[a].item() * svd.tensors[b].item() == pytest.approx(7.0, rel=1e-12)


# ---------------------------------------------------------------------------------------------- LoRA-FAIR
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("lambda_, ridge", [(0.3, "always"), (2.0, "auto"), (0.0, "never")])
def test_lora_fair_matches_the_dense_formula(name, lambda_, ridge):
    sets, configs = case(name)
    result = aggregate(clients(*sets, configs=configs), WEIGHTS, AggregationOptions(method="lora-fair", lambda_=lambda_, ridge=ridge))
    for module in MODULES:
        key = PREFIX + module
        As, Bs, w, U, s_out = footing(sets, configs, WEIGHTS, key)
        A_bar = sum(wk * A for wk, A in zip(w.tolist(), As))
        B_bar = sum(wk * B for wk, B in zip(w.tolist(), Bs))
        lam = 0.0 if ridge == "never" else lambda_
        G = A_bar @ A_bar.T + lam * torch.eye(A_bar.shape[0], dtype=F64)
        expected = B_bar + (U - B_bar @ A_bar) @ A_bar.T @ torch.linalg.inv(G)  # B̄ + (U − B̄Ā)Āᵀ(ĀĀᵀ + λI)⁻¹
        assert rel(result.tensors[key + ".lora_B.weight"], expected) <= 1e-9
        assert rel(result.tensors[key + ".lora_A.weight"], A_bar) <= 1e-12
        assert rel(linalg.lora_fair_B_dense(A_bar, B_bar, U, lam), expected) <= 1e-12  # the module's reference is the same formula
        # What the published adapter applies: s_out · B · A (its config says r_max and the first client's α).
        assert rel(delta(result.tensors, result.peft_config, module), s_out * expected @ A_bar) <= 1e-9


@pytest.mark.parametrize("name", CASES)
def test_lora_fair_tends_to_fedA2_least_squares_as_lambda_vanishes(name):
    sets, configs = case(name)
    fedA2 = aggregate(clients(*sets, configs=configs), WEIGHTS, AggregationOptions(method="fedA2", lambda_=0.0, ridge="never"))
    exact = aggregate(clients(*sets, configs=configs), WEIGHTS, AggregationOptions(method="lora-fair", lambda_=0.0, ridge="always"))
    tiny = aggregate(clients(*sets, configs=configs), WEIGHTS, AggregationOptions(method="lora-fair", lambda_=1e-10, ridge="always"))
    for key in fedA2.tensors:
        assert rel(exact.tensors[key], fedA2.tensors[key]) <= 1e-10
        assert rel(tiny.tensors[key], fedA2.tensors[key]) <= 1e-6
    assert {l.branch for l in exact.layers} == {"plain"} and {l.branch for l in tiny.layers} == {"ridge"}


def test_lora_fair_keeps_B_bar_when_clients_share_A():
    # U = B̄A exactly when every client has the same A: the residual (U − B̄Ā)Āᵀ is 0, so B = B̄ whatever λ.
    A = {m: torch.randn(2, d_in, generator=torch.Generator().manual_seed(7), dtype=F64) for m, (_, d_in) in MODULES.items()}
    sets = [lora_tensors(seed, A=A) for seed in range(3)]
    fair = aggregate(clients(*sets), WEIGHTS, AggregationOptions(method="lora-fair", lambda_=5.0))
    fedit = aggregate(clients(*sets), WEIGHTS, AggregationOptions(method="fedit"))
    for key in fair.tensors:
        assert rel(fair.tensors[key], fedit.tensors[key]) <= 1e-12
    assert all(layer.rel_error < 1e-7 for layer in fair.layers)


def test_lora_fair_on_a_singular_gram_without_lambda_moves_B_least():
    # Ā's rows 0 and 2 coincide: ĀĀᵀ is singular. With λ = 0 the correction is the minimum-norm ΔB (pinv), so
    # B = B̄ + (U − B̄Ā)Āᵀ(ĀĀᵀ)⁺ — B̄ plus the smallest change that fits U best.
    sets = [lora_tensors(seed, r=3) for seed in range(2)]
    for t in sets:
        for module in MODULES:
            t[PREFIX + module + ".lora_A.weight"][2] = sets[0][PREFIX + module + ".lora_A.weight"][0]
            t[PREFIX + module + ".lora_A.weight"][0] = sets[0][PREFIX + module + ".lora_A.weight"][0]
    cfg = peft_config(r=3)
    result = aggregate(clients(*sets, configs=[cfg, cfg]), [1, 1], AggregationOptions(method="lora-fair", lambda_=0.0, ridge="never"))
    assert {l.branch for l in result.layers} == {"pinv"}
    As, Bs, _, U, _ = footing(sets, [cfg, cfg], [1, 1], PREFIX + Q)
    A_bar, B_bar = sum(0.5 * A for A in As), sum(0.5 * B for B in Bs)
    expected = B_bar + (U - B_bar @ A_bar) @ A_bar.T @ torch.linalg.pinv(A_bar @ A_bar.T, hermitian=True, rtol=1e-7)
    assert rel(result.tensors[PREFIX + Q + ".lora_B.weight"], expected) <= 1e-8


# ---------------------------------------------------------------------------------------------- FlexLoRA
@pytest.mark.parametrize("name", CASES)
def test_flexlora_is_the_rank_r_max_optimum_and_each_client_starts_from_its_own(name):
    sets, configs = case(name)
    result = aggregate(clients(*sets, configs=configs), WEIGHTS, AggregationOptions(method="flexlora"))
    svd = aggregate(clients(*sets, configs=configs), WEIGHTS, AggregationOptions(method="svd"))
    r_max = max(c["r"] for c in configs)
    assert result.peft_config["r"] == r_max
    assert all(torch.equal(result.tensors[k], svd.tensors[k]) for k in svd.tensors)  # the server is svd's, bit for bit
    for module in MODULES:
        _, _, _, U, s_out = footing(sets, configs, WEIGHTS, PREFIX + module)
        U = s_out * U  # in ΔW units
        assert rel(delta(result.tensors, result.peft_config, module), best_rank(U, r_max)) <= 1e-8
        # A client of rank r_k (its own α and rsLoRA: the global's config at rank r_k) starts from the top r_k.
        for r_k in range(1, r_max):
            tensors, config = truncate_to_rank(result.tensors, result.peft_config, r_k)
            assert config["r"] == r_k and tensors[PREFIX + module + ".lora_A.weight"].shape[0] == r_k
            assert rel(delta(tensors, config, module), best_rank(U, r_k)) <= 1e-8


# ---------------------------------------------------------------------------------------------- HetLoRA
@pytest.mark.parametrize("name", CASES)
def test_hetlora_matches_the_dense_norm_weighted_average(name):
    sets, configs = case(name)
    result = aggregate(clients(*sets, configs=configs), WEIGHTS, AggregationOptions(method="hetlora"))
    for module in MODULES:
        key = PREFIX + module
        As, Bs, w, _, _ = footing(sets, configs, WEIGHTS, key)
        norms = torch.stack([delta(t, c, module).norm() for t, c in zip(sets, configs)])  # ‖s_k B_k A_k‖_F, dense
        p = w * norms / (w * norms).sum()
        assert rel(result.tensors[key + ".lora_A.weight"], sum(pk * A for pk, A in zip(p.tolist(), As))) <= 1e-12
        assert rel(result.tensors[key + ".lora_B.weight"], sum(pk * B for pk, B in zip(p.tolist(), Bs))) <= 1e-12
        assert torch.allclose(linalg.norm_weights(As, Bs, w), p, rtol=1e-12, atol=0)


def test_hetlora_weights_plainly_where_every_update_is_zero():
    # Round 0 uploads B = 0 everywhere: no norms to weigh by, so the layer keeps the plain weights (FedIT's average).
    sets = [lora_tensors(seed) for seed in range(3)]
    for t in sets:
        for key in [k for k in t if k.endswith("lora_B.weight")]:
            t[key] = torch.zeros_like(t[key])
    het = aggregate(clients(*sets), WEIGHTS, AggregationOptions(method="hetlora"))
    fedit = aggregate(clients(*sets), WEIGHTS, AggregationOptions(method="fedit"))
    assert all(torch.equal(het.tensors[k], fedit.tensors[k]) for k in fedit.tensors)


def test_hetlora_truncation_keeps_the_first_components():
    sets, configs = case("rsLoRA, heterogeneous")
    result = aggregate(clients(*sets, configs=configs), WEIGHTS, AggregationOptions(method="hetlora"))
    tensors, config = truncate_to_rank(result.tensors, result.peft_config, 2)
    for module in MODULES:
        key = PREFIX + module
        A, B = result.tensors[key + ".lora_A.weight"], result.tensors[key + ".lora_B.weight"]
        assert torch.equal(tensors[key + ".lora_A.weight"], A[:2])
        kept = scaling(result.peft_config, 4) * B[:, :2] @ A[:2]  # the global's own scaling on its first two components
        assert rel(delta(tensors, config, module), kept) <= 1e-12


# ---------------------------------------------------------------------------------------------- FedSVD
def b_only(t):
    return {k: v for k, v in t.items() if not k.endswith("lora_A.weight")}


@pytest.mark.parametrize("configs", [[peft_config(r=3)] * 3,
                                     [peft_config(r=3, lora_alpha=4.0), peft_config(r=3, lora_alpha=9.0, use_rslora=True), peft_config(r=3)]],
                         ids=["one alpha", "rsLoRA and alphas"])
def test_fedsvd_refactors_B_bar_A_into_an_orthonormal_A(configs):
    start = ClientUpdate("start", lora_tensors(9, r=3), peft_config(r=3))
    sets = [lora_tensors(seed, r=3) for seed in range(3)]
    result = aggregate(clients(*map(b_only, sets), configs=configs), WEIGHTS, AggregationOptions(method="fedsvd"), start=start)
    for module in MODULES:
        key = PREFIX + module
        A_start = start.tensors[key + ".lora_A.weight"]
        _, Bs, w, _, s_out = footing([{**t, key + ".lora_A.weight": A_start} for t in sets], configs, WEIGHTS, key)
        B_bar = sum(wk * B for wk, B in zip(w.tolist(), Bs))
        A, B = result.tensors[key + ".lora_A.weight"], result.tensors[key + ".lora_B.weight"]
        assert torch.allclose(A @ A.T, torch.eye(3, dtype=F64), atol=1e-12)  # orthonormal rows
        assert rel(B @ A, B_bar @ A_start) <= 1e-12  # exact: A is shared, so U = B̄A
        sigma = torch.linalg.svdvals(B_bar @ A_start)
        assert torch.allclose(B.norm(dim=0), sigma[:3], rtol=1e-10)  # B = UΣ: column norms are σ, in order
        assert torch.allclose(B.T @ B, torch.diag(sigma[:3] ** 2), atol=1e-9)
        assert rel(delta(result.tensors, result.peft_config, module), s_out * B_bar @ A_start) <= 1e-12
    # Exact, and reported so: the error is measured against U of the A the clients trained under (the start's),
    # not the re-factorised A it publishes.
    assert all(layer.rel_error is not None and layer.rel_error <= 1e-6 for layer in result.layers), [l.rel_error for l in result.layers]


def test_fedsvd_needs_the_start_and_a_frozen_A():
    sets = [lora_tensors(seed) for seed in range(2)]
    with pytest.raises(UsageError, match="fedsvd: clients did not upload lora_A .* no starting global was given"):
        aggregate(clients(*map(b_only, sets)), [1, 1], AggregationOptions(method="fedsvd"))
    start = ClientUpdate("start", lora_tensors(9), peft_config())
    moved = {**sets[0], PREFIX + Q + ".lora_A.weight": start.tensors[PREFIX + Q + ".lora_A.weight"] + 1e-3}
    with pytest.raises(AggregationError, match=r"fedsvd: client 0 changed the frozen .*q_proj\.lora_A.*retrain with method fedsvd"):
        aggregate(clients(moved), [1], AggregationOptions(method="fedsvd"), start=start)
    with pytest.raises(IncompatibleAdaptersError, match="fedsvd needs one frozen A, but client ranks differ"):
        aggregate(clients(b_only(lora_tensors(0, r=2)), b_only(lora_tensors(1, r=3)), configs=[peft_config(r=2), peft_config(r=3)]),
                  [1, 1], AggregationOptions(method="fedsvd"), start=start)


def test_orthonormal_refactor_of_a_narrow_layer_and_of_zero():
    # r = 4 > d_in = 3: only three orthonormal directions exist, the fourth row is 0; B = 0 keeps an orthonormal A.
    gen = torch.Generator().manual_seed(3)
    A, B = torch.randn(4, 3, generator=gen, dtype=F64), torch.randn(5, 4, generator=gen, dtype=F64)
    B_new, A_new = linalg.orthonormal_refactor(B, A)
    assert A_new.shape == (4, 3) and B_new.shape == (5, 4)
    assert torch.allclose(A_new[:3] @ A_new[:3].T, torch.eye(3, dtype=F64), atol=1e-12) and not A_new[3].any()
    assert rel(B_new @ A_new, B @ A) <= 1e-12
    B0, A0 = linalg.orthonormal_refactor(torch.zeros(5, 2, dtype=F64), A[:2])
    assert not B0.any() and torch.allclose(A0 @ A0.T, torch.eye(2, dtype=F64), atol=1e-12)


# ---------------------------------------------------------------------------------------------- truncation
@pytest.mark.parametrize("r_global, r_client, rslora", [(4, 2, False), (4, 2, True), (4, 1, True), (3, 3, False), (2, 5, True)])
def test_truncate_to_rank_keeps_the_first_components_and_their_update(r_global, r_client, rslora):
    proj = {"base_model.model.projector.weight": torch.randn(3, 3, dtype=F64)}
    tensors = lora_tensors(5, r=r_global, extra=proj)
    cfg = peft_config(r=r_global, lora_alpha=6.0, use_rslora=rslora)
    out, config = truncate_to_rank(tensors, cfg, r_client)
    k = min(r_global, r_client)
    assert config["r"] == min(r_global, r_client)
    assert torch.equal(out["base_model.model.projector.weight"], proj["base_model.model.projector.weight"])
    for module in MODULES:
        key = PREFIX + module
        A, B = tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"]
        assert torch.equal(out[key + ".lora_A.weight"], A[:k])
        assert rel(delta(out, config, module), scaling(cfg, r_global) * B[:, :k] @ A[:k]) <= 1e-12
    if r_client >= r_global:  # nothing to cut: the adapter comes back as it was
        assert config == cfg and all(out[key] is tensors[key] for key in tensors)


def test_truncate_honours_rank_pattern_and_refuses_bad_ranks():
    modules = dict(MODULES)
    tensors = lora_tensors(1, r=4)
    v = PREFIX + "model.layers.0.self_attn.v_proj"
    tensors[v + ".lora_A.weight"], tensors[v + ".lora_B.weight"] = tensors[v + ".lora_A.weight"][:2], tensors[v + ".lora_B.weight"][:, :2]
    cfg = peft_config(r=4, modules=modules, rank_pattern={"model.layers.0.self_attn.v_proj": 2})
    out, config = truncate_to_rank(tensors, cfg, 3)
    assert config["r"] == 3 and config["rank_pattern"] == {"model.layers.0.self_attn.v_proj": 2}
    assert out[PREFIX + Q + ".lora_A.weight"].shape[0] == 3 and torch.equal(out[v + ".lora_A.weight"], tensors[v + ".lora_A.weight"])
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="rank must be a positive integer"):
            truncate_to_rank(tensors, cfg, bad)
    with pytest.raises(ValueError, match="only LoRA adapters"):
        truncate_to_rank(tensors, {**cfg, "peft_type": "VERA"}, 2)


def test_client_start_truncates_only_a_larger_lora_global():
    from uniflow_cli.adapters import LoadedAdapter

    start = LoadedAdapter(None, peft_config(r=4), lora_tensors(2, r=4), None)
    assert client_start(start, None) is start and client_start(start, 4) is start and client_start(start, 8) is start
    cut = client_start(start, 2)
    assert cut.peft_config["r"] == 2 and cut.tensors[PREFIX + Q + ".lora_A.weight"].shape[0] == 2 and start.peft_config["r"] == 4
    vera_start = dataclasses.replace(start, peft_config={"peft_type": "VERA", "r": 4})
    assert client_start(vera_start, 2) is vera_start


# ---------------------------------------------------------------------------------------------- the registry
@pytest.mark.parametrize("name, uploads, frozen_A, truncates, line_up, on_vera", [
    ("lora-fair", ("A", "B"), False, True, True, True),
    ("flexlora", ("A", "B"), False, True, False, False),
    ("hetlora", ("A", "B"), False, True, False, False),
    ("fedsvd", ("B",), True, True, False, False),
])
def test_registry_facts(name, uploads, frozen_A, truncates, line_up, on_vera):
    spec = method_spec(name)
    assert (spec.uploads, spec.frozen_A, spec.truncates_to_client_rank, spec.line_up, spec.on_vera) == (uploads, frozen_A, truncates, line_up, on_vera)
    assert spec.pads and not spec.keeps_client_state and not spec.folds_history
    if not on_vera:
        with pytest.raises(ConfigError, match=rf"method=\W?{name}\W? is not defined for VeRA \(.*\); defined: fedit, ffa, fedsa, feddpa, fedex, fedA2, lora-fair"):
            check_family(name, "vera")


def test_every_padding_method_truncates_a_smaller_clients_start():
    assert [n for n, s in SPECS.items() if not s.truncates_to_client_rank] == ["flora"]  # it stacks, never pads


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
    from tests.cli_runner import run
    from tests.lora_factory import write_client

    drops = [write_client(tmp_path / "drops", k, lora_tensors(k, dtype=torch.float32)) for k in range(2)]
    out = tmp_path / "global"
    result = run("aggregate", "--method", "lora-fair", "--lambda", "-1", *drops, "--out", out)
    assert result.exit_code == 2 and "--lambda -1.0 must be a finite number >= 0" in result.output, result.output
    result = run("aggregate", "--method", "fedsvd", *[write_client(tmp_path / "b", k, b_only(lora_tensors(k, dtype=torch.float32))) for k in range(2)],
                 "--out", out)
    assert result.exit_code != 0 and "no starting global was given" in result.output and "Traceback" not in result.output, result.output
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- LoRA-FAIR on VeRA
def vera_layer(seed, r=3, d_in=7, d_out=5, k=3):
    gen = torch.Generator().manual_seed(seed)
    A, B = torch.randn(r, d_in, generator=gen, dtype=F64), torch.randn(d_out, r, generator=gen, dtype=F64)
    return A, B, [torch.randn(r, generator=gen, dtype=F64) for _ in range(k)], [torch.randn(d_out, generator=gen, dtype=F64) for _ in range(k)]


@pytest.mark.parametrize("lambda_, ridge", [(0.5, "auto"), (3.0, "always"), (0.0, "always"), (2.0, "never")])
def test_vera_lora_fair_matches_the_dense_row_solution(lambda_, ridge):
    A, B, ds, bs = vera_layer(1)
    out = vera.fuse_vera_layer(vera.VeraLayerInputs(A, B, ds, bs, WEIGHTS), AggregationOptions(method="lora-fair", lambda_=lambda_, ridge=ridge))
    w = torch.tensor(WEIGHTS, dtype=F64) / 6
    d_bar, b_bar = sum(wk * d for wk, d in zip(w.tolist(), ds)), sum(wk * b for wk, b in zip(w.tolist(), bs))
    U = sum(wk * vera.vera_delta(A, B, d, b) for wk, d, b in zip(w.tolist(), ds, bs))
    V = (B * d_bar[None, :]) @ A  # row i: v_i = B_i Λ_d̄ A
    lam = 0.0 if ridge == "never" else lambda_
    # b_i = argmin ‖b_i v_i − U_i‖² + λ(b_i − b̄_i)² = (⟨v_i, U_i⟩ + λ b̄_i) / (‖v_i‖² + λ)
    expected = ((V * U).sum(dim=1) + lam * b_bar) / ((V * V).sum(dim=1) + lam)
    assert torch.allclose(out.b, expected, rtol=1e-10, atol=0)
    assert torch.allclose(out.d, d_bar, rtol=1e-12, atol=0)
    fedA2 = vera.fuse_vera_layer(vera.VeraLayerInputs(A, B, ds, bs, WEIGHTS), AggregationOptions(method="fedA2", lambda_=0.0, ridge="never"))
    if lam == 0.0:  # λ → 0: FedA²'s least-squares b
        assert torch.allclose(out.b, fedA2.b, rtol=1e-10, atol=0)


def test_vera_lora_fair_returns_b_bar_when_clients_share_d():
    A, B, ds, bs = vera_layer(2)
    out = vera.fuse_vera_layer(vera.VeraLayerInputs(A, B, [ds[0]] * 3, bs, WEIGHTS), AggregationOptions(method="lora-fair", lambda_=4.0))
    assert torch.equal(out.b, vera.average(bs, torch.tensor(WEIGHTS, dtype=F64) / 6))


# ---------------------------------------------------------------------------------------------- round trips on tiny-random
@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """``uniflow init`` at rank 4 with rsLoRA (so the truncation's rescaling is not 1) + two image shards."""
    import json

    from tests.workspace_factory import write_shard

    ws = tmp_path_factory.mktemp("tpl") / "fed"
    ok("init", ws, "--preset", "tiny-random", "--modalities", "image", "--r", "4", "--lora-alpha", "8", "--rslora")
    for client in ("0", "1"):
        write_shard(ws / "data" / "clients" / client, "image", offset=4 * int(client))
    (ws / "data" / "partition.json").write_text(json.dumps({"clients": [{"id": int(c), "modalities": ["image"]} for c in ("0", "1")]}))
    return ws


@pytest.fixture
def ws(template, tmp_path) -> Path:
    shutil.copytree(template, tmp_path / "fed")
    return tmp_path / "fed"


def set_rank(ws: Path, r: int) -> None:
    """A client's rank is its ``[lora] r``: rewritten here between two clients, as two machines' own tables would differ."""
    text = (ws / "uniflow.toml").read_text()
    (ws / "uniflow.toml").write_text(text.replace("[lora]\nr = 4\n", f"[lora]\nr = {r}\n").replace("[lora]\nr = 2\n", f"[lora]\nr = {r}\n"))


def train(ws: Path, client: str, method: str, round_: int) -> None:
    ok("local-train", "--client", client, "-w", ws, "--round", round_, "--method", method, "--steps", "2", "--lr", "5e-3", "--stages", "joint")


def lora_keys(tensors):
    return sorted(k[: -len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight"))


def module_of(key):
    return key[len(PREFIX):]


def test_fedsvd_round_trip_keeps_A_frozen_and_publishes_an_orthonormal_A(ws):
    from uniflow_cli.adapters import read_adapter
    from uniflow_cli.local_train import run_local_train
    from uniflow_cli.models import adapter_tensors, load_model

    for client in ("0", "1"):
        train(ws, client, "fedsvd", 1)
    drops = [read_adapter(ws / "rounds" / "1" / "clients" / c) for c in ("0", "1")]
    assert all(not any(k.endswith("lora_A.weight") for k in d.tensors) for d in drops)  # B only
    ok("aggregate", "--round", "1", "-w", ws, "--method", "fedsvd")
    g0, g1 = read_adapter(ws / "rounds" / "0" / "global"), read_adapter(ws / "rounds" / "1" / "global")
    w = torch.tensor([d.meta.num_examples for d in drops], dtype=F64)
    w = w / w.sum()
    checked = 0
    for key in lora_keys(g1.tensors):
        A = g1.tensors[key + ".lora_A.weight"].to(F64)
        assert torch.allclose(A @ A.T, torch.eye(A.shape[0], dtype=F64), atol=1e-5), key
        B_bar = sum(wk * d.tensors[key + ".lora_B.weight"].to(F64) for wk, d in zip(w.tolist(), drops))
        target = B_bar @ g0.tensors[key + ".lora_A.weight"].to(F64)
        if target.norm() > 0:
            assert rel(g1.tensors[key + ".lora_B.weight"].to(F64) @ A, target) <= 1e-5, key
            checked += 1
    assert checked > len(lora_keys(g1.tensors)) // 2  # training moved most layers' B
    # Round 2 starts from the orthonormal A and never moves it: the trained model still holds the global's A.
    built = []

    def build(*args, **kwargs):
        built.append(load_model(*args, **kwargs))
        return built[-1]

    run_local_train(workspace=ws, client="0", method="fedsvd", round_=2, overrides={"steps": 2, "lr": 5e-3, "stages": "joint"}, build=build)
    trained = adapter_tensors(built[-1])
    for key in lora_keys(g1.tensors):
        assert torch.equal(trained[key + ".lora_A.weight"], g1.tensors[key + ".lora_A.weight"].to(torch.float32)), key
    assert any(not torch.equal(trained[k], g1.tensors[k].to(torch.float32)) for k in trained if k.endswith("lora_B.weight"))


@pytest.mark.parametrize("method", ["flexlora", "hetlora"])
def test_heterogeneous_ranks_round_trip(ws, method):
    from uniflow_cli.adapters import read_adapter
    from uniflow_cli.client_round import starting_model
    from uniflow_cli.global_info import recorded_settings
    from uniflow_cli.models import adapter_tensors

    train(ws, "0", method, 1)  # rank 4, the global's
    set_rank(ws, 2)
    train(ws, "1", method, 1)  # rank 2: its start is the round-0 global's first two components
    drops = [read_adapter(ws / "rounds" / "1" / "clients" / c) for c in ("0", "1")]
    assert [d.peft_config["r"] for d in drops] == [4, 2]
    assert {d.tensors[k].shape[0] for d in drops[1:] for k in d.tensors if k.endswith("lora_A.weight")} == {2}
    ok("aggregate", "--round", "1", "-w", ws, "--method", method)
    g1 = read_adapter(ws / "rounds" / "1" / "global")
    assert g1.peft_config["r"] == 4
    w = [d.meta.num_examples for d in drops]
    checked = 0
    for key in lora_keys(g1.tensors):
        module = module_of(key)
        U = sum(wk / sum(w) * delta(d.tensors, d.peft_config, module) for wk, d in zip(w, drops))
        got = delta(g1.tensors, g1.peft_config, module)
        if U.norm() == 0:
            continue
        if method == "flexlora":
            assert rel(got, best_rank(U, 4)) <= 1e-4, key
        else:
            As, Bs, wn, _, s_out = footing([d.tensors for d in drops], [d.peft_config for d in drops], w, key)
            norms = torch.stack([delta(d.tensors, d.peft_config, module).norm() for d in drops])
            p = wn * norms / (wn * norms).sum()
            expected = s_out * sum(pk * B for pk, B in zip(p.tolist(), Bs)) @ sum(pk * A for pk, A in zip(p.tolist(), As))
            assert rel(got, expected) <= 1e-5, key
        checked += 1
    assert checked > len(lora_keys(g1.tensors)) // 2
    # The rank-2 client's round-2 model starts from the rank-4 global's first two components, ΔW kept.
    model_settings, lora = recorded_settings(g1.meta, "global")
    model, _ = starting_model(g1, model_settings, dataclasses.replace(lora, r=2), method_spec(method), round_=2)
    start = adapter_tensors(model)
    for key in lora_keys(g1.tensors):
        A, B = g1.tensors[key + ".lora_A.weight"].to(F64), g1.tensors[key + ".lora_B.weight"].to(F64)
        assert start[key + ".lora_A.weight"].shape[0] == 2
        kept = scaling(g1.peft_config, 4) * B[:, :2] @ A[:2]
        assert torch.allclose(delta(start, {**g1.peft_config, "r": 2}, module_of(key)), kept, atol=1e-6), key
        if method == "flexlora" and kept.norm() > 0:  # SVD-ordered: the first two are the best rank-2 ΔW of the global
            assert rel(kept, best_rank(delta(g1.tensors, g1.peft_config, module_of(key)), 2)) <= 1e-4, key
