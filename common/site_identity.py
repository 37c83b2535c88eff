"""A site's long-term identity: an Ed25519 key pair made on the site's own machine.

The private key never leaves the site (``fedtune site init`` writes it there, mode 0600);
only its public half goes into the federation's roster (``common.roster``). The site signs
with it what the server relays to the other sites, so a server cannot pass off keys it made
itself as a member's, nor invent members.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedtune.common.atomic_files import atomic_write_bytes

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


class IdentityError(ValueError):
    """An identity key file or public key that cannot be used; the message names it."""


def encode_public_key(public: bytes) -> str:
    """The text form of a public key in a roster: ``ed25519:`` and base64."""
    return "ed25519:" + base64.b64encode(public).decode("ascii")


def decode_public_key(text: str, where: str) -> bytes:
    """The raw 32 bytes of a public key in text form; IdentityError naming ``where`` otherwise."""
    prefix = "ed25519:"
    if not isinstance(text, str) or not text.startswith(prefix):
        raise IdentityError(f"{where}: expected a public key 'ed25519:<base64>', got {text!r}")
    try:
        raw = base64.b64decode(text[len(prefix) :], validate=True)
    except ValueError as exc:
        raise IdentityError(f"{where}: the public key is not valid base64") from exc
    if len(raw) != PUBLIC_KEY_BYTES:
        raise IdentityError(f"{where}: an Ed25519 public key has {PUBLIC_KEY_BYTES} bytes, got {len(raw)}")
    return raw


def key_fingerprint(public: bytes) -> str:
    """Short fingerprint of a public key, for people to compare out of band."""
    return "sha256:" + hashlib.sha256(public).hexdigest()[:32]


def verify_signature(public: bytes, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``public``'s Ed25519 signature of ``message``."""
    if len(public) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except InvalidSignature:
        return False
    return True


@dataclass(frozen=True)
class SiteIdentity:
    """A member's name and Ed25519 private key (raw 32 bytes)."""

    member: str
    private: bytes

    @classmethod
    def generate(cls, member: str) -> SiteIdentity:
        key = Ed25519PrivateKey.generate()
        raw = key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        return cls(member, raw)

    @property
    def public(self) -> bytes:
        return (
            Ed25519PrivateKey.from_private_bytes(self.private)
            .public_key()
            .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        )

    def sign(self, message: bytes) -> bytes:
        return Ed25519PrivateKey.from_private_bytes(self.private).sign(message)

    def save(self, path: Path) -> None:
        """PEM (PKCS#8) with the member's name as a comment line, written atomically with mode 0600."""
        pem = Ed25519PrivateKey.from_private_bytes(self.private).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        atomic_write_bytes(Path(path), f"# fedtune site identity: {self.member}\n".encode() + pem)


def load_identity(path: Path) -> SiteIdentity:
    """The identity ``fedtune site init`` wrote; IdentityError naming the file otherwise."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise IdentityError(f"{path}: identity key not found; create it with `fedtune site init`") from exc
    first, _, pem = data.partition(b"\n")
    marker = b"# fedtune site identity: "
    if not first.startswith(marker) or not first[len(marker) :].strip():
        raise IdentityError(f"{path}: not a fedtune identity key (its first line names the member)")
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except ValueError as exc:
        raise IdentityError(f"{path}: the private key is not valid PEM") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"{path}: expected an Ed25519 private key, got {type(key).__name__}")
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return SiteIdentity(first[len(marker) :].decode("utf-8").strip(), raw)
