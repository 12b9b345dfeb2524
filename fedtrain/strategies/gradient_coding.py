"""Straggler-tolerant gradient coding: encoding matrices and decoding (the math).

Tandon et al. 2017, "Gradient Coding"; the cyclic real code of Raviv, Tamo, Tandon and Dimakis
2018, "Gradient coding from cyclic MDS codes and expander graphs". n workers, n shards, each
worker holds s+1 shards and returns y_i = Σ_j B_ij·g_j. From any set F of at least n−s arrived
workers, a with B_Fᵀa = 1 gives Σ_{i∈F} a_i·y_i = Σ_j g_j exactly. Constructions:
- fractional repetition (FRC) when (s+1) divides n: blocks of s+1 shards, each block held by
  its s+1 workers (a replica class); decode = one arrival per class with coefficient 1;
- cyclic real code from a DFT when n−s is odd: B is the circulant of the real coefficients of
  g(x) = Π_{k∈Z}(x − ω^k), Z = s consecutive exponents centred on n/2, ω = e^{2πi/n}.
When neither applies, use s+1 (one more shard per worker): then n−(s+1) is odd.
Tandon et al.'s random cyclic construction is available on request only: its decode
coefficients can be huge (‖a‖₂ up to 6e4 measured), which multiplies quantization error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Decoding",
    "choose_construction",
    "cyclic_matrix",
    "decode",
    "frc_matrix",
    "random_cyclic_matrix",
]

log = logging.getLogger(__name__)


def frc_matrix(n: int, s: int) -> np.ndarray:
    """Fractional repetition code: worker i holds block i // (s+1)."""
    if s < 0 or s >= n or n % (s + 1):
        raise ValueError(f"fractional repetition needs (s+1) | n; got n={n}, s={s}")
    b = np.zeros((n, n))
    for i in range(n):
        c = i // (s + 1)
        b[i, c * (s + 1) : (c + 1) * (s + 1)] = 1.0
    return b


def cyclic_matrix(n: int, s: int) -> np.ndarray:
    """Circulant of g's real coefficients; row i covers shards i, i+1, ..., i+s (mod n)."""
    if s < 0 or s >= n or (n - s) % 2 == 0:
        raise ValueError(f"the cyclic DFT code needs n−s odd; got n={n}, s={s}")
    lo = (n - s + 1) // 2  # s consecutive exponents centred on n/2: symmetric under k -> n−k
    roots = np.exp(2j * np.pi * np.arange(lo, lo + s) / n)
    g = np.poly(roots)[::-1] if s else np.array([1.0 + 0j])  # coefficients g_0 .. g_s
    if np.abs(g.imag).max() > 1e-9:
        raise AssertionError("conjugate-symmetric roots must give real coefficients")
    g = g.real
    b = np.zeros((n, n))
    for i in range(n):
        for j in range(s + 1):
            b[i, (i + j) % n] = g[j]
    return b


def random_cyclic_matrix(n: int, s: int, seed: int = 0) -> np.ndarray:
    """Tandon et al.'s random cyclic code: row i covers shards i..i+s (mod n) and lies in the
    null space of a random s×n matrix H with H·1 = 0, so any n−s rows span a space holding 1."""
    if s < 0 or s >= n:
        raise ValueError(f"the random cyclic code needs 0 <= s < n; got n={n}, s={s}")
    b = np.zeros((n, n))
    if s == 0:
        return np.eye(n)
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(s, n))
    h[:, -1] = -h[:, :-1].sum(axis=1)
    for i in range(n):
        support = [(i + k) % n for k in range(s + 1)]
        b[i, support[0]] = 1.0
        b[i, support[1:]] = np.linalg.solve(h[:, support[1:]], -h[:, support[0]])
    return b


def choose_construction(n: int, s: int, coding: str = "auto") -> tuple[str, int, np.ndarray]:
    """(name, effective s, B): FRC if (s+1) | n, else cyclic if n−s is odd, else cyclic with
    s+1 shards per worker (one more than asked, so still tolerant to s stragglers); 'random'
    only when asked for."""
    if coding in ("auto", "frc") and s < n and n % (s + 1) == 0:
        return "frc", s, frc_matrix(n, s)
    if coding == "frc":
        raise ValueError(f"strategy.coding='frc' needs (s+1) | n; got n={n}, s={s}")
    if coding in ("auto", "cyclic"):
        if (n - s) % 2 == 1:
            return "cyclic", s, cyclic_matrix(n, s)
        if s + 1 < n:
            return "cyclic", s + 1, cyclic_matrix(n, s + 1)
    if coding == "random":
        log.warning(
            "strategy.coding='random': decode coefficients of the random cyclic code can be "
            "large (poorly conditioned), amplifying quantization error; prefer 'auto'"
        )
        return "random", s, random_cyclic_matrix(n, s)
    raise ValueError(f"no gradient code for n={n}, s={s} with coding={coding!r}")


@dataclass(frozen=True, slots=True)
class Decoding:
    a: np.ndarray
    """Coefficient per worker (0 for stragglers)."""
    exact: bool
    """‖B_Fᵀa − 1‖∞ < 1e-9."""
    error: float
    """ε_F = ‖B_Fᵀa − 1‖₂ (the decoded sum is off by at most ε_F·‖G‖₂)."""


def decode(b: np.ndarray, arrived: list[int] | np.ndarray) -> Decoding:
    """Min-norm a over the arrived rows with B_Fᵀa ≈ 1 (least squares), zero elsewhere."""
    n = b.shape[0]
    f = np.array(sorted(set(int(i) for i in arrived)), dtype=int)
    a = np.zeros(n)
    if f.size == 0:
        return Decoding(a=a, exact=False, error=float(np.sqrt(n)))
    sol, *_ = np.linalg.lstsq(b[f].T, np.ones(n), rcond=None)
    a[f] = sol
    residual = b[f].T @ sol - 1.0
    return Decoding(
        a=a, exact=bool(np.abs(residual).max() < 1e-9), error=float(np.linalg.norm(residual))
    )
