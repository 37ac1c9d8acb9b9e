"""Clients' shares for federated averaging: every training example goes to exactly one client, reproducibly from the
seed; labels:k gives each client about k labels, dirichlet's skew follows alpha, and a share that would be empty stops
with one line. The round's sampled clients are the same on every rank and after a resume."""
import numpy as np
import pytest

from hvdtrain.data.partition import describe, partition
from hvdtrain.errors import DataError
from hvdtrain.strategies.federated import sampled

LABELS = np.repeat(np.arange(10), 144)[:1437]   # digits-like: 10 labels, 1,437 examples
np.random.default_rng(0).shuffle(LABELS)


@pytest.mark.parametrize("spec", ["iid", "labels:2", "labels:1", "dirichlet:0.5", "dirichlet:100"])
def test_every_example_goes_to_exactly_one_client_reproducibly(spec):
    parts = partition(LABELS, 20, spec, seed=3)
    assert len(parts) == 20 and all(len(p) for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(LABELS)))
    again = partition(LABELS, 20, spec, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition(LABELS, 20, spec, seed=4)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other))


def labels_per_client(parts):
    return [len(np.unique(LABELS[p])) for p in parts]


def test_iid_shares_are_equal_and_mixed():
    parts = partition(LABELS, 20, "iid", seed=3)
    assert {len(p) for p in parts} <= {71, 72} and min(labels_per_client(parts)) >= 8


def test_labels_k_gives_each_client_about_k_labels():
    # Shards of the label-sorted examples: a shard may straddle two labels and two shards may share one, so a client
    # has 1 to 2k labels, k most often.
    for k in (1, 2):
        counts = labels_per_client(partition(LABELS, 50, f"labels:{k}", seed=3))
        assert all(1 <= c <= 2 * k for c in counts) and np.median(counts) == k


def test_dirichlet_is_skewed_for_small_alpha_and_close_to_iid_for_large():
    skewed = labels_per_client(partition(LABELS, 20, "dirichlet:0.1", seed=3))
    even = labels_per_client(partition(LABELS, 20, "dirichlet:1000", seed=3))
    assert np.mean(skewed) < 5 and min(even) == 10


def test_a_share_that_would_be_empty_stops_with_one_line():
    with pytest.raises(DataError, match=r"^fedavg.clients=2000 is more than the 1437 training examples; use at most "
                                        r"1437 clients$"):
        partition(LABELS, 2000, "iid", seed=3)
    with pytest.raises(DataError, match=r"^data.partition=dirichlet:0.01 leaves client \d+ of 200 without examples; "
                                        r"use fewer fedavg.clients or a larger alpha$"):
        partition(LABELS, 200, "dirichlet:0.01", seed=3)


def test_the_record_lists_each_clients_examples_and_label_counts():
    parts = partition(LABELS, 4, "labels:1", seed=3)
    record = describe(parts, LABELS)
    assert [c["examples"] for c in record["clients"]] == [p.tolist() for p in parts]
    assert [sum(c["labels"].values()) for c in record["clients"]] == [len(p) for p in parts]


def test_the_rounds_sample_is_seeded_by_the_round():
    first = sampled(100, 10, seed=5, round_=0)
    assert len(set(first)) == 10 and first == sorted(first) and all(0 <= c < 100 for c in first)
    assert sampled(100, 10, seed=5, round_=0) == first and sampled(100, 10, seed=5, round_=1) != first
    assert sampled(4, 4, seed=5, round_=7) == [0, 1, 2, 3]
