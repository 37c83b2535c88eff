"""Authenticated encryption of Shamir shares between two sites, relayed by the server.

The server forwards the ciphertexts but cannot read them (AES-256-GCM under a key only the
two sites can derive) nor move them between rounds or pairs unnoticed: the round tag and
both ends' indices are bound in as associated data.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_NONCE = 12


class ShareDecryptionError(ValueError):
    """A relayed share failed authentication: tampered, misrouted or from another round."""


def associated_data(round_tag: bytes, sender: int, recipient: int) -> bytes:
    return round_tag + b"|" + str(sender).encode() + b">" + str(recipient).encode()


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(_NONCE)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, blob: bytes, aad: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(blob[:_NONCE], blob[_NONCE:], aad)
    except (InvalidTag, ValueError) as exc:
        raise ShareDecryptionError("a relayed share failed authentication") from exc
