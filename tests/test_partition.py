"""partition_indices and friends: pure index splitting (no I/O)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from uniflow_cli.data.partition import (
    even_sizes,
    label_entropy,
    label_histogram,
    parse_clients,
    partition_indices,
)
from uniflow_cli.errors import ConfigError, DataError, UsageError

LABELS = [f"c{i % 7}" for i in range(700)]  # 7 balanced classes


def _check_disjoint(parts, n):
    flat = np.concatenate(parts)
    assert len(flat) == len(set(flat.tolist())), "a sample went to two clients"
    assert flat.min() >= 0 and flat.max() < n
    for p in parts:
        assert np.all(np.diff(p) > 0), "indices are sorted and unique"


@pytest.mark.parametrize(
    ("total", "k", "expected"), [(10, 3, [4, 3, 3]), (9, 3, [3, 3, 3]), (2, 4, [1, 1, 0, 0]), (0, 2, [0, 0])]
)
def test_even_sizes(total, k, expected):
    assert even_sizes(total, k) == expected


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "quantity"])
def test_full_coverage_when_sizes_omitted(scheme):
    parts = partition_indices(LABELS, 6, scheme=scheme, alpha=0.5, seed=1)
    _check_disjoint(parts, len(LABELS))
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(LABELS)))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_exact_sizes(scheme):
    parts = partition_indices(LABELS, 4, scheme=scheme, alpha=0.3, sizes=[100, 50, 25, 1], seed=3)
    assert [len(p) for p in parts] == [100, 50, 25, 1]
    _check_disjoint(parts, len(LABELS))
    assert [len(p) for p in partition_indices(LABELS, 3, scheme=scheme, sizes=30, seed=0)] == [30, 30, 30]


def test_default_sizes_are_even():
    assert [len(p) for p in partition_indices(LABELS[:10], 3, scheme="dirichlet", alpha=0.1)] == [4, 3, 3]


def test_quantity_skew_keeps_total_and_varies_sizes():
    parts = partition_indices(LABELS, 10, scheme="quantity", alpha=0.3, sizes=50, seed=0)
    sizes = [len(p) for p in parts]
    assert sum(sizes) == 500 and min(sizes) >= 1
    assert max(sizes) > 2 * min(sizes)  # alpha 0.3 is far from even
    _check_disjoint(parts, len(LABELS))
    # a huge alpha approaches equal sizes
    even = [len(p) for p in partition_indices(LABELS, 10, scheme="quantity", alpha=1e6, sizes=50, seed=0)]
    assert max(even) - min(even) <= 2


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "quantity"])
def test_reproducible_and_seed_dependent(scheme):
    a = partition_indices(LABELS, 5, scheme=scheme, alpha=0.5, sizes=40, seed=7)
    b = partition_indices(LABELS, 5, scheme=scheme, alpha=0.5, sizes=40, seed=7)
    c = partition_indices(LABELS, 5, scheme=scheme, alpha=0.5, sizes=40, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_label_order_does_not_matter_for_dirichlet_classes():
    # classes are sorted by name, so the same multiset of labels at the same positions gives the same split
    labels = ["b", "a"] * 50
    assert all(
        np.array_equal(x, y)
        for x, y in zip(
            partition_indices(labels, 2, scheme="dirichlet", seed=0), partition_indices(list(labels), 2, scheme="dirichlet", seed=0)
        )
    )


def _mean_entropy(alpha: float, seed: int) -> float:
    labels = [f"c{i % 10}" for i in range(5000)]
    parts = partition_indices(labels, 10, scheme="dirichlet", alpha=alpha, sizes=200, seed=seed)
    return float(np.mean([label_entropy(labels, p) for p in parts]))


def test_dirichlet_skew_grows_as_alpha_shrinks():
    alphas = [100.0, 1.0, 0.1, 0.01]
    entropies = [np.mean([_mean_entropy(a, s) for s in range(3)]) for a in alphas]
    assert all(x > y for x, y in zip(entropies, entropies[1:])), entropies
    assert entropies[0] > 3.2  # near log2(10) = 3.32: almost uniform
    assert entropies[-1] < 0.7  # nearly one label per client


def test_iid_is_unskewed():
    labels = [f"c{i % 10}" for i in range(5000)]
    parts = partition_indices(labels, 10, scheme="iid", sizes=400, seed=0)
    assert min(label_entropy(labels, p) for p in parts) > 3.2


def test_dirichlet_runs_out_of_a_label_gracefully():
    # 2 labels, tiny alpha: every client wants one label, but the pool forces the rest to take the other.
    labels = ["x"] * 10 + ["y"] * 90
    parts = partition_indices(labels, 4, scheme="dirichlet", alpha=0.01, sizes=25, seed=0)
    assert [len(p) for p in parts] == [25] * 4
    assert sorted(np.concatenate(parts).tolist()) == list(range(100))


def test_histogram_and_entropy_hand_computed():
    labels = ["a", "a", "b", "b", "c", "a"]
    assert label_histogram(labels, np.array([0, 1, 2, 3])) == {"a": 2, "b": 2}
    assert label_entropy(labels, np.array([0, 1, 2, 3])) == pytest.approx(1.0)
    assert label_entropy(labels, np.array([0, 1, 5])) == pytest.approx(0.0)
    # a:2, b:1, c:1 -> 1.5 bits
    assert label_entropy(labels, np.array([0, 1, 2, 4])) == pytest.approx(1.5)
    assert list(label_histogram(labels, np.arange(6))) == ["a", "b", "c"]  # most frequent first


@pytest.mark.parametrize("alpha", [0, -1.0, math.nan, math.inf])
@pytest.mark.parametrize("scheme", ["dirichlet", "quantity"])
def test_bad_alpha(scheme, alpha):
    with pytest.raises(ConfigError, match=r"alpha=.* must be a finite number > 0"):
        partition_indices(LABELS, 3, scheme=scheme, alpha=alpha)


def test_alpha_is_ignored_for_iid():
    assert len(partition_indices(LABELS, 3, scheme="iid", alpha=0)) == 3


@pytest.mark.parametrize(
    ("labels", "k", "kwargs", "error", "match"),
    [
        ([], 2, {}, DataError, r"empty \(0 samples"),
        (["a", "b", "c"], 4, {}, DataError, r"more clients \(4\) than samples \(3\)"),
        (LABELS, 0, {}, ConfigError, r"num_clients=0 must be >= 1"),  # now in library terms (issue 13)
        (LABELS, 2, {"scheme": "shards"}, UsageError, r"unknown partition scheme 'shards'"),
        (LABELS, 2, {"sizes": 400}, DataError, r"need 800 samples but only 700"),
        (LABELS, 2, {"sizes": [1, 2, 3]}, UsageError, r"3 sizes given for 2 clients"),
        (LABELS, 2, {"sizes": [5, 0]}, UsageError, r"must all be >= 1"),
    ],
)
def test_bad_inputs(labels, k, kwargs, error, match):
    with pytest.raises(error, match=match):
        partition_indices(labels, k, **kwargs)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("image:5,audio:5", [("image", 5), ("audio", 5)]),
        ("mixed:3", [("mixed", 3)]),
        (" Image:2 , text:1 ,", [("image", 2), ("text", 1)]),
    ],
)
def test_parse_clients(spec, expected):
    assert parse_clients(spec) == expected


@pytest.mark.parametrize("spec", ["image", "image:0", "video:2", "image:x", "", "image:1,image:2"])
def test_parse_clients_bad(spec):
    with pytest.raises(UsageError, match="--clients"):
        parse_clients(spec)


def test_dirichlet_has_no_client_order_bias_on_a_tight_pool():
    # 60 labels, 5 clients taking 80 % of the pool: filling one client after another would leave the
    # last client with leftovers only; interleaved turns keep first and last alike.
    labels = [f"c{i % 60}" for i in range(3000)]
    first, last = [], []
    for seed in range(4):
        parts = partition_indices(labels, 5, scheme="dirichlet", alpha=0.5, sizes=480, seed=seed)
        first.append(label_entropy(labels, parts[0]))
        last.append(label_entropy(labels, parts[-1]))
    assert abs(np.mean(first) - np.mean(last)) < 0.25 * np.mean(first)
