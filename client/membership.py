"""A site's membership of a federation: the roster it pins and its own identity on it.

With a membership the site signs its secure-aggregation keys and accepts only keys that
roster members signed; without one (a federation that has no roster) it trusts the keys the
server relays, which only an honest server deserves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context

from fedtune.common.roster import Roster, RosterError, load_roster
from fedtune.common.site_identity import IdentityError, SiteIdentity, load_identity


class MembershipError(ValueError):
    """A roster or identity that cannot be used; the message names the file and what to do."""


@dataclass(frozen=True)
class Membership:
    roster: Roster
    identity: SiteIdentity

    def __post_init__(self) -> None:
        if self.roster.members.get(self.identity.member) != self.identity.public:
            raise MembershipError(
                f"this site's identity {self.identity.member!r} is not on the roster of "
                f"{self.roster.federation!r} with its public key; ask the operator to add the key "
                "`fedtune site init` printed, then compare the new roster's fingerprint"
            )


#: Where a site's membership comes from (None: a federation without a roster).
MembershipSource = Callable[[Context], Membership | None]

#: A site's identity key in its folder (``fedtune site init``).
IDENTITY_FILE = "identity.pem"
#: In a simulation: the roster in the run directory, and each site's identity in ``identities/<site>.pem``
#: there (apart from the sites' state directories, which a site creates only once its data is valid).
SIMULATED_ROSTER = "roster.toml"


def simulated_identity_path(run_dir: Path, site: str) -> Path:
    return Path(run_dir) / "identities" / f"{site}.pem"


def load_membership(roster_path: Path, identity_path: Path, pinned_fingerprint: str = "") -> Membership:
    """The roster (only the pinned one, when a fingerprint is given) and the site's identity key."""
    try:
        return Membership(load_roster(roster_path, pinned_fingerprint), load_identity(identity_path))
    except (RosterError, IdentityError) as exc:
        raise MembershipError(str(exc)) from exc
