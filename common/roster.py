"""The federation's roster: who its members are, by the public keys they made themselves.

Every site pins the roster (a copy on its disk whose fingerprint it compared out of band with
the other members, e.g. read aloud on a call), so what the server relays can be checked
against it: a key not signed by a member, or a member listed twice, is refused. The server
can leave members out of a round, never add one. Format (TOML)::

    [roster]
    federation = "banking-2027"
    min_aggregation_sites = 3       # every site enforces at least this, whatever its own floor
    colluding_members = 1           # optional: members colluding with the operator rounds must withstand

    [members]
    bank-a = "ed25519:3q2+7w..."    # printed by `fedtune site init` on that bank's machine
    bank-b = "ed25519:..."
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedtune.common.atomic_files import atomic_write_bytes
from fedtune.common.site_identity import IdentityError, decode_public_key, encode_public_key, verify_signature
from fedtune.common.toml_files import read_toml

MEMBER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class RosterError(ValueError):
    """A roster that cannot be used, or one that is not the pinned one; the message names the file."""


@dataclass(frozen=True)
class Roster:
    """Members' Ed25519 public keys (raw bytes) by name, and the federation's minimums.

    ``min_aggregation_sites``: the fewest sites any revealed sum may cover. ``colluding_members``:
    how many members colluding with a deviating operator rounds must withstand, counted across the
    whole federation (the server can re-draw the neighbour graph by leaving members out, so it may
    gather them around one site); every member then refuses a reconstruction threshold t of k + 1
    shares unless 2t > k + 1 + colluding_members (0: a bare majority, and no colluder withstood).
    """

    federation: str
    members: Mapping[str, bytes]
    min_aggregation_sites: int = 2
    colluding_members: int = 0

    def __post_init__(self) -> None:
        bad = [m for m in self.members if not MEMBER_NAME.fullmatch(m)]
        if bad:
            raise RosterError(f"member names must be 1-64 of letters, digits, '.', '_', '-': {bad}")
        keys = list(self.members.values())
        if len(set(keys)) != len(keys):
            raise RosterError("two members share one public key")
        if self.min_aggregation_sites < 2:
            raise RosterError(f"min_aggregation_sites is at least 2, got {self.min_aggregation_sites}")
        if self.colluding_members < 0:
            raise RosterError(f"colluding_members is at least 0, got {self.colluding_members}")

    @property
    def fingerprint(self) -> str:
        """What members compare out of band: a digest of the federation, its minimums and every member's key.

        ``colluding_members`` counts only when set, so rosters pinned before it existed keep their fingerprint.
        """
        minimums = {"colluding_members": self.colluding_members} if self.colluding_members else {}
        canonical = json.dumps(
            {
                "federation": self.federation,
                "min_aggregation_sites": self.min_aggregation_sites,
                **minimums,
                "members": {m: encode_public_key(k) for m, k in sorted(self.members.items())},
            },
            sort_keys=True,
            separators=(",", ":"),
        )
        return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()

    def verify(self, member: str, message: bytes, signature: bytes) -> bool:
        """Whether ``member`` is on the roster and signed ``message``."""
        public = self.members.get(member)
        return public is not None and verify_signature(public, message, signature)

    def to_toml(self) -> str:
        lines = [
            "# fedtune federation roster: every member pins this file; compare its fingerprint out of band",
            f"# fingerprint: {self.fingerprint}",
            "[roster]",
            f"federation = {json.dumps(self.federation)}",
            f"min_aggregation_sites = {self.min_aggregation_sites}",
            *([f"colluding_members = {self.colluding_members}"] if self.colluding_members else []),
            "",
            "[members]",
        ]
        lines += [f"{json.dumps(m)} = {json.dumps(encode_public_key(k))}" for m, k in sorted(self.members.items())]
        return "\n".join(lines) + "\n"

    def save(self, path: Path) -> None:
        atomic_write_bytes(Path(path), self.to_toml().encode())


def load_roster(path: Path, pinned_fingerprint: str = "") -> Roster:
    """The roster in ``path``; with ``pinned_fingerprint``, only if it is that roster.

    RosterError names the file and what is wrong: a missing table or field, a malformed key,
    or a fingerprint other than the pinned one (someone changed the file).
    """
    path = Path(path)
    raw = read_toml(path, RosterError, "roster")
    head, members = raw.get("roster"), raw.get("members")
    if not isinstance(head, dict) or not isinstance(members, dict) or not members:
        raise RosterError(f"{path}: expected a [roster] table and a non-empty [members] table")
    federation, floor = head.get("federation"), head.get("min_aggregation_sites", 2)
    colluders = head.get("colluding_members", 0)
    if not isinstance(federation, str) or not federation:
        raise RosterError(f"{path}: roster.federation: expected the federation's name (a string)")
    for field, value in (("min_aggregation_sites", floor), ("colluding_members", colluders)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise RosterError(f"{path}: roster.{field}: expected an integer, got {value!r}")
    try:
        keys = {str(m): decode_public_key(k, f"{path}: members.{m}") for m, k in members.items()}
        roster = Roster(federation, keys, floor, colluders)
    except IdentityError as exc:
        raise RosterError(str(exc)) from exc
    except RosterError as exc:
        raise RosterError(f"{path}: {exc}") from exc
    if pinned_fingerprint and roster.fingerprint != pinned_fingerprint:
        raise RosterError(
            f"{path}: roster fingerprint {roster.fingerprint} is not the pinned {pinned_fingerprint}; the file "
            "changed since the members compared it. Compare the new one out of band before pinning it"
        )
    return roster
