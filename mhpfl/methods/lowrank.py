"""Truncated-SVD compression of model updates at an energy threshold (FedKD's wire format).

A matrix M (a conv kernel as out x in*kh*kw) is sent as the factors U_k, s_k, V_k of its
truncated SVD, for the smallest k whose singular values hold more than a fraction T of its
energy: sum_{i<=k} s_i^2 > T * sum_i s_i^2 = T * ||M||_F^2 (k = 0 for a zero matrix). The relative
squared reconstruction error is then below 1 - T. A matrix whose factors would not be smaller
than itself (k * (rows + cols + 1) >= rows * cols), and every vector, is sent dense, as the
absolute value of the tensor.

How the factors are computed (not what they are): the updates of a round are nearly low-rank
(in the quick suite's setting, T = 0.95-0.98, k was 1-6 of 500 for CNN-5's fc1 and fc2), so only
the top few singular triplets are needed, not a full SVD (42% of such a FedKD run, profiled).
In float64: the Gram matrix G = M M^T of M's shorter side (M^T M for a tall M) has the squared
singular values as eigenvalues and the left singular vectors as eigenvectors, and trace(G) =
||M||_F^2 is the total energy. LAPACK's dsyevr computes only G's top q eigenpairs (q = 8, doubled
until they hold the energy, or until k is past the dense break-even and no factor is needed),
and V_k = diag(1/s_k) U_k^T M, so U_k diag(s_k) V_k = U_k U_k^T M, M's projection on its top k
left singular vectors: the truncated SVD. Forming G squares the conditioning, so a kept s_i is
accurate to about 1e-16 (s_1 / s_i)^2 relative, against 1e-16 for a full SVD: far below the
float32 resolution (6e-8) in which the factors are sent, for any s_i above 1e-4 s_1 (the tests
compare both with a full SVD; docs/performance.md has the speed and the identical quick runs).
"""
from __future__ import annotations

from functools import cache

import numpy as np
import torch

from mhpfl.messages import Message

FACTORS = (".U", ".S", ".V")
FIRST_RANKS = 8  # eigenpairs asked for first; doubled while they do not hold the energy


@cache
def _lapack():
    """scipy.linalg and a controller of its OpenBLAS threads (imported on first use: 0.15 s)."""
    import scipy.linalg
    from threadpoolctl import ThreadpoolController
    return scipy.linalg, ThreadpoolController()


def energy_threshold(round_: int, rounds: int, t_start: float, t_end: float) -> float:
    """T(r) = T_start + (r / R) * (T_end - T_start) for round r = 1..R."""
    return t_start + (round_ / rounds) * (t_end - t_start)


def energy_rank(top: np.ndarray | torch.Tensor, total: float, energy: float) -> int:
    """Smallest k with sum_{i<=k} top_i > energy * total, for squared singular values `top`
    in descending order (0 for a zero matrix); len(top) + 1 where `top` does not hold enough."""
    if total == 0.0:
        return 0
    cum = np.cumsum(np.asarray(top, dtype=np.float64))
    return int((cum <= energy * total).sum()) + 1


def truncated_svd(m: torch.Tensor, energy: float, max_rank: int):
    """(U_k, s_k, V_k) in float64 for the smallest k with sum_{i<=k} s_i^2 > energy * ||m||_F^2,
    or None where that k is above `max_rank` (see the module's docstring for the method)."""
    a = m.double()
    tall = a.shape[0] > a.shape[1]
    a = a.T if tall else a
    n = a.shape[0]
    gram = (a @ a.T).cpu().numpy()
    total = float(np.trace(gram))
    lam, vec, q = np.zeros(0), np.zeros((n, 0)), 0
    k = energy_rank(lam, total, energy)  # 0 for a zero matrix (no eigenpair needed), else 1
    while k > q:  # the top q eigenpairs do not hold the energy yet
        if q >= min(max_rank, n):
            return None  # k > max_rank: the dense matrix is smaller
        q = min(max(2 * q, FIRST_RANKS), max_rank, n)
        lam, vec = top_eigenpairs(gram, q)
        k = energy_rank(lam, total, energy)
    s = torch.from_numpy(np.sqrt(lam[:k])).to(a.device)
    u = torch.from_numpy(vec[:, :k].copy()).to(a.device)
    v = (u.T @ a) / s[:, None]
    return (v.T, s, u.T) if tall else (u, s, v)


def top_eigenpairs(gram: np.ndarray, q: int) -> tuple[np.ndarray, np.ndarray]:
    """The q largest eigenvalues of symmetric `gram`, descending, and their eigenvectors (columns):
    LAPACK's dsyevr on that index range only, on torch's thread budget."""
    linalg, blas = _lapack()
    n = len(gram)
    with blas.limit(limits=torch.get_num_threads(), user_api="blas"):
        lam, vec = linalg.eigh(gram, subset_by_index=[n - q, n - 1], driver="evr")
    return lam[::-1].copy(), vec[:, ::-1].copy()


def compress(tensors: Message, energy: float, absolute: Message) -> Message:
    """Message for update `tensors`: each matrix as truncated-SVD factors of the update (where
    smaller than dense), every other tensor as its absolute value taken from `absolute`."""
    out: Message = {}
    for n, t in tensors.items():
        if t.dim() >= 2:
            m = t.reshape(t.shape[0], -1)
            rows, cols = m.shape
            factors = truncated_svd(m, energy, max_rank=(rows * cols - 1) // (rows + cols + 1))
            if factors is not None:
                for f, x in zip(FACTORS, factors):
                    out[n + f] = x.to(t.dtype)
                continue
        out[n] = absolute[n].clone()
    return out


def factored(message: Message, name: str) -> bool:
    return name + ".U" in message


def low_rank(message: Message, name: str, shape) -> torch.Tensor:
    u, s, v = (message[name + f] for f in FACTORS)
    return ((u * s) @ v).reshape(shape)


def apply(message: Message, base: Message) -> Message:
    """The tensors `message` describes, given the `base` it was computed against (a tensor the
    message does not mention is unchanged)."""
    out = {}
    for n, b in base.items():
        if n in message:
            out[n] = message[n].to(b.dtype).clone()
        elif factored(message, n):
            out[n] = b + low_rank(message, n, b.shape).to(b.dtype)
        else:
            out[n] = b.clone()
    return out
