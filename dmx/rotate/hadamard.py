"""Orthogonal matrices for rotations: Hadamard (Kronecker or MX-block-diagonal) and random.

Every matrix returned here is orthogonal (``Q @ Q.T == I`` up to rounding) and float64.

* :func:`hadamard_pm1` -- a +-1 Hadamard matrix of order n, or None when no construction
  here reaches n. Orders: Sylvester 2^k, Paley I (q + 1, q prime, q = 3 mod 4), Paley II
  (2(q + 1), q prime, q = 1 mod 4), and Kronecker products of one Paley matrix with a
  Sylvester one (576 = 36 x 16, 192 = 12 x 16, 96 = 12 x 8, ...). Orders like 172 (a known
  Williamson matrix) are not built: the caller falls back.
* :func:`block_hadamard` -- block-diagonal, one Sylvester block per ``block`` (the 32-element
  MX block by default): each MX block of a rotated row only mixes with itself.
* :func:`random_orthogonal` -- Haar-random, seeded (QR of a Gaussian with the sign fix).
* :func:`rotation_matrix` -- the one the rotations use, by ``kind``; "auto" prefers the
  block-diagonal one (lower MXFP4 error, measured: docs/rotations.md), then the full
  Hadamard, then random.
"""
from __future__ import annotations

import numpy as np
import torch

from mxref.formats import DEFAULT_BLOCK_SIZE

from dmx.errors import DMXError

__all__ = ["hadamard_pm1", "block_hadamard", "random_orthogonal", "rotation_matrix",
           "is_orthogonal", "KINDS"]

KINDS = ("auto", "kron", "block", "random")


def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1), dtype=np.int64)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def _jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = chi(j - i), chi the quadratic character mod the prime q."""
    squares = np.zeros(q, dtype=np.int64)
    squares[[(x * x) % q for x in range(1, q)]] = 1
    chi = np.where(squares == 1, 1, -1)
    chi[0] = 0
    idx = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
    return chi[idx]


def _paley(n: int) -> np.ndarray | None:
    """A Paley Hadamard matrix of order n (q prime only: prime powers would need GF(q))."""
    q = n - 1
    if q % 4 == 3 and _is_prime(q):  # Paley I: I + [[0, 1^T], [-1, Q]], Q skew
        s = np.zeros((n, n), dtype=np.int64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
        return np.eye(n, dtype=np.int64) + s
    if n % 2 == 0:
        q = n // 2 - 1
        if q % 4 == 1 and _is_prime(q):  # Paley II from the symmetric conference matrix
            c = np.zeros((q + 1, q + 1), dtype=np.int64)
            c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
            a = np.array([[1, -1], [-1, -1]])
            b = np.array([[1, 1], [1, -1]])
            return np.kron(c, a) + np.kron(np.eye(q + 1, dtype=np.int64), b)
    return None


def hadamard_pm1(n: int) -> tuple[np.ndarray, str] | None:
    """(+-1 Hadamard matrix of order n as int64, its construction's name), or None.

    Tries the largest power of two first (n = m * 2^k, H_m Paley (or 1) x Sylvester 2^k),
    so the Paley factor is as small as possible."""
    n = int(n)
    if n < 1:
        return None
    k = (n & -n).bit_length() - 1  # 2^k is the largest power of two dividing n
    for j in range(k, -1, -1):
        m = n >> j
        small = np.ones((1, 1), dtype=np.int64) if m == 1 else _paley(m)
        if small is None:
            continue
        h = np.kron(small, _sylvester(1 << j))
        name = f"sylvester{n}" if m == 1 else f"paley{m}x{'sylvester' + str(1 << j)}"
        return h, name
    return None


def block_hadamard(n: int, block: int = DEFAULT_BLOCK_SIZE) -> torch.Tensor:
    """Block-diagonal orthogonal matrix: n/block normalised Sylvester blocks of order
    ``block`` (a power of two that divides n)."""
    if block < 1 or block & (block - 1) or n % block:
        raise DMXError(f"block-diagonal Hadamard needs a power-of-two block dividing the "
                       f"width; got width {n}, block {block}")
    h = torch.from_numpy(_sylvester(block)).double() / block ** 0.5
    return torch.block_diag(*([h] * (n // block)))


def random_orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    """Haar-distributed orthogonal n x n matrix, a function of (n, seed) only."""
    g = torch.Generator().manual_seed(int(seed))
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r))  # the sign fix makes the QR factor Haar


def rotation_matrix(n: int, kind: str = "auto", seed: int = 0,
                    block: int = DEFAULT_BLOCK_SIZE) -> tuple[torch.Tensor, str]:
    """(orthogonal float64 n x n matrix, a name saying how it was built).

    ``kind``: "block" (block-diagonal Sylvester aligned with the ``block``-element MX blocks;
    the largest power of two dividing n when ``block`` does not), "kron" (full Hadamard,
    Sylvester or Paley x Sylvester; DMXError when none is known for n), "random" (seeded
    Haar), "auto": block-diagonal when ``block`` divides n, else the full Hadamard when one
    is known, else seeded random. Block-diagonal first because it measured equal or lower
    MXFP4 error than the full Hadamard on real weights and activations (docs/rotations.md).
    """
    n = int(n)
    if kind not in KINDS:
        raise DMXError(f"unknown rotation kind {kind!r}; use one of {', '.join(KINDS)}")
    if kind == "random":
        return random_orthogonal(n, seed), f"random{n}(seed={int(seed)})"
    if kind == "block" or (kind == "auto" and n % block == 0):
        b = block if n % block == 0 else min(block, n & -n)
        return block_hadamard(n, b), f"blockdiag{n // b}xsylvester{b}"
    found = hadamard_pm1(n)
    if found is not None:
        h, name = found
        return torch.from_numpy(h).double() / n ** 0.5, name
    if kind == "kron":
        raise DMXError(f"no Hadamard construction known for width {n}; use kind "
                       f"'block' or 'random'")
    return random_orthogonal(n, seed), f"random{n}(seed={int(seed)})"


def is_orthogonal(q: torch.Tensor, atol: float | None = None) -> bool:
    """Whether ``q @ q.T`` is the identity (atol default: 1e-10 float64, 1e-5 float32)."""
    if atol is None:
        atol = 1e-10 if q.dtype == torch.float64 else 1e-5
    eye = torch.eye(q.shape[0], dtype=q.dtype, device=q.device)
    return bool(torch.allclose(q @ q.T, eye, atol=atol, rtol=0))
