"""The update defenses (aggregation/robust.py): norm bounding and robust sums.

Hand-computed cases for the sums and the clipping scales, the exactness claims of docs/aggregation.md
("Defenses") against dense ΔW on small shapes, an ``uniflow aggregate`` run with one client sending 1e6×
the others' values, and every bad input (one line, nothing written).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.cli_runner import run
from tests.lora_factory import (
    MODULES,
    PREFIX,
    delta,
    lora_tensors,
    peft_config,
    write_client,
)
from uniflow_cli.adapters import AdapterMeta, read_adapter, write_adapter
from uniflow_cli.aggregation import linalg, robust
from uniflow_cli.aggregation.core import AggregationOptions, ClientUpdate, aggregate
from uniflow_cli.aggregation.truncate import truncate_to_rank
from uniflow_cli.errors import ConfigError
from uniflow_cli.peft_keys import base_weight_key
from uniflow_cli.settings import AggregateSettings, aggregate_table

F64 = torch.float64
Q, V = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
PROJ = "base_model.model.multi_modal_projector.linear.weight"  # a non-LoRA trainable tensor


def key(module: str, side: str) -> str:
    return f"{PREFIX}{module}.lora_{side}.weight"


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


# ------------------------------------------------------------------------------------------- parsing and limits
@pytest.mark.parametrize("text, kind, beta", [("median", "median", None), (" median ", "median", None), ("trimmed-mean:0.2", "trimmed-mean", 0.2),
                                              ("trimmed-mean:0.49", "trimmed-mean", 0.49), ("trimmed-mean:1e-1", "trimmed-mean", 0.1)])
def test_parse_robust(text, kind, beta):
    spec = robust.parse_robust(text)
    assert (spec.kind, spec.beta) == (kind, beta)
    assert robust.parse_robust(str(spec)) == spec
    assert robust.parse_robust(None) is None


@pytest.mark.parametrize("text, message", [
    ("mean", "is not median or trimmed-mean:β"),
    ("medain", "did you mean median"),
    ("trimed-mean:0.1", "did you mean trimmed-mean"),
    ("trimmed-mean", "needs its trimmed share β in (0, 0.5)"),
    ("trimmed-mean:x", "needs its trimmed share β"),
    ("trimmed-mean:0.5", "β = 0.5, outside (0, 0.5)"),
    ("trimmed-mean:0.6", "outside (0, 0.5)"),
    ("trimmed-mean:0", "β = 0, outside (0, 0.5)"),
    ("trimmed-mean:-0.1", "outside (0, 0.5)"),
    ("trimmed-mean:nan", "outside (0, 0.5)"),
    ("trimmed-mean:inf", "outside (0, 0.5)"),
    (3, "is not median or trimmed-mean"),
])
def test_bad_robust_names_are_one_line(text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        robust.parse_robust(text)
    assert info.value.field == "robust" and "\n" not in str(info.value)


@pytest.mark.parametrize("text, needed", [("median", 3), ("trimmed-mean:0.1", 10), ("trimmed-mean:0.2", 5), ("trimmed-mean:0.25", 4),
                                          ("trimmed-mean:0.3", 4), ("trimmed-mean:0.34", 3), ("trimmed-mean:0.49", 3)])
def test_fewest_clients(text, needed):
    spec = robust.parse_robust(text)
    assert spec.min_clients == needed
    robust.check_robust_clients(spec, needed)  # enough
    assert spec.trimmed(needed) >= 1 or spec.beta is None
    with pytest.raises(ConfigError, match=f"needs at least {needed} clients .*; {needed - 1} given"):
        robust.check_robust_clients(spec, needed - 1)


@pytest.mark.parametrize("value", [0, 0.0, -1.0, math.inf, -math.inf, math.nan, True, "1"])
def test_bad_clip_norms(value):
    with pytest.raises(ConfigError, match="clip_update_norm=.* must be a finite number > 0"):
        robust.check_clip_norm(value)
    with pytest.raises(ConfigError, match="must be a finite number > 0"):
        AggregationOptions(clip_update_norm=value)


@pytest.mark.parametrize("method", sorted(robust.robust_undefined()))
def test_robust_is_refused_where_the_target_is_a_product(method):
    with pytest.raises(ConfigError, match=f"is not defined for method {method}: .*; methods that accept it: fedit, ffa, fedsa, feddpa, fedA2"):
        AggregationOptions(method=method, robust="median")
    with pytest.raises(ConfigError, match=f"is not defined for method {method}"):
        AggregateSettings(method=method, robust="trimmed-mean:0.2")


def test_settings_carry_the_defenses():
    settings = AggregateSettings(clip_update_norm=2.5, robust="trimmed-mean:0.1")
    assert aggregate_table(settings) == {"method": "fedA2", "lambda": 1.0, "ridge": "auto", "weighting": "examples",
                                         "clip_update_norm": 2.5, "robust": "trimmed-mean:0.1"}
    assert "clip_update_norm" not in aggregate_table(AggregateSettings())  # unset: the table of before
    with pytest.raises(ConfigError, match="robust=3 must be a string"):
        AggregateSettings(robust=3)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ robust sums
W3, W4, W5 = t([1, 1, 1]) / 3, t([1, 1, 1, 1]) / 4, t([1, 1, 1, 1, 1]) / 5


@pytest.mark.parametrize("values, weights, expected", [
    ([1, 2, 100], W3, 2.0),  # an outlier does not move it
    ([100, 1, 2], W3, 2.0),  # order does not matter
    ([1, 2, 3, 4], W4, 2.5),  # even K, uniform: cumulative weight exactly 1/2 → the midpoint
    ([1, 2, 3], t([0.6, 0.2, 0.2]), 1.0),  # one client holds most of the weight
    ([1, 2, 3], t([0.5, 0.25, 0.25]), 1.5),  # exactly 1/2 below 1.5
    ([3, 1, 2], t([0.2, 0.2, 0.6]), 2.0),
    ([5, 5, 5], W3, 5.0),
])
def test_weighted_median_by_hand(values, weights, expected):
    got = robust.weighted_median([t([v]) for v in values], weights)
    assert got.dtype == F64 and got.item() == expected


@pytest.mark.parametrize("values, weights, beta, expected", [
    ([1, 2, 3, 100], W4, 0.25, 2.5),  # ⌊0.25·4⌋ = 1 each side: mean(2, 3)
    ([100, 1, 4, 2, 3], W5, 0.2, 3.0),  # ⌊0.2·5⌋ = 1: mean(2, 3, 4)
    ([0, 10, 20, 30, 1000], t([0.1, 0.2, 0.3, 0.2, 0.2]), 0.2, 20.0),  # (10·.2 + 20·.3 + 30·.2) / .7
    ([1, 2, 3, 4, 5, 6, 7, 1e9], t([1] * 8) / 8, 0.25, 4.5),  # ⌊0.25·8⌋ = 2: mean(3, 4, 5, 6)
])
def test_trimmed_mean_by_hand(values, weights, beta, expected):
    got = robust.trimmed_mean([t([v]) for v in values], weights, beta)
    assert got.item() == pytest.approx(expected, rel=1e-15)


def test_robust_sums_are_coordinatewise_and_keep_shape_and_dtype():
    X = [t([[1, 50], [7, 0]]), t([[2, -50], [8, 1]]), t([[1e6, 3], [9, 2]])]
    assert torch.equal(robust.weighted_median(X, W3), t([[2, 3], [8, 1]]))
    X32 = [x.float() for x in X]
    assert robust.weighted_median(X32, W3).dtype == torch.float32
    big = [torch.randn(3, 700, generator=torch.Generator().manual_seed(k), dtype=F64) for k in range(5)]
    old = robust._CHUNK
    try:  # chunked passes give the same bytes as one pass
        robust._CHUNK = 64
        chunked = robust.trimmed_mean(big, W5, 0.2)
    finally:
        robust._CHUNK = old
    assert torch.equal(chunked, robust.trimmed_mean(big, W5, 0.2))
    assert torch.allclose(chunked, torch.stack(big).sort(dim=0).values[1:4].mean(dim=0), atol=1e-15)


def test_combiner():
    assert robust.combiner(None) is linalg.weighted_average
    assert robust.combiner(robust.parse_robust("median")) is robust.weighted_median
    X = [t([1.0]), t([2.0]), t([3.0]), t([40.0])]
    assert robust.combiner(robust.parse_robust("trimmed-mean:0.25"))(X, W4).item() == 2.5


# ----------------------------------------------------------------------------------------------- clipping math
@pytest.mark.parametrize("X, X0, bound, expected, norm, c", [
    ([3.0, 4.0], [0.0, 0.0], 1.0, [0.6, 0.8], 5.0, 0.2),
    ([4.0, 5.0], [1.0, 1.0], 10.0, [4.0, 5.0], 5.0, 1.0),  # within the bound: untouched
    ([1.0, 1.0], [1.0, 1.0], 1.0, [1.0, 1.0], 0.0, 1.0),  # no update at all
    ([7.0, 1.0], [1.0, 9.0], 5.0, [4.0, 5.0], 10.0, 0.5),
])
def test_clip_tensor_by_hand(X, X0, bound, expected, norm, c):
    got, got_norm, got_c = robust.clip_tensor(t(X), t(X0), bound)
    assert got.tolist() == pytest.approx(expected, abs=1e-15) and got_norm == pytest.approx(norm) and got_c == pytest.approx(c)


@pytest.mark.parametrize("B, A, B0, A0, bound, expected", [
    # 1×1: (1 + c)² − 1 = 2c + c² is the pair's update; C = 1.25 → c = −1 + √2.25 = 0.5; C = 0.21 → c = 0.1
    ([[2.0]], [[2.0]], [[1.0]], [[1.0]], 1.25, 0.5),
    ([[2.0]], [[2.0]], [[1.0]], [[1.0]], 0.21, 0.1),
    ([[2.0]], [[2.0]], [[1.0]], [[1.0]], 3.0, 1.0),  # ‖update‖ = 3 = C: not clipped
    # A frozen (ΔA = 0): the update is cΔB A0, c = C / ‖ΔB A0‖ = 1 / 4
    ([[3.0], [1.0]], [[2.0, 0.0]], [[1.0], [1.0]], [[2.0, 0.0]], 1.0, 0.25),
    # B0 = 0, A0 = 5: the update 2c(5 − 3c) = 1 → c = (10 − √76) / 12, the smaller root
    ([[2.0]], [[2.0]], [[0.0]], [[5.0]], 1.0, (10 - 76 ** 0.5) / 12),
    # a zero start: the update c²·B A, c = √(C / ‖BA‖) = √(1 / 4)
    ([[2.0]], [[2.0]], [[0.0]], [[0.0]], 1.0, 0.5),
])
def test_factor_scale_by_hand(B, A, B0, A0, bound, expected):
    assert robust.factor_scale(t(B), t(A), t(B0), t(A0), bound) == pytest.approx(expected, rel=1e-12)


def random_pair(seed: int, d_out=5, d_in=7, r=3, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(d_out, r, generator=gen, dtype=F64), scale * torch.randn(r, d_in, generator=gen, dtype=F64)


@pytest.mark.parametrize("seed", range(6))
def test_factor_scale_is_the_first_scale_reaching_the_bound(seed):
    B0, A0 = random_pair(seed)
    dB, dA = random_pair(seed + 100, scale=1.5)
    B, A = B0 + dB, A0 + dA
    full = torch.linalg.norm(B @ A - B0 @ A0).item()
    assert robust.update_norm(B, A, B0, A0) == pytest.approx(full, rel=1e-12)  # Grams == dense
    bound = full / 7
    c = robust.factor_scale(B, A, B0, A0, bound)

    def norm_at(x: float) -> float:
        return torch.linalg.norm((B0 + x * dB) @ (A0 + x * dA) - B0 @ A0).item()

    assert norm_at(c) == pytest.approx(bound, rel=1e-9) and norm_at(c) <= bound * (1 + 1e-12)
    assert all(norm_at(x) <= bound * (1 + 1e-12) for x in torch.linspace(0, c, 200, dtype=F64).tolist())  # no smaller c reaches it


@pytest.mark.parametrize("mode", ["pair", "B", "zero", "A"])
def test_clip_layer_modes_against_dense(mode):
    s = 2.0
    pairs = [random_pair(k, r=2) for k in range(3)]
    B0, A0 = random_pair(50, r=2)
    As = [A0 if mode == "B" else A0 + 0.5 * A for B, A in pairs]
    Bs = [B0 + (k + 1) * B for k, (B, A) in enumerate(pairs)]
    A0s, B0s = ([None] * 3, [None] * 3) if mode == "zero" else ([A0] * 3, [B0] * 3)
    dense = [(s * (B @ A - (0 if mode == "zero" else B0 @ A0))) for A, B in zip(As, Bs)] if mode != "A" else [A - A0 for A in As]
    norms = [torch.linalg.norm(D).item() for D in dense]
    bound = (sorted(norms)[1] + sorted(norms)[2]) / 2  # only the largest is clipped
    out = robust.clip_layer(As, [None] * 3 if mode == "A" else Bs, A0s, B0s, bound, s, mode)
    assert out.norms == pytest.approx(norms, rel=1e-12)
    assert out.scales == pytest.approx([min(1.0, bound / n) for n in norms], rel=1e-12)
    for k, c in enumerate(out.scales):
        if mode == "A":
            assert torch.allclose(out.As[k] - A0, c * dense[k], atol=1e-12)
            continue
        if out.target is not None:
            UB, UA = out.target[0][k], out.target[1][k]
        else:
            UB, UA = out.Bs[k], (A0 if mode == "B" else out.As[k])
        # the target pair reproduces ΔW_start + c·(ΔW_k − ΔW_start) exactly
        start = 0 if mode == "zero" else s * B0 @ A0
        assert torch.allclose(s * UB @ UA - start, c * dense[k], atol=1e-10)
        # the factor-side pair's own update has norm min(‖update‖, C)
        A_f = out.As[k] if mode != "B" else A0
        assert torch.linalg.norm(s * out.Bs[k] @ A_f - start).item() == pytest.approx(min(norms[k], bound), rel=1e-9)
    assert sum(c < 1 for c in out.scales) == 1


def test_an_update_beyond_float64s_gram_is_clipped_to_the_start():
    B0, A0 = random_pair(1)
    B, A = torch.full_like(B0, 1e200), torch.full_like(A0, 1e200)  # finite, but its Gram overflows
    out = robust.clip_layer([A], [B], [A0], [B0], 1.0, 2.0, "pair")
    assert out.norms == [math.inf] and out.scales == [0.0] and out.factor_scales == [0.0]
    assert torch.equal(out.As[0], A0) and torch.equal(out.Bs[0], B0)
    assert torch.equal(out.target[0][0] @ out.target[1][0], B0 @ A0)  # the start's own ΔW
    log = robust.DefenseLog(["x"], 1.0, None)
    log.add("layer", out.norms, out.scales)
    assert json.dumps(log.report(), allow_nan=False)  # JSON has no inf: null


# ---------------------------------------------------------------------------------- exactness through the core
def start_global(r: int = 2, *, rslora: bool = False, extra: bool = False):
    config = peft_config(r=r, lora_alpha=4.0, use_rslora=rslora)
    tensors = lora_tensors(100, r, extra={PROJ: torch.randn(3, 4, generator=torch.Generator().manual_seed(7), dtype=F64)} if extra else None)
    return ClientUpdate("start", tensors, config)


def client_from(start: ClientUpdate, seed: int, scale: float, rank: int | None = None, drop_A: bool = False) -> ClientUpdate:
    """A client that started from ``start`` (truncated to ``rank``, as aggregation/truncate.py does) and moved by ``scale``·noise."""
    tensors, config = truncate_to_rank(start.tensors, start.peft_config, rank) if rank else (dict(start.tensors), dict(start.peft_config))
    gen = torch.Generator().manual_seed(seed)
    moved = {k: v + scale * torch.randn(v.shape, generator=gen, dtype=F64) for k, v in tensors.items()}
    if drop_A:
        moved = {k: v for k, v in moved.items() if ".lora_A." not in k}
    return ClientUpdate(f"client {seed}", moved, config), ClientUpdate(f"start of {seed}", tensors, config)


def dense_clipped(clients, starts, weights, bound, module, *, zero_start=False):
    """Σ w_k (ΔW_start,k + c_k (ΔW_k − ΔW_start,k)), c_k = min(1, C / ‖ΔW_k − ΔW_start,k‖), all dense."""
    U, cs = 0, []
    for client, start, w in zip(clients, starts, weights):
        dW0 = 0 if zero_start else delta(start.tensors, start.peft_config, module)
        D = delta(client.tensors, client.peft_config, module) - dW0
        c = min(1.0, bound / torch.linalg.norm(D).item())
        cs.append(c)
        U = U + w * (dW0 + c * D)
    return U, cs


def global_delta(result, module: str) -> torch.Tensor:
    return delta(result.tensors, result.peft_config, module)


@pytest.mark.parametrize("rslora, ranks", [(False, [2, 2, 2]), (True, [2, 1, 2]), (False, [2, 1, 1])])
def test_fedex_global_is_exactly_the_mean_of_clipped_updates(rslora, ranks):
    start = start_global(rslora=rslora)
    made = [client_from(start, k, 0.2 + 0.6 * k, rank if rank < 2 else None) for k, rank in enumerate(ranks)]
    clients, starts = [c for c, _ in made], [s for _, s in made]
    w = [1.0, 2.0, 3.0]
    bound = 10.0  # the first client's updates are within it, the others' are not
    result = aggregate(clients, w, AggregationOptions(method="fedex", clip_update_norm=bound), start=start)
    for module in MODULES:
        U, cs = dense_clipped(clients, starts, [x / 6 for x in w], bound, module)
        total = global_delta(result, module) + result.residual[base_weight_key(PREFIX + module)].double()
        assert torch.allclose(total, U, atol=1e-5 * U.abs().max().item())  # the residual is stored in float32
        row = next(r for r in result.defenses.rows if r["layer"] == PREFIX + module)
        assert row["scales"] == pytest.approx(cs, rel=1e-9)
    assert any(c < 1 for r in result.defenses.rows for c in r["scales"]) and any(c == 1 for r in result.defenses.rows for c in r["scales"])


@pytest.mark.parametrize("method", ["svd", "flexlora"])
def test_svd_is_the_best_rank_r_of_the_clipped_target(method):
    start = start_global()
    made = [client_from(start, k, 0.3 + k) for k in range(3)]
    clients, starts = [c for c, _ in made], [s for _, s in made]
    result = aggregate(clients, [1, 1, 1], AggregationOptions(method=method, clip_update_norm=1.0), start=start)
    for module in MODULES:
        U, _ = dense_clipped(clients, starts, [1 / 3] * 3, 1.0, module)
        X, S, Yh = torch.linalg.svd(U)
        best = X[:, :2] * S[:2] @ Yh[:2]
        assert torch.allclose(global_delta(result, module), best, atol=1e-9)
        assert next(layer.rel_error for layer in result.layers if layer.module == PREFIX + module) == pytest.approx(
            (torch.linalg.norm(best - U) / torch.linalg.norm(U)).item(), rel=1e-6)  # the error is against the clipped U


@pytest.mark.parametrize("method", ["fedA2", "lora-fair"])
def test_fedA2_and_lora_fair_solve_against_the_clipped_target(method):
    start = start_global()
    made = [client_from(start, k, 0.3 + k) for k in range(3)]
    clients, starts = [c for c, _ in made], [s for _, s in made]
    result = aggregate(clients, [1, 2, 1], AggregationOptions(method=method, clip_update_norm=1.0, lambda_=0.5), start=start)
    s_out = 2.0
    w = [0.25, 0.5, 0.25]
    for module in MODULES:
        U, _ = dense_clipped(clients, starts, w, 1.0, module)
        row = next(r for r in result.defenses.rows if r["layer"] == PREFIX + module)
        A0, B0 = start.tensors[key(module, "A")], start.tensors[key(module, "B")]
        factors = [(A0 + c * (cl.tensors[key(module, "A")] - A0), B0 + c * (cl.tensors[key(module, "B")] - B0))
                   for cl, c in zip(clients, row["factor_scales"])]
        A_bar = sum(wk * A for wk, (A, _) in zip(w, factors))
        assert torch.allclose(result.tensors[key(module, "A")], A_bar, atol=1e-12)
        if method == "fedA2":  # ĀĀᵀ invertible: the plain branch, B = (U / s) Āᵀ (ĀĀᵀ)⁻¹
            expected = linalg.fedA2_B_dense(A_bar, U / s_out)
        else:
            B_bar = sum(wk * B for wk, (_, B) in zip(w, factors))
            expected = linalg.lora_fair_B_dense(A_bar, B_bar, U / s_out, lambda_=0.5)
        assert torch.allclose(result.tensors[key(module, "B")], expected, atol=1e-9)


def test_flora_clips_the_whole_update():
    start = start_global()
    clients = [client_from(start, k, 0.3 + k)[0] for k in range(3)]
    result = aggregate(clients, [1, 1, 1], AggregationOptions(method="flora", clip_update_norm=2.0), start=start)
    for module in MODULES:  # the start's ΔW is 0: FLoRA's clients train a fresh LoRA on the merged base
        U, cs = dense_clipped(clients, clients, [1 / 3] * 3, 2.0, module, zero_start=True)
        assert torch.allclose(global_delta(result, module), U, atol=1e-10)
        assert min(cs) < 1


@pytest.mark.parametrize("method", ["ffa", "fedsvd"])
def test_frozen_A_moves_the_global_by_exactly_the_clipped_updates(method):
    start = start_global()
    made = [client_from(start, k, 0.3 + k, drop_A=True) for k in range(3)]
    clients, starts = [c for c, _ in made], [s for _, s in made]
    for c in clients:  # B only: the server takes A from the start
        assert not any(".lora_A." in k for k in c.tensors)
    result = aggregate(clients, [1, 1, 2], AggregationOptions(method=method, clip_update_norm=1.0), start=start)
    for module in MODULES:
        with_A = [ClientUpdate(c.label, {**c.tensors, key(module, "A"): start.tensors[key(module, "A")]}, c.peft_config) for c in clients]
        U, cs = dense_clipped(with_A, starts, [0.25, 0.25, 0.5], 1.0, module)
        assert torch.allclose(global_delta(result, module), U, atol=1e-10)
        assert min(cs) < 1


@pytest.mark.parametrize("method", ["fedit", "feddpa", "hetlora"])
def test_factor_methods_bound_each_clipped_pair(method):
    start = start_global(extra=True)
    made = [client_from(start, k, 0.3 + k) for k in range(3)]
    clients = [c for c, _ in made]
    bound = 1.0
    result = aggregate(clients, [1, 1, 1], AggregationOptions(method=method, clip_update_norm=bound), start=start)
    for module in MODULES:
        row = next(r for r in result.defenses.rows if r["layer"] == PREFIX + module)
        A0, B0 = start.tensors[key(module, "A")], start.tensors[key(module, "B")]
        dW0 = 2.0 * B0 @ A0
        pairs = []
        for client, c, norm in zip(clients, row["factor_scales"], row["update_norms"]):
            A, B = A0 + c * (client.tensors[key(module, "A")] - A0), B0 + c * (client.tensors[key(module, "B")] - B0)
            assert torch.linalg.norm(2.0 * B @ A - dW0).item() == pytest.approx(min(norm, bound), rel=1e-9)
            pairs.append((A, B))
        if method != "hetlora":  # hetlora weighs the same pairs by their norms
            assert torch.allclose(result.tensors[key(module, "A")], sum(A for A, _ in pairs) / 3, atol=1e-12)
            assert torch.allclose(result.tensors[key(module, "B")], sum(B for _, B in pairs) / 3, atol=1e-12)
    # the projector: its deviation clipped by its own norm
    X0 = start.tensors[PROJ]
    row = next(r for r in result.defenses.rows if r["layer"] == PROJ)
    clipped = [X0 + c * (cl.tensors[PROJ] - X0) for cl, c in zip(clients, row["scales"])]
    for X, norm, c in zip(clipped, row["update_norms"], row["scales"]):
        assert torch.linalg.norm(X - X0).item() == pytest.approx(min(norm, bound), rel=1e-12)
    assert torch.allclose(result.tensors[PROJ], sum(clipped) / 3, atol=1e-12)


def test_fedsa_clips_A_by_its_own_norm():
    start = start_global()
    clients = [ClientUpdate(c.label, {k: v for k, v in c.tensors.items() if ".lora_B." not in k}, c.peft_config)
               for c, _ in (client_from(start, k, 0.3 + k) for k in range(3))]
    result = aggregate(clients, [1, 1, 1], AggregationOptions(method="fedsa", clip_update_norm=0.5), start=start)
    A0 = start.tensors[key(Q, "A")]
    moved = [c.tensors[key(Q, "A")] - A0 for c in clients]
    expected = sum(A0 + min(1.0, 0.5 / torch.linalg.norm(d).item()) * d for d in moved) / 3
    assert torch.allclose(result.tensors[key(Q, "A")], expected, atol=1e-12)


def test_robust_fedA2_takes_the_median_of_each_sum():
    start = start_global(extra=True)
    clients = [client_from(start, k, 0.5)[0] for k in range(3)]
    result = aggregate(clients, [1, 1, 1], AggregationOptions(method="fedA2", robust="median", lambda_=0.0, ridge="never"))
    for module in MODULES:
        As = torch.stack([c.tensors[key(module, "A")] for c in clients])
        Bs = [c.tensors[key(module, "B")] for c in clients]
        A_bar = As.median(dim=0).values  # odd K, uniform weights: the plain median
        M = torch.stack([B @ (A @ A_bar.T) for B, A in zip(Bs, As)]).median(dim=0).values
        assert torch.equal(result.tensors[key(module, "A")], A_bar)
        assert torch.allclose(result.tensors[key(module, "B")], M @ torch.linalg.inv(A_bar @ A_bar.T), atol=1e-10)
    assert torch.equal(result.tensors[PROJ], torch.stack([c.tensors[PROJ] for c in clients]).median(dim=0).values)
    assert result.summary()["defenses"] == {"clip_update_norm": None, "robust": "median", "clipped_clients": []}


def test_robust_fedit_trimmed_mean_with_clipping():
    start = start_global()
    clients = [client_from(start, k, 0.2)[0] for k in range(4)]
    plain = aggregate(clients, [1, 1, 1, 1], AggregationOptions(method="fedit", robust="trimmed-mean:0.25"))
    A = torch.stack([c.tensors[key(Q, "A")] for c in clients]).sort(dim=0).values[1:3].mean(dim=0)
    assert torch.allclose(plain.tensors[key(Q, "A")], A, atol=1e-14)
    both = aggregate(clients, [1, 1, 1, 1], AggregationOptions(method="fedit", robust="trimmed-mean:0.25", clip_update_norm=1e9), start=start)
    assert torch.equal(both.tensors[key(Q, "A")], plain.tensors[key(Q, "A")])  # nobody clipped: the same bytes


def test_defenses_are_refused_on_vera_and_need_a_start():
    vera = {"peft_type": "VERA", "r": 2, "target_modules": ["q_proj"]}
    with pytest.raises(ConfigError, match="is not supported for VeRA adapters"):
        aggregate([ClientUpdate("a", {}, vera)], [1], AggregationOptions(robust="median"))
    clients = [ClientUpdate(f"c{k}", lora_tensors(k), peft_config()) for k in range(2)]
    with pytest.raises(ConfigError, match="measures each update from the global the clients started from, and none was given"):
        aggregate(clients, [1, 1], AggregationOptions(clip_update_norm=1.0))
    with pytest.raises(ConfigError, match=r"needs at least 3 clients \(of fewer it is their mean\); 2 given"):
        aggregate(clients, [1, 1], AggregationOptions(robust="median"))
    narrow = ClientUpdate("start", lora_tensors(9, r=1), peft_config(r=1))
    with pytest.raises(Exception, match="is not what clients of rank 2 started from"):
        aggregate(clients, [1, 1], AggregationOptions(clip_update_norm=1.0), start=narrow)


# ------------------------------------------------------------------------------- one client sends huge values
HONEST = 4


@pytest.fixture
def attacked(tmp_path: Path):
    """A start global, four honest clients that moved a little from it, and one that sends 1e6× their values."""
    start = lora_tensors(100, dtype=torch.float32)
    start_dir = write_adapter(tmp_path / "start", peft_config=peft_config(), tensors=start,
                              meta=AdapterMeta(role="global", base_fingerprint="base-abc", round=0))

    def moved(seed: int) -> dict:
        noise = lora_tensors(seed, dtype=torch.float32)
        return {k: v + 0.02 * noise[k] for k, v in start.items()}

    drops = [write_client(tmp_path / "drops", k, moved(k)) for k in range(HONEST)]
    drops.append(write_client(tmp_path / "drops", HONEST, {k: 1e6 * v for k, v in moved(HONEST).items()}))
    honest = aggregate([ClientUpdate(str(k), read_adapter(d).tensors, peft_config()) for k, d in enumerate(drops[:HONEST])], [1] * HONEST,
                       AggregationOptions())
    return start_dir, drops, honest


def distance(out: Path, honest) -> float:
    got = read_adapter(out)
    errors = []
    for module in MODULES:
        dW = delta(got.tensors, got.peft_config, module)
        ref = delta(honest.tensors, honest.peft_config, module)
        errors.append((torch.linalg.norm(dW - ref) / torch.linalg.norm(ref)).item())
    return max(errors)


@pytest.mark.parametrize("flags, method, within", [
    ([], "fedA2", None),  # the plain global is wrecked
    (["--clip-update-norm", "1"], "fedA2", 0.05),
    (["--robust", "median"], "fedA2", 0.05),
    (["--robust", "trimmed-mean:0.2"], "fedA2", 0.05),
    (["--robust", "median", "--clip-update-norm", "1"], "lora-fair", 0.05),
    (["--clip-update-norm", "1"], "fedit", 0.05),
    (["--clip-update-norm", "1"], "svd", 0.05),
])
def test_a_huge_client_wrecks_the_plain_global_but_not_the_defended_one(attacked, tmp_path, flags, method, within):
    start_dir, drops, honest = attacked
    out, report = tmp_path / "global", tmp_path / "report.json"
    result = run("aggregate", "--method", method, "--weighting", "uniform", *drops, "--start", start_dir, "--out", out, "--report", report, *flags)
    assert result.exit_code == 0, result.output
    if within is None:
        assert distance(out, honest) > 1e3
        assert "defenses" not in json.loads(report.read_text())
        return
    assert distance(out, honest) < within
    defenses = json.loads(report.read_text())["defenses"]
    assert defenses["robust"] == (flags[flags.index("--robust") + 1] if "--robust" in flags else None)
    if "--clip-update-norm" in flags:
        assert [row["client"] for row in defenses["clipped"]] == [f"client {HONEST} ({drops[HONEST]})"]  # only the attacker
        assert defenses["clipped"][0]["layers"] == defenses["clipped"][0]["of"] == len(MODULES)
        assert all(row["clipped"] == 1 and row["update_norms"][HONEST] > 1e6 and max(row["update_norms"][:HONEST]) < 1 for row in defenses["layers"])
        assert "clipped clients" in result.output and f"client {HONEST}" in result.output and "pre-clip update norms" in result.output


def test_json_and_global_record_the_defenses(attacked, tmp_path):
    start_dir, drops, _ = attacked
    out = tmp_path / "g"
    result = run("aggregate", *drops, "--start", start_dir, "--out", out, "--clip-update-norm", "1", "--robust", "median", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["defenses"]["clip_update_norm"] == 1.0 and payload["defenses"]["robust"] == "median"
    assert payload["defenses"]["clipped_clients"] == [f"client {HONEST} ({drops[HONEST]})"]
    options = json.loads((out / "uniflow.json").read_text())["extra"]["options"]
    assert options["clip_update_norm"] == 1.0 and options["robust"] == "median"


# ----------------------------------------------------------------------------------------------- bad input, CLI
@pytest.mark.parametrize("flags, n, message", [
    (["--clip-update-norm", "0"], 3, "--clip-update-norm 0.0 must be a finite number > 0"),
    (["--clip-update-norm", "-1"], 3, "--clip-update-norm -1.0 must be a finite number > 0"),
    (["--clip-update-norm", "inf"], 3, "--clip-update-norm inf must be a finite number > 0"),
    (["--clip-update-norm", "nan"], 3, "--clip-update-norm nan must be a finite number > 0"),
    (["--robust", "mean"], 3, "--robust 'mean' is not median or trimmed-mean:β"),
    (["--robust", "trimmed-mean:0.5"], 5, "has β = 0.5, outside (0, 0.5)"),
    (["--robust", "trimmed-mean:0"], 5, "has β = 0, outside (0, 0.5)"),
    (["--robust", "trimmed-mean"], 5, "needs its trimmed share β in (0, 0.5)"),
    (["--robust", "median"], 2, "--robust 'median' needs at least 3 clients (of fewer it is their mean); 2 given"),
    (["--robust", "trimmed-mean:0.2"], 4, "--robust 'trimmed-mean:0.2' needs at least 5 clients (⌊β·K⌋ = ⌊0.2·4⌋ = 0 trims nothing); 4 given"),
    (["--robust", "median", "--method", "svd"], 3, "--robust 'median' is not defined for method svd"),
    (["--robust", "median", "--method", "fedex"], 3, "is not defined for method fedex: its residual"),
    (["--robust", "median", "--method", "flora"], 3, "methods that accept it: fedit, ffa, fedsa, feddpa, fedA2, lora-fair, hetlora, fedsvd"),
    (["--clip-update-norm", "1", "--no-start"], 3, "--clip-update-norm 1.0 measures each update from the global the clients started from"),
])
def test_bad_defense_inputs_fail_in_one_line_and_write_nothing(attacked, tmp_path, flags, n, message):
    start_dir, drops, _ = attacked
    out, report = tmp_path / "global", tmp_path / "report.json"
    start = [] if "--no-start" in flags else ["--start", start_dir]
    flags = [f for f in flags if f != "--no-start"]
    result = run("aggregate", *drops[:n], *start, "--out", out, "--report", report, *flags)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 3  # one line (rich may wrap it)
    assert not out.exists() and not report.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".global")]


# ---------------------------------------------------------------------------------------------------- Flower
def test_flower_run_config_keys():
    from uniflow_cli.flower.settings import FlowerRunSettings

    settings = FlowerRunSettings.from_run_config({"clip-update-norm": 2, "robust": "median", "min-train-nodes": 3, "min-available-nodes": 3})
    overrides = settings.aggregate_overrides()
    assert (overrides["clip_update_norm"], overrides["robust"], overrides["method"]) == (2.0, "median", None)
    assert FlowerRunSettings.from_run_config({}).aggregate_overrides()["robust"] is None
    with pytest.raises(ConfigError, match="run-config robust='median' needs at least 3 replies a round, but min-train-nodes=2"):
        FlowerRunSettings.from_run_config({"robust": "median"})
    with pytest.raises(ConfigError, match="run-config robust=\"bogus\" is not median or trimmed-mean"):
        FlowerRunSettings.from_run_config({"robust": "bogus"})
    with pytest.raises(ConfigError, match="run-config clip-update-norm='x' must be a number"):
        FlowerRunSettings.from_run_config({"clip-update-norm": "x"})
