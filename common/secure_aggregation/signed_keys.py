"""A member's round keys, signed with its roster identity, so the server can relay but not forge them.

Without signatures a server that hands a victim neighbours whose keys it made itself opens
the shares the victim encrypts to them and rebuilds its masks (Bonawitz et al. 2017, §6:
the actively secure variant needs a PKI). The signature covers the round's tag, so one
round's keys cannot be replayed into another, and the member's name, so keys cannot be
moved from one member to another.

Members also sign the list of survivors the server gives them before they reveal any key share
(:func:`survivors_message`): a site releases a dropped neighbour's mask key only when a majority
of its neighbourhood signed the very same list, so the server cannot tell different sites
different stories about who dropped (Bonawitz et al. 2017, §4's consistency check).
"""

from __future__ import annotations

from collections.abc import Sequence
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


_VIEW_DOMAIN = b"fedtune secagg survivors v1\x00"


def survivors_message(bound_tag: bytes, survivors: Sequence[int], dropped: Sequence[int]) -> bytes:
    """What a site signs to say which sites it was told finished and dropped in a round."""

    def ints(values: Sequence[int]) -> bytes:
        return len(values).to_bytes(4, "big") + b"".join(int(v).to_bytes(4, "big") for v in sorted(values))

    return _VIEW_DOMAIN + len(bound_tag).to_bytes(4, "big") + bound_tag + ints(survivors) + ints(dropped)
