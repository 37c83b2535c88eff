"""Masks as AES-128-CTR keystreams read as uint64 vectors (a PRG keyed by a seed's first 16 bytes).

Each key is derived for one round and one purpose only, so a fixed counter start is safe.
AES-128 rather than AES-256: the masks' seeds come from X25519 agreements, which give
128-bit security, so a longer key adds nothing, while its four fewer rounds make masking,
most of a site's work in a secure round, a fifth faster.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

_ZERO_IV = bytes(16)
#: Values a mask is added in at a time: 256 KiB of keystream, which stays in the CPU's cache
#: between AES writing it and the addition reading it (a site adds a dozen masks of millions).
CHUNK = 1 << 15
_zeros = np.zeros(0, dtype=np.uint8)


def _zero_bytes(n: int) -> memoryview:
    global _zeros
    if _zeros.shape[0] < n:
        _zeros = np.zeros(n, dtype=np.uint8)
    return _zeros.data[:n]


def _encryptor(seed: bytes) -> CipherContext:
    if len(seed) < 16:
        raise ValueError(f"a mask seed has at least 16 bytes, got {len(seed)}")
    return Cipher(algorithms.AES(seed[:16]), modes.CTR(_ZERO_IV)).encryptor()


def expand_mask(seed: bytes, length: int) -> np.ndarray:
    """``length`` pseudorandom uint64 values from ``seed`` (the AES-CTR keystream)."""
    out = np.empty(length + 2, dtype=np.uint64)  # update_into wants 15 spare bytes
    _encryptor(seed).update_into(_zero_bytes(8 * length), out.data.cast("B"))
    return out[:length]


def add_mask(vector: np.ndarray, seed: bytes, sign: int) -> None:
    """``vector += sign * mask(seed)`` modulo 2**64, in place.

    The keystream is made and added a chunk at a time (one CTR stream, so the mask is
    :func:`expand_mask`'s): the mask never goes to main memory, which halves the memory
    traffic of masking against expanding it whole and adding it after.
    """
    if vector.dtype != np.uint64:
        raise TypeError(f"masks are added to uint64 vectors, got {vector.dtype}")
    encryptor, n = _encryptor(seed), vector.shape[0]
    keystream = np.empty(min(n, CHUNK) + 2, dtype=np.uint64)
    zeros, view = _zero_bytes(8 * min(n, CHUNK)), keystream.data.cast("B")
    op = np.add if sign > 0 else np.subtract
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        encryptor.update_into(zeros[: 8 * m], view)
        part = vector[start : start + m]
        op(part, keystream[:m], out=part)
