"""Shamir secret sharing of short byte strings over GF(2**31 - 1), vectorised with numpy.

A 32-byte secret is cut into 3-byte chunks (each below the prime) and every chunk is
shared with its own random polynomial of degree ``threshold - 1``; all chunks and all
shares are evaluated at once with Horner's rule, reducing modulo the prime after each
multiply so int64 never overflows.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

PRIME = 2**31 - 1
_CHUNK = 3


class ShamirError(ValueError):
    """Shares that cannot be combined (too few, duplicated x, malformed)."""


def _chunks(secret: bytes) -> np.ndarray:
    padded = secret + b"\0" * (-len(secret) % _CHUNK)
    raw = np.frombuffer(padded, dtype=np.uint8).reshape(-1, _CHUNK).astype(np.int64)
    return (raw[:, 0] << 16) | (raw[:, 1] << 8) | raw[:, 2]


def _unchunk(values: np.ndarray, length: int) -> bytes:
    if np.any(values >= 1 << 24):
        raise ShamirError("combined shares do not decode to a secret: shares from different secrets?")
    out = np.stack([(values >> 16) & 0xFF, (values >> 8) & 0xFF, values & 0xFF], axis=1).astype(np.uint8)
    return out.tobytes()[:length]


def _random_field_elements(shape: tuple[int, ...]) -> np.ndarray:
    """Uniform elements of GF(p) from the OS CSPRNG (bias below 2**-32)."""
    raw = np.frombuffer(os.urandom(8 * int(np.prod(shape))), dtype=np.uint64).reshape(shape)
    return (raw % np.uint64(PRIME)).astype(np.int64)


def split_secret(secret: bytes, xs: Sequence[int], threshold: int) -> np.ndarray:
    """Shares of ``secret`` at the points ``xs`` (distinct, in 1..p-1): row i is the share at xs[i]."""
    x = np.asarray(xs, dtype=np.int64)
    if not 1 <= threshold <= len(x):
        raise ShamirError(f"threshold must be between 1 and the number of shares ({len(x)}), got {threshold}")
    if len(set(x.tolist())) != len(x) or np.any(x <= 0) or np.any(x >= PRIME):
        raise ShamirError("share points must be distinct and in 1..p-1")
    chunks = _chunks(secret)
    coeffs = _random_field_elements((threshold - 1, len(chunks)))
    acc = np.zeros((len(x), len(chunks)), dtype=np.int64)
    for c in coeffs[::-1]:
        acc = (acc + c) % PRIME
        acc = (acc * x[:, None]) % PRIME
    return (acc + chunks) % PRIME


def lagrange_at_zero(xs: Sequence[int]) -> np.ndarray:
    """Coefficients l_j with f(0) = sum_j l_j f(x_j) for any polynomial of degree < len(xs)."""
    points = [int(v) % PRIME for v in xs]
    if len(set(points)) != len(points) or 0 in points:
        raise ShamirError(f"share points must be distinct and nonzero, got {list(xs)}")
    out = []
    for j, xj in enumerate(points):
        num, den = 1, 1
        for m, xm in enumerate(points):
            if m != j:
                num = num * xm % PRIME
                den = den * (xm - xj) % PRIME
        out.append(num * pow(den, PRIME - 2, PRIME) % PRIME)
    return np.asarray(out, dtype=np.int64)


def combine_shares(xs: Sequence[int], shares: np.ndarray, threshold: int, length: int) -> bytes:
    """The secret of byte length ``length`` from at least ``threshold`` shares (rows of ``shares``)."""
    shares = np.asarray(shares, dtype=np.int64)
    if len(xs) < threshold:
        raise ShamirError(f"{len(xs)} shares cannot reconstruct a secret shared with threshold {threshold}")
    if shares.ndim != 2 or shares.shape[0] != len(xs) or shares.shape[1] != -(-length // _CHUNK):
        raise ShamirError(f"shares have shape {shares.shape}, expected ({len(xs)}, {-(-length // _CHUNK)})")
    xs, shares = list(xs)[:threshold], shares[:threshold]
    weights = lagrange_at_zero(xs)
    acc = np.zeros(shares.shape[1], dtype=np.int64)
    for w, row in zip(weights, shares, strict=True):
        acc = (acc + (w * row) % PRIME) % PRIME
    return _unchunk(acc, length)
