"""The truncated SVD behind FedKD's compression (methods/lowrank.py): computed from the Gram
matrix's top eigenpairs, it must be the full SVD's truncation (same rank, same singular values,
same reconstruction up to float64 rounding) for every shape, energy and rank, and keep scipy's
BLAS to torch's thread budget."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mhpfl.methods import lowrank
from mhpfl.methods.lowrank import FIRST_RANKS, energy_rank, truncated_svd

FAST = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def matrix(rows, cols, rank, noise, seed):
    """A rank-`rank` matrix with spread singular values, plus `noise` times a dense one."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(rows, rank, generator=g, dtype=torch.float64), torch.randn(rank, cols, generator=g, dtype=torch.float64)
    scale = torch.logspace(0, -2, rank, dtype=torch.float64)
    return (a * scale) @ b + noise * torch.randn(rows, cols, generator=g, dtype=torch.float64)


def reference(m, energy):
    """The truncation of the full SVD (LAPACK's gesdd) at `energy`: (k, U_k s_k V_k, s_k)."""
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    k = energy_rank(s ** 2, float((s ** 2).sum()), energy)
    return k, (u[:, :k] * s[:k]) @ vh[:k], s[:k]


def check_against_full_svd(m, energy):
    k, rec, s = reference(m, energy)
    u, got_s, v = truncated_svd(m, energy, max_rank=min(m.shape))
    assert got_s.numel() == k and u.shape == (m.shape[0], k) and v.shape == (k, m.shape[1])
    scale = float(torch.linalg.matrix_norm(m, 2))
    assert torch.allclose(got_s, s, rtol=0, atol=1e-11 * scale)
    assert torch.allclose((u * got_s) @ v, rec, rtol=0, atol=1e-10 * scale)
    eye = torch.eye(k, dtype=torch.float64)
    assert torch.allclose(u.T @ u, eye, atol=1e-9) and torch.allclose(v @ v.T, eye, atol=1e-9)
    return k


@FAST
@given(st.integers(1, 60), st.integers(1, 60), st.integers(1, 30), st.sampled_from([0.0, 1e-3, 0.05, 1.0]),
       st.sampled_from([0.5, 0.9, 0.95, 0.98, 0.999]), st.integers(0, 2**31 - 1))
def test_the_truncated_svd_is_the_full_svds_truncation(rows, cols, rank, noise, energy, seed):
    """Any shape (tall, wide, square, vectors as 1 x n), rank, noise level and energy: the rank
    the energy rule picks on the full SVD, its singular values, and its reconstruction."""
    check_against_full_svd(matrix(rows, cols, min(rank, rows, cols), noise, seed), energy)


@pytest.mark.parametrize("shape", [(500, 512), (512, 500), (32, 400), (400, 32)])
def test_a_rank_above_the_first_request_doubles_it_until_the_energy_is_held(shape):
    """Rank 30 at energy 0.999 needs more than the FIRST_RANKS eigenpairs asked for first."""
    k = check_against_full_svd(matrix(*shape, rank=min(30, *shape), noise=1e-4, seed=3), 0.999)
    assert k > 2 * FIRST_RANKS


def test_above_max_rank_there_are_no_factors_and_at_it_there_are():
    m = matrix(40, 50, rank=12, noise=0.0, seed=4)
    k, _, _ = reference(m, 0.999)
    assert truncated_svd(m, 0.999, max_rank=k - 1) is None
    assert truncated_svd(m, 0.999, max_rank=k)[1].numel() == k
    assert truncated_svd(m, 0.999, max_rank=0) is None
    # energy 1 on a full-rank matrix: only all its singular values hold it, more than max_rank
    full = matrix(40, 50, rank=12, noise=0.05, seed=4)
    assert truncated_svd(full, 1.0, max_rank=(40 * 50 - 1) // (40 + 50 + 1)) is None


@pytest.mark.parametrize("shape", [(6, 9), (9, 6)])
def test_a_zero_matrix_has_rank_zero_factors(shape):
    u, s, v = truncated_svd(torch.zeros(shape), 0.95, max_rank=0)
    assert u.shape == (shape[0], 0) and s.shape == (0,) and v.shape == (0, shape[1])
    assert torch.equal((u * s) @ v, torch.zeros(shape, dtype=torch.float64))


def test_the_eigensolver_runs_on_torchs_thread_budget(monkeypatch):
    """scipy's LAPACK runs on its own OpenBLAS threads; with --jobs J each run has cores/J torch
    threads, and the eigensolver must not use more than that."""
    from threadpoolctl import threadpool_info
    linalg, blas = lowrank._lapack()
    seen = []

    class Spy:
        @staticmethod
        def eigh(*args, **kwargs):
            seen.append({i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})
            return linalg.eigh(*args, **kwargs)

    monkeypatch.setattr(lowrank, "_lapack", lambda: (Spy, blas))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        truncated_svd(matrix(50, 60, rank=5, noise=0.01, seed=5), 0.95, max_rank=20)
    finally:
        torch.set_num_threads(before)
    assert seen and all(threads == {1} for threads in seen)
