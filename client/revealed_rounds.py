"""The secure rounds a site has masked its update for, and those whose sum it helped reveal,
kept on disk beside its ledger.

A server that crashes partway through round r, before its checkpoint of round r is written,
resumes by setting round r up again with fresh keys, and every site would replay the very
update it sent the first time (no new privacy cost, see ``Site._replay``). Two sums of the
same updates, unmasked over different sets of sites, would give away the difference: a few
sites' updates, exactly what secure aggregation promises the server never learns. A server
that kept the first attempt's unmask answers can unmask both attempts when different sites
set them up. So a site sends a masked input for each round of a run at most once, across
restarts of the server and of the site (:class:`MaskedRounds`, claimed before the masked
vector leaves and checked before any training or replay): every masked input the server ever
holds for a round belongs to one attempt, and no two sums share a site's update. A secure
round cut short after its sites sent their masked inputs therefore fails when resumed; the
global adapter stays as it was, and the next round proceeds.

A site also helps reveal each round at most once (:class:`RevealedRounds`, claimed before any
unmasking share leaves); with the record above a second request can come only from a server
that lost or ignores it, and is refused all the same.

And a site signs or unmasks under one list of survivors a round (:class:`SurvivorLists`, pinned
before a signature or a share leaves). The same rule in the site's memory was not enough: Flower's
SuperNode runs each message in its own process on a copy of the site's state, so two signing
requests sent at once both found nothing signed (a third review read one site's update that way
with 10 sites of degree 4). Every record is read, checked and written under a lock on its file.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from fedtune.common.atomic_files import atomic_write_json
from fedtune.common.secure_aggregation.protocol import ALREADY_MASKED, ALREADY_REVEALED, ProtocolViolation

_T = TypeVar("_T")


class AlreadyRevealed(ProtocolViolation):
    """This site already revealed its shares for the round; a second sum could expose one update."""


class AlreadyMasked(ProtocolViolation):
    """This site already sent a masked input for the round; a second one could expose its update."""


class _RoundRecord:
    """Round tags (hex) kept under ``key`` in a JSON file, written atomically."""

    key = ""
    done = ""  # what the recorded rounds are: "rounds this site <done>"
    doing = ""  # what the site refuses to do while the file is unreadable

    def __init__(self, path: Path):
        self.path = Path(path)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold an exclusive lock on the record while it is read, checked and written (one site's
        messages may be handled by several processes at once)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def tags(self) -> set[str]:
        return self._read(lambda data: {str(t) for t in data}, set())

    def _read(self, parse: Callable[[Any], _T], empty: _T) -> _T:
        """``parse`` of what the file holds under ``key`` (``empty`` without a file)."""
        if not self.path.exists():
            return empty
        try:
            return parse(json.loads(self.path.read_text(encoding="utf-8"))[self.key])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # Unreadable means unknown: refuse rather than risk a second sum.
            raise ProtocolViolation(
                f"{self.path}: cannot read the record of rounds this site {self.done} ({exc}); "
                f"it refuses to {self.doing} until the file is restored or removed by its operator"
            ) from exc

    def _add(self, tag: bytes, known: set[str]) -> None:
        atomic_write_json(self.path, {self.key: sorted(known | {tag.hex()})})


class RevealedRounds(_RoundRecord):
    """Round tags (``round_tag(run_id, round)``) this site has released unmasking shares for."""

    key, done, doing = "revealed", "unmasked", "unmask"

    def claim(self, tag: bytes) -> None:
        """Record, before any share leaves, that this site reveals round ``tag``; refuse a second time."""
        with self._locked():
            self._add(tag, self.check(tag))

    def check(self, tag: bytes) -> set[str]:
        """Refuse round ``tag`` if this site already revealed it; returns the rounds recorded."""
        revealed = self.tags()
        if tag.hex() in revealed:
            raise AlreadyRevealed(
                f"{ALREADY_REVEALED} for {tag!r} (a resumed server replaying the "
                "round); a second sum of the same updates over other sites could reveal one site's update, so "
                "it refuses"
            )
        return revealed

    @property
    def survivor_lists(self) -> SurvivorLists:
        """The lists of survivors this site signed or unmasked under, kept beside this record."""
        return SurvivorLists(self.path.with_name(self.path.stem + "_survivor_lists.json"))

    @property
    def shared_parameters(self) -> SharedParameters:
        """The round parameters this site shared each set of keys under, kept beside this record."""
        return SharedParameters(self.path.with_name(self.path.stem + "_shared_parameters.json"))


class _PinnedValues(_RoundRecord):
    """One value (a digest) a key, the first one pinned, kept in a JSON file under a lock."""

    conflict = ""  # why a second value is refused

    def _pin(self, key: str, value: bytes) -> None:
        digest = hashlib.sha256(value).hexdigest()
        with self._locked():
            pinned = self._lists()
            if pinned.get(key, digest) != digest:
                raise ProtocolViolation(self.conflict)
            atomic_write_json(self.path, {self.key: {**pinned, key: digest}})

    def _lists(self) -> dict[str, str]:
        return self._read(lambda data: {str(t): str(d) for t, d in data.items()}, {})


class SurvivorLists(_PinnedValues):
    """The one list of finished and dropped sites this site signed or unmasked under, by round tag."""

    key, done, doing = "lists", "signed or unmasked under", "sign or unmask"
    conflict = (
        "this site already signed or unmasked under another list of survivors for this round; the server is "
        "telling it different stories about who dropped"
    )

    def pin(self, tag: bytes, survivors: Sequence[int], dropped: Sequence[int]) -> None:
        """Record the list for round ``tag`` before a signature or a share leaves; refuse another list."""
        self._pin(tag.hex(), json.dumps([sorted(survivors), sorted(dropped)]).encode())


class SharedParameters(_PinnedValues):
    """The one set of round parameters (the bound tag) each of this site's advertised keys was shared under.

    A fourth review sent a site two share-keys requests at once, under two lists of members: each
    process found the keys not yet shared, so the same self-mask seed and mask key went out under
    both, and revealing the seed in one and the key in the other stripped the site's update.
    """

    key, done, doing = "shared", "shared its keys under", "share its keys"
    conflict = (
        "this site already shared these keys under other round parameters; a server that asks twice at "
        "once could rebuild both its secrets"
    )

    def pin(self, tag: bytes, own_key: bytes, bound_tag: bytes) -> None:
        """Record, before any ciphertext leaves, the parameters ``own_key`` (this site's public key for
        round ``tag``) is shared under; refuse other parameters."""
        self._pin(f"{tag.hex()}:{own_key.hex()}", bound_tag)


class MaskedRounds(_RoundRecord):
    """Round tags (``round_tag(run_id, round)``) this site has sent a masked input for."""

    key, done, doing = "masked", "sent a masked update for", "mask any update"

    def check(self, tag: bytes) -> set[str]:
        """Refuse round ``tag`` if this site already sent its masked input for it (called before
        training, so a refused round spends nothing); returns the rounds recorded."""
        masked = self.tags()
        if tag.hex() in masked:
            raise AlreadyMasked(
                f"{ALREADY_MASKED} for {tag!r} (a resumed server retrying the round); a second masking "
                "under other keys could reveal its update by difference: the round is abandoned"
            )
        return masked

    def claim(self, tag: bytes) -> None:
        """Record, before the masked vector leaves, that this site masked round ``tag``; refuse a second time."""
        with self._locked():
            self._add(tag, self.check(tag))


__all__ = ["AlreadyMasked", "AlreadyRevealed", "MaskedRounds", "RevealedRounds", "SharedParameters", "SurvivorLists"]
