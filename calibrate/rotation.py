"""Orthogonal rotations of a linear's input: Hadamard matrices for the widths SR transformers use.

A quantized linear ``y = x W^T + b`` gives the same output as ``y = (x R)(W R)^T + b`` for any
orthogonal ``R``. Rotating spreads a few outlier channels over all channels, so a per-tensor grid
fits the rotated input ``x R`` far better (QuaRot, Ashkboos et al., NeurIPS 2024; CompSRT,
arXiv 2601.21069, for SwinIR). The rotated weight ``W R`` is folded once; ``x R`` is computed
online (one FP matmul of width ``n``), since a linear's input here is a LayerNorm output or the
residual stream, neither of which can absorb a rotation.

Constructions (``hadamard(n)``), all exact ±1 matrices scaled by ``1/sqrt(n)``:

* Sylvester: ``n = 2^k``.
* Paley I: ``n = q + 1`` for a prime ``q ≡ 3 (mod 4)`` (e.g. 12, 20, 24, 32, 44, 48, 60, 68, ...):
  ``H = I + S`` with ``S`` the skew-symmetric Jacobsthal-bordered matrix of the Legendre symbol
  (R. E. A. C. Paley, "On orthogonal matrices", J. Math. Phys. 12, 1933).
* Kronecker products of the two: ``n = 2^k * (q + 1)``, e.g. 120 = 2 × 60 for SwinIR-light's MLP.

``random_hadamard(n, seed)`` multiplies the columns by seeded random signs (QuaRot's randomised
Hadamard): still orthogonal, and no input direction is special. Widths with no construction
(e.g. odd ``n``) raise ``ValueError`` naming the width.
"""

from __future__ import annotations

import functools

import numpy as np
import torch


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q**0.5) + 1))


def _paley1(q: int) -> np.ndarray:
    """Paley construction I: a Hadamard matrix of order q + 1 for a prime q ≡ 3 (mod 4)."""
    residues = {(i * i) % q for i in range(1, q)}
    chi = np.array([0] + [1 if i in residues else -1 for i in range(1, q)], np.int64)
    jac = np.array([[chi[(j - i) % q] for j in range(q)] for i in range(q)], np.int64)
    s = np.zeros((q + 1, q + 1), np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = jac
    return s + np.eye(q + 1, dtype=np.int64)


@functools.cache
def hadamard_pm1(n: int) -> np.ndarray:
    """An n×n matrix of ±1 with ``H H^T = n I`` (Sylvester, Paley I, or their Kronecker product).

    Raises ``ValueError`` for widths without a construction here (odd widths, or ``2^k * m``
    where no ``m`` is ``q + 1`` for a prime ``q ≡ 3 mod 4``).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"Hadamard width must be a positive integer, got {n!r}")
    k, m = 0, n
    while m % 2 == 0 and m > 1:
        m //= 2
        k += 1
    # m is odd: n = 2^k * m. Look for a Paley factor p = q + 1 with n = 2^j * p.
    base = np.ones((1, 1), np.int64)
    if m > 1:
        for j in range(k, -1, -1):
            p = m * 2 ** (k - j)
            if p % 4 == 0 and _is_prime(p - 1) and (p - 1) % 4 == 3:
                base, k = _paley1(p - 1), j
                break
        else:
            raise ValueError(f"no Hadamard matrix of width {n} is constructed here (Sylvester "
                             "2^k, Paley I q+1 for a prime q = 3 mod 4, and their products)")
    h2 = np.array([[1, 1], [1, -1]], np.int64)
    for _ in range(k):
        base = np.kron(h2, base)
    return base


def hadamard(n: int) -> torch.Tensor:
    """The orthonormal n×n Hadamard matrix ``hadamard_pm1(n) / sqrt(n)`` (float64)."""
    return torch.from_numpy(hadamard_pm1(n).astype(np.float64)) / n**0.5


def random_hadamard(n: int, seed: int = 0) -> torch.Tensor:
    """``diag(s) H`` with seeded random signs ``s``: an orthogonal (n, n) float64 matrix.

    Applied as ``x @ R``, the signs flip input channels before the Hadamard mix.
    """
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + n)
    signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1
    return signs[:, None] * hadamard(n)


def has_hadamard(n: int) -> bool:
    try:
        hadamard_pm1(n)
    except ValueError:
        return False
    return True
