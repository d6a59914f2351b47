import numpy as np
import pytest

from mhpfl.datasets.partition import (PartitionSpec, apply_shares, make_partition,
                                      pathological_shares, subsample)
from mhpfl.errors import UserError
from mhpfl.seeding import np_rng


def fake_labels(n_per_class=600, classes=10, seed=0):
    y = np.repeat(np.arange(classes), n_per_class)
    return np_rng(seed, "labels").permutation(y)


@pytest.mark.parametrize("n,k,c", [(10, 2, 10), (50, 2, 10), (100, 2, 10), (20, 10, 100), (5, 4, 10)])
def test_pathological_shares_structure(n, k, c):
    s = pathological_shares(n, c, k, np_rng(1, "x"))
    held = s > 0
    assert (held.sum(1) == k).all()  # every client holds exactly K distinct classes
    assert (held.sum(0) == n * k // c).all()  # every class shared by N*K/C clients
    np.testing.assert_allclose(s.sum(0), 1.0)
    m = n * k // c
    if m > 1:  # U(0.4, 0.6) normalised: within [0.4 / (0.4 + 0.6 (m-1)), 0.6 / (0.6 + 0.4 (m-1))]
        lo, hi = 0.4 / (0.4 + 0.6 * (m - 1)), 0.6 / (0.6 + 0.4 * (m - 1))
        assert s[held].min() >= lo - 1e-12 and s[held].max() <= hi + 1e-12


def test_partition_train_test_match_no_overlap_and_deterministic():
    tr, te = fake_labels(600), fake_labels(100, seed=1)
    spec = PartitionSpec.parse("pathological:2")
    p = make_partition(tr, te, 10, 10, spec, seed=3, val_size=1000, public_size=400)
    q = make_partition(tr, te, 10, 10, spec, seed=3, val_size=1000, public_size=400)
    r = make_partition(tr, te, 10, 10, spec, seed=4, val_size=1000, public_size=400)
    owned = np.concatenate([c.train for c in p.clients] + [c.val for c in p.clients] + [p.public])
    assert len(owned) == len(np.unique(owned))  # no training sample owned twice
    test_owned = np.concatenate([c.test for c in p.clients])
    assert len(test_owned) == len(np.unique(test_owned))
    assert len(p.public) == 400
    assert not set(p.public) & set(np.concatenate([c.train for c in p.clients]))
    for c in p.clients:
        assert len(c.classes) == 2
        assert set(np.unique(tr[c.train])) == set(np.unique(te[c.test])) == set(c.classes)
    for a, b in zip(p.clients, q.clients):
        assert np.array_equal(a.train, b.train) and np.array_equal(a.test, b.test)
    assert any(not np.array_equal(a.train, b.train) for a, b in zip(p.clients, r.clients))


def test_client_share_follows_drawn_fraction():
    tr, te = fake_labels(1000), fake_labels(1000, seed=1)
    p = make_partition(tr, te, 10, 10, PartitionSpec.parse("pathological:2"), seed=0)
    for i, c in enumerate(p.clients):
        for cls in c.classes:
            n_class = (tr == cls).sum()
            got = (tr[c.train] == cls).sum()
            assert got == int(np.floor(n_class * p.shares[i, cls])) or abs(got - n_class * p.shares[i, cls]) <= 1


def test_dirichlet_partition_and_min_size():
    tr, te = fake_labels(500), fake_labels(100, seed=1)
    p = make_partition(tr, te, 10, 8, PartitionSpec.parse("dirichlet:0.5"), seed=0)
    assert all(len(c.train) >= 10 for c in p.clients)
    for i, c in enumerate(p.clients):  # the test split follows the same shares
        for cls in range(10):
            want = int(np.floor((te == cls).sum() * p.shares[i, cls]))
            assert (te[c.test] == cls).sum() == want


def test_train_fraction_keeps_every_class():
    tr = fake_labels(500)
    idx = np.flatnonzero(np.isin(tr, [1, 7]))
    kept = subsample(tr, idx, 0.01, np_rng(0, "f"))
    assert set(np.unique(tr[kept])) == {1, 7}
    assert len(kept) == pytest.approx(0.01 * len(idx), abs=2)


@pytest.mark.parametrize("text,msg", [("pathological:11", "K <= 10"), ("pathological:3", "divisible"),
                                      ("dirichlet:-1", "bad partition"), ("iid", "bad partition"),
                                      ("dirichlet:inf", "bad partition"), ("dirichlet:nan", "bad partition")])
def test_impossible_partitions(text, msg):
    with pytest.raises(UserError, match=msg):
        spec = PartitionSpec.parse(text)
        make_partition(fake_labels(50), fake_labels(10), 10, 5, spec, seed=0)


def test_apply_shares_never_gives_a_sample_twice():
    y = fake_labels(100)
    shares = np.full((4, 10), 0.25)
    parts = apply_shares(y, np.arange(len(y)), shares, np_rng(0, "a"))
    allidx = np.concatenate(parts)
    assert len(allidx) == len(np.unique(allidx)) == len(y)


def test_a_public_pool_larger_than_the_held_out_one_says_how_to_drop_it():
    """--val-size 0 with the default public pool (a client's mean private set): the error names
    both ways out, including --public-size 0 for runs whose methods use no public data."""
    with pytest.raises(UserError, match=r"public pool \(300 samples.*--val-size 0\).*--public-size \(0 where"):
        make_partition(fake_labels(3000), fake_labels(500), 10, 10, PartitionSpec.parse("pathological:2"),
                       seed=0, val_size=0, public_size=300)



@pytest.mark.parametrize("clients,msg", [
    (60, "60 clients cannot each hold a training and a test sample: the training pool has 1000 and the test "
         "set 50; use fewer --clients"),  # more clients than test samples: refused before any split
    (10**9, "the training pool has 1000"),  # at once, not after drawing a billion clients' shares
    (40, "client .* got no training or test data"),  # 40 shares of 5 test samples per class: some are empty
])
def test_more_clients_than_the_data_can_hold_is_one_line(clients, msg):
    with pytest.raises(UserError, match=msg):
        make_partition(fake_labels(100), fake_labels(5), 10, clients, PartitionSpec.parse("pathological:10"),
                       seed=0, train_fraction=0.5)


def test_subsampling_an_empty_share_keeps_it_empty():
    """(It crashed in np.concatenate, before the one-line error above could be raised.)"""
    assert len(subsample(fake_labels(10), np.empty(0, dtype=np.int64), 0.5, np_rng(0, "f"))) == 0
