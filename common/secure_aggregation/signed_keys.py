"""A member's round keys, signed with its roster identity, so the server can relay but not forge them.

Without signatures a server that hands a victim neighbours whose keys it made itself opens
the shares the victim encrypts to them and rebuilds its masks (Bonawitz et al. 2017, §6:
the actively secure variant needs a PKI). The signature covers the round's tag, so one
round's keys cannot be replayed into another, and the member's name, so keys cannot be
moved from one member to another.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.common.roster import Roster
from fedtune.common.site_identity import SiteIdentity

_DOMAIN = b"fedtune secagg round keys v1\x00"


@dataclass(frozen=True)
class SignedKeys:
    """One member's two public keys for one round, with its signature."""

    member: str
    c_public: bytes
    s_public: bytes
    signature: bytes


def _message(round_tag: bytes, member: str, c_public: bytes, s_public: bytes) -> bytes:
    name = member.encode()
    return b"".join(
        [_DOMAIN, len(round_tag).to_bytes(4, "big"), round_tag, len(name).to_bytes(4, "big"), name, c_public, s_public]
    )


def sign_keys(identity: SiteIdentity, round_tag: bytes, c_public: bytes, s_public: bytes) -> SignedKeys:
    signature = identity.sign(_message(round_tag, identity.member, c_public, s_public))
    return SignedKeys(identity.member, c_public, s_public, signature)


def keys_problem(roster: Roster, round_tag: bytes, keys: SignedKeys) -> str | None:
    """Why ``keys`` are not a roster member's keys for ``round_tag``, or None when they are."""
    if keys.member not in roster.members:
        return f"{keys.member!r} is not a member of federation {roster.federation!r}"
    if not roster.verify(keys.member, _message(round_tag, keys.member, keys.c_public, keys.s_public), keys.signature):
        return f"the keys relayed as {keys.member!r}'s for this round do not carry its signature"
    return None
