"""Masks as AES-256-CTR keystreams read as uint32 vectors (a PRG seeded by a 32-byte key).

Each key is derived for one round and one purpose only, so a fixed counter start is safe.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

_ZERO_IV = bytes(16)
_zeros = np.zeros(0, dtype=np.uint8)


def _zero_bytes(n: int) -> memoryview:
    global _zeros
    if _zeros.shape[0] < n:
        _zeros = np.zeros(n, dtype=np.uint8)
    return _zeros.data[:n]


def expand_mask(seed: bytes, length: int) -> np.ndarray:
    """``length`` pseudorandom uint32 values from ``seed`` (the AES-CTR keystream)."""
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_IV)).encryptor()
    out = np.empty(length + 4, dtype=np.uint32)  # update_into wants 15 spare bytes
    encryptor.update_into(_zero_bytes(4 * length), out.data.cast("B"))
    return out[:length]


def add_mask(vector: np.ndarray, seed: bytes, sign: int) -> None:
    """``vector += sign * mask(seed)`` modulo 2**32, in place."""
    mask = expand_mask(seed, vector.shape[0])
    if sign > 0:
        np.add(vector, mask, out=vector)
    else:
        np.subtract(vector, mask, out=vector)
