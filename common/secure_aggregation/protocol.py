"""The four steps of a SecAgg+ round, as pure state machines for a site and for the server.

1. advertise: each site sends two fresh X25519 public keys (``c`` to encrypt shares, ``s``
   to agree on pairwise masks) and its example count (its weight in the mean).
2. share keys: the server assigns indices, neighbours and the threshold; each site
   Shamir-shares its self-mask seed ``b`` and its ``s`` private key among its neighbours
   and itself, and returns one AES-GCM ciphertext per neighbour for the server to relay.
3. masked input: each site quantises its weighted update (plus a count of clipped values)
   and adds its self mask and one signed pairwise mask per neighbour; it needs every
   neighbour's shares (a server that held some back would choose whom it masks with), so a
   neighbour that dropped in step 2 means the round is set up again without it.
4. unmask: each site still present returns, for every neighbour, either the share of
   ``b`` (the neighbour finished) or the share of ``s`` (it dropped), never both; the
   server rebuilds the masks, removes them and keeps only the sum.

Steps 1 and 2 need no update, so they may run before training (or during the previous
round, see ``server.secure_rounds``); step 3 takes the update. Sites refuse to answer step
4 when fewer than ``min_survivors`` sites finished, and count towards their own floor only the
finished sites they can vouch for (themselves and the neighbours whose shares they hold), so a
server cannot reach a site's floor by listing sites that do not exist.

Every key a site derives (share encryption, pairwise masks) is bound to the round's shared
parameters (:func:`bound_round_tag`): a server that tells sites different weights or grids, to
scale the others' updates down and isolate one, gets pairwise masks that do not cancel and a
sum that is noise. Nothing here touches Flower.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedtune.common.roster import Roster
from fedtune.common.secure_aggregation.key_agreement import KeyPair, agree, public_key_of
from fedtune.common.secure_aggregation.masks import add_mask
from fedtune.common.secure_aggregation.neighbours import (
    neighbour_count,
    public_ring,
    reconstruction_threshold,
    ring_graph,
    smallest_group,
)
from fedtune.common.secure_aggregation.quantisation import MAX_TOTAL_EXAMPLES, QuantisationGrid, dequantise, quantise
from fedtune.common.secure_aggregation.shamir import ShamirError, combine_shares, split_secret
from fedtune.common.secure_aggregation.share_transport import ShareDecryptionError, associated_data, open_sealed, seal
from fedtune.common.secure_aggregation.signed_keys import SignedKeys, keys_problem, sign_keys, survivors_message
from fedtune.common.site_identity import SiteIdentity

SEED_BYTES = 32
#: The most sites a round may state (each site recomputes the round's whole neighbour graph).
MAX_PARTICIPANTS = 100_000
_SHARE_WORDS = 11  # 3-byte chunks of a 32-byte secret

#: How a site's refusal to unmask a round it already helped reveal begins (``client.revealed_rounds``),
#: so that the server can say so in the round's status.
ALREADY_REVEALED = "this site already released its unmasking shares"
#: How a site's refusal to mask a round it already sent a masked input for begins
#: (``client.revealed_rounds.MaskedRounds``), so that the server can say so in the round's status.
ALREADY_MASKED = "this site already sent its masked update"


class SecureAggregationError(RuntimeError):
    """A secure round that cannot complete; the message says which step and why."""


class ProtocolViolation(SecureAggregationError):
    """A site refuses a request that would break the protocol's guarantees."""


@dataclass(frozen=True)
class Advertisement:
    """A site's public keys for one round and its weight; signed when the federation has a roster."""

    c_public: bytes
    s_public: bytes
    num_examples: int
    member: str = ""
    signature: bytes = b""

    @property
    def signed_keys(self) -> SignedKeys | None:
        return SignedKeys(self.member, self.c_public, self.s_public, self.signature) if self.member else None


@dataclass(frozen=True)
class RoundParameters:
    """What the server tells one site in step 2."""

    round_tag: bytes
    index: int
    neighbours: Mapping[int, tuple[bytes, bytes]]  # index -> (c_public, s_public)
    threshold: int
    min_survivors: int
    clip_range: float
    num_participants: int
    total_examples: int
    #: Every participant's signed keys by index (the site itself included); empty without a roster.
    members: Mapping[int, SignedKeys] = field(default_factory=dict)


@dataclass(frozen=True)
class SecureSum:
    """The result of a completed round: all the server learns about the sites' updates."""

    mean_update: np.ndarray
    survivors: list[int]
    dropped: list[int]
    clipped_values: int
    weight: float
    #: The round's grid step: each coordinate of the mean is within one of the true weighted mean.
    grid_step: float


def bound_round_tag(
    round_tag: bytes,
    threshold: int,
    min_survivors: int,
    clip_range: float,
    num_participants: int,
    total_examples: int,
    neighbours: int = 0,
    members: Mapping[int, SignedKeys] | None = None,
) -> bytes:
    """``round_tag`` with a digest of the parameters every site of the round must share appended.

    Used in place of the bare tag wherever a key is derived or a share sealed, so two sites told
    different parameters (another ``total_examples`` or ``num_participants`` to shrink one site's
    weight, another grid, another degree) agree on no pairwise mask: their masks do not cancel and
    the server learns nothing from the sum. ``members`` (every participant's signed keys) is bound
    too: a server holding several signed advertisements of a site for one tag (a set-up run
    again) could otherwise give each site its own list of members, hence its own public graph,
    and shape every neighbourhood at will (a review's attack read one site's update with 11 sites
    of degree 4). Computed once per round, not per coordinate.
    """
    fields = struct.pack("<qqdqqq", threshold, min_survivors, clip_range, num_participants, total_examples, neighbours)
    listed = b"".join(
        i.to_bytes(4, "big")
        + len(m.member).to_bytes(4, "big")
        + m.member.encode()
        + m.c_public
        + m.s_public
        + m.signature
        for i, m in sorted((members or {}).items())
    )
    digest = hashlib.sha256(len(round_tag).to_bytes(4, "little") + round_tag + fields + listed).hexdigest()
    return round_tag + f"|params:{digest}".encode()


def round_ring(
    round_tag: bytes, neighbours: int, num_participants: int, members: Mapping[int, SignedKeys]
) -> list[int]:
    """The ring order of the round's neighbour graph, which every site recomputes.

    With a roster each member sits at the hash of the round's tag and its own signature on keys it
    made fresh for the round: no one knows the ring before the keys arrive, the indices
    the server hands out do not move anyone (when the signatures were hashed in index order, a
    third review picked a victim's whole neighbourhood of 12 by renumbering 20 members), and leaving
    a member out of the round takes only that member off the ring. Nothing the server sets freely
    (the clip range, the stated totals) goes in: a second review re-drew the graph by nudging them.
    Without a roster the server is trusted with the graph, which is then a shuffle seeded by the
    tag and the degree.
    """
    if not members:
        return public_ring(num_participants, round_tag + f"|k:{neighbours}".encode())
    # The degree stays out: the server chooses it, and each choice would otherwise be another ring.
    prefix = b"fedtune secagg ring v2\x00" + len(round_tag).to_bytes(4, "big") + round_tag
    return sorted(range(1, num_participants + 1), key=lambda i: hashlib.sha256(prefix + members[i].signature).digest())


def round_graph(
    round_tag: bytes, neighbours: int, num_participants: int, members: Mapping[int, SignedKeys]
) -> dict[int, tuple[int, ...]]:
    """Each participant's neighbours on :func:`round_ring`."""
    return ring_graph(round_ring(round_tag, neighbours, num_participants, members), neighbours)


def bound_tag_of(p: RoundParameters) -> bytes:
    """The bound tag of the round ``p`` describes (:func:`bound_round_tag`), as the site computes it."""
    return bound_round_tag(
        p.round_tag,
        p.threshold,
        p.min_survivors,
        p.clip_range,
        p.num_participants,
        p.total_examples,
        len(p.neighbours),
        p.members,
    )


def _info(kind: str, round_tag: bytes, a: int, b: int) -> bytes:
    lo, hi = sorted((a, b))
    return round_tag + f"|{kind}|{lo}-{hi}".encode()


def _encode_share(row: np.ndarray) -> bytes:
    return np.asarray(row, dtype="<u4").tobytes()


def _decode_share(blob: bytes) -> np.ndarray:
    if len(blob) != 4 * _SHARE_WORDS:
        raise ShamirError(f"a share has {4 * _SHARE_WORDS} bytes, got {len(blob)}")
    return np.frombuffer(blob, dtype="<u4").astype(np.int64)


@dataclass
class ClientRound:
    """One site's side of one round. Holds secrets; lives only in the site's memory."""

    num_examples: int
    min_survivors_floor: int = 2
    c_keys: KeyPair = field(default_factory=KeyPair.generate)
    s_keys: KeyPair = field(default_factory=KeyPair.generate)
    self_seed: bytes = field(default_factory=lambda: os.urandom(SEED_BYTES))
    params: RoundParameters | None = None
    held_shares: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    alive: tuple[int, ...] = ()
    sent_masked: bool = False
    unmasked: bool = False
    clipped: int = 0
    #: With a roster, every key relayed by the server must carry a member's signature.
    roster: Roster | None = None
    identity: SiteIdentity | None = None
    #: The list of (finished, dropped) sites this site signed for the round; it signs one only.
    signed_view: tuple[tuple[int, ...], tuple[int, ...]] | None = None

    @property
    def floor(self) -> int:
        """The fewest sites a revealed sum may cover: this site's own floor or the roster's, if higher."""
        return max(2, self.min_survivors_floor, self.roster.min_aggregation_sites if self.roster else 2)

    def advertise(self, round_tag: bytes = b"") -> Advertisement:
        """The public keys (signed for ``round_tag`` with the site's identity, when it has one) and weight."""
        if self.identity is None:
            return Advertisement(self.c_keys.public, self.s_keys.public, self.num_examples)
        if not round_tag:
            raise ProtocolViolation("signed keys need the round's tag")
        signed = sign_keys(self.identity, round_tag, self.c_keys.public, self.s_keys.public)
        return Advertisement(self.c_keys.public, self.s_keys.public, self.num_examples, signed.member, signed.signature)

    def share_keys(self, params: RoundParameters) -> dict[int, bytes]:
        """Ciphertexts of this site's shares, one per neighbour (by index)."""
        if self.params is not None:
            raise ProtocolViolation("keys were already shared this round")
        self._check(params)
        self.params = params
        holders = sorted(params.neighbours) + [params.index]
        b_shares = split_secret(self.self_seed, holders, params.threshold)
        s_shares = split_secret(self.s_keys.private, holders, params.threshold)
        self.held_shares[params.index] = (_encode_share(b_shares[-1]), _encode_share(s_shares[-1]))
        tag, out = bound_tag_of(params), {}
        for row, j in enumerate(holders[:-1]):
            key = agree(self.c_keys.private, params.neighbours[j][0], _info("share", tag, params.index, j))
            plaintext = _encode_share(b_shares[row]) + _encode_share(s_shares[row])
            out[j] = seal(key, plaintext, associated_data(tag, params.index, j))
        return out

    def _check(self, params: RoundParameters) -> None:
        floor = self.floor
        if params.min_survivors < floor:
            raise ProtocolViolation(
                f"the server would reveal sums over {params.min_survivors} sites; this site requires at least {floor}"
            )
        if params.min_survivors > params.num_participants:
            raise ProtocolViolation(
                f"the server states a minimum of {params.min_survivors} sites in a round of "
                f"{params.num_participants}; no sum could ever be unmasked"
            )
        if params.num_participants > MAX_PARTICIPANTS:
            raise ProtocolViolation(
                f"{params.num_participants} participants; this site accepts at most {MAX_PARTICIPANTS}"
            )
        everyone = range(1, params.num_participants + 1)
        if params.index in params.neighbours or not params.neighbours:
            raise ProtocolViolation("malformed neighbour list")
        if params.index not in everyone or not set(params.neighbours) <= set(everyone):
            raise ProtocolViolation(f"site indices outside 1..{params.num_participants} in the neighbour list")
        if len(params.neighbours) + 1 < floor:
            raise ProtocolViolation(
                f"this site has {len(params.neighbours)} neighbours in the SecAgg+ graph and can vouch only for "
                f"itself and them, fewer than its min_aggregation_sites = {floor}: it would never unmask. Raise "
                f"secure_aggregation.neighbours to at least {floor - 1} (server), or lower the site's floor"
            )
        if not 2 <= params.threshold <= len(params.neighbours) + 1:
            raise ProtocolViolation(f"threshold {params.threshold} is not in 2..{len(params.neighbours) + 1}")
        holders = len(params.neighbours) + 1
        if 2 * params.threshold <= holders:
            # Below a majority, two disjoint groups of holders could rebuild both of this site's secrets.
            raise ProtocolViolation(
                f"threshold {params.threshold} of {holders} shares is not a majority: the "
                "server could collect both this site's self-mask seed and its mask key"
            )
        colluders = self.roster.colluding_members if self.roster is not None else 0
        if 2 * params.threshold <= holders + colluders:
            # Colluders hand over shares of both secrets: honest holders must not split into two groups of t - c.
            raise ProtocolViolation(
                f"threshold {params.threshold} of {holders} shares cannot withstand the roster's "
                f"colluding_members = {colluders}: with that many colluders among its neighbours the server could "
                f"collect both this site's secrets. The server needs a threshold of at least "
                f"{(holders + colluders) // 2 + 1} (raise secure_aggregation.threshold_fraction)"
            )
        if self.num_examples < 1:
            raise ProtocolViolation(f"this site declared {self.num_examples} examples; a secure round needs at least 1")
        if params.total_examples < self.num_examples:
            raise ProtocolViolation(
                f"the round's total example count {params.total_examples} is below this site's own {self.num_examples}"
            )
        if params.total_examples >= MAX_TOTAL_EXAMPLES:
            raise ProtocolViolation(f"{params.total_examples} examples in the round; the grid allows fewer than 2**40")
        publics = [pk for pair in params.neighbours.values() for pk in pair]
        if len(set(publics)) != len(publics) or {self.c_keys.public, self.s_keys.public} & set(publics):
            raise ProtocolViolation("neighbours' public keys repeat or copy this site's")
        if self.roster is not None:
            self._check_members(params)
        self._check_graph(params)

    def _check_graph(self, params: RoundParameters) -> None:
        """The neighbours are this site's in the graph every site recomputes from the round's public data."""
        graph = round_graph(params.round_tag, len(params.neighbours), params.num_participants, params.members)
        if set(graph[params.index]) != set(params.neighbours) or len(graph[params.index]) != len(params.neighbours):
            raise ProtocolViolation(
                "the neighbours the server assigned are not those of the round's public graph (a server that "
                "chooses the graph can isolate sites with dropouts)"
            )

    def _check_members(self, params: RoundParameters) -> None:
        """Every participant is a distinct roster member whose signature covers the keys relayed for it."""
        assert self.roster is not None
        roster = self.roster.federation
        if not params.members:
            raise ProtocolViolation(
                f"the server relayed unsigned keys; this site pins the roster of {roster!r} and accepts only "
                "keys its members signed"
            )
        if set(params.members) != set(range(1, params.num_participants + 1)):
            raise ProtocolViolation(f"signed keys cover indices other than the round's 1..{params.num_participants}")
        names = [k.member for k in params.members.values()]
        if len(set(names)) != len(names):
            raise ProtocolViolation("one roster member is listed under two indices")
        for i, keys in params.members.items():
            if (problem := keys_problem(self.roster, params.round_tag, keys)) is not None:
                raise ProtocolViolation(f"index {i}: {problem}")
        own = params.members[params.index]
        if (own.member, own.c_public, own.s_public) != (
            self.identity.member if self.identity else "",
            self.c_keys.public,
            self.s_keys.public,
        ):
            raise ProtocolViolation("the keys listed under this site's own index are not the ones it signed")
        for j, (c_public, s_public) in params.neighbours.items():
            if (params.members[j].c_public, params.members[j].s_public) != (c_public, s_public):
                raise ProtocolViolation(f"neighbour {j}'s keys differ from those its member signed")

    def receive_shares(self, ciphertexts: Mapping[int, bytes]) -> None:
        """Open the shares the neighbours sent: one from every neighbour of the public graph.

        All or nothing: a site masks with each of its neighbours, since the group check at the
        unmask step reads the public graph. A server that passed on only some neighbours' shares
        would choose whom the site masks with, list those as dropped, and strip the site's masks
        with keys the rest of the graph reveals (a review's attack: 7 sites of degree 4, no
        colluder). A neighbour that did not share its keys means the round is set up again
        without it. Raises ProtocolViolation (or ShareDecryptionError) when the shares are
        unusable, so a site can check them before it spends any privacy budget on training.
        """
        p = self.params
        if p is None or self.alive:
            raise ProtocolViolation("masked input requested out of order")
        unknown = set(ciphertexts) - set(p.neighbours)
        if unknown:
            raise ProtocolViolation(f"shares from sites that are not neighbours: {sorted(unknown)}")
        if missing := set(p.neighbours) - set(ciphertexts):
            raise ProtocolViolation(
                f"shares arrived from {len(ciphertexts)} of this site's {len(p.neighbours)} neighbours (none from "
                f"{sorted(missing)}); a site masks with every neighbour of the round's graph or not at all, as a "
                "server that holds shares back would choose whom it masks with. The round must be set up again "
                "without the sites that did not share their keys"
            )
        tag, opened = bound_tag_of(p), {}
        for j, blob in ciphertexts.items():
            key = agree(self.c_keys.private, p.neighbours[j][0], _info("share", tag, j, p.index))
            plaintext = open_sealed(key, blob, associated_data(tag, j, p.index))
            half = len(plaintext) // 2
            opened[j] = (plaintext[:half], plaintext[half:])
        self.held_shares.update(opened)
        self.alive = tuple(sorted(ciphertexts))

    def masked_input(
        self, ciphertexts: Mapping[int, bytes] | None, update: np.ndarray, rng: np.random.Generator | None = None
    ) -> np.ndarray:
        """``update`` quantised and weighted, plus a clipped-value count, masked (uint64).

        ``ciphertexts`` are the neighbours' shares, or None when :meth:`receive_shares` has
        already opened them.
        """
        if ciphertexts is not None:
            self.receive_shares(ciphertexts)
        p = self.params
        if p is None or not self.alive or self.sent_masked:
            # A second vector under the same masks would reveal the difference of two updates.
            raise ProtocolViolation("masked input requested out of order")
        self.sent_masked = True
        grid = QuantisationGrid(p.clip_range, p.total_examples)
        rng = rng or np.random.default_rng(secrets.randbits(128))
        vector = np.empty(np.size(update) + 1, dtype=np.uint64)
        _, clipped = quantise(update, self.num_examples, grid, rng, out=vector[:-1])
        self.clipped = clipped
        vector[-1] = clipped
        add_mask(vector, self.self_seed, +1)
        tag = bound_tag_of(p)
        for j in self.alive:
            seed = agree(self.s_keys.private, p.neighbours[j][1], _info("mask", tag, p.index, j))
            add_mask(vector, seed, +1 if p.index < j else -1)
        return vector

    def _check_view(self, survivors: Sequence[int], dropped: Sequence[int]) -> tuple[set[int], set[int]]:
        """The lists of finished and dropped sites, provided revealing under them keeps this site's floor."""
        p = self.params
        if p is None or not self.sent_masked:
            raise ProtocolViolation("unmasking requested out of order")
        if self.unmasked:
            raise ProtocolViolation("shares were already released this round; a second request is refused")
        alive_survivors, alive_dropped = set(survivors), set(dropped)
        if alive_survivors & alive_dropped:
            raise ProtocolViolation("a site cannot both finish and drop out")
        if not alive_survivors | alive_dropped <= set(range(1, p.num_participants + 1)):
            raise ProtocolViolation(f"finished or dropped sites listed outside 1..{p.num_participants}")
        if p.index not in alive_survivors:
            raise ProtocolViolation("this site sent its masked input but is not listed as finished")
        if len(alive_survivors) < p.min_survivors:
            raise ProtocolViolation(
                f"only {len(alive_survivors)} sites finished; unmasking would reveal a sum over fewer than "
                f"the round's minimum of {p.min_survivors} sites"
            )
        # The site's own floor counts only the finished sites it can vouch for: itself and the neighbours
        # whose shares it holds. Any other index the server lists may not exist.
        mine = set(self.alive) | {p.index}
        floor = self.floor
        if len(verified := mine & alive_survivors) < floor:
            raise ProtocolViolation(
                f"only {len(verified)} sites finished among those this site can vouch for (itself and the "
                f"{len(self.alive)} neighbours whose shares it holds); unmasking would reveal a sum over fewer "
                f"than its min_aggregation_sites = {floor} sites"
            )
        graph = round_graph(p.round_tag, len(p.neighbours), p.num_participants, p.members)
        if (group := smallest_group(graph, sorted(alive_survivors))) < floor:
            raise ProtocolViolation(
                f"with these dropouts the finished sites fall apart into groups whose masks cancel within "
                f"themselves, the smallest of {group} sites; unmasking would let the server read its sum, "
                f"below this site's min_aggregation_sites = {floor}"
            )
        return alive_survivors, alive_dropped

    def sign_survivors(self, survivors: Sequence[int], dropped: Sequence[int]) -> bytes:
        """This site's signature on the lists it was given; one list a round, checked as :meth:`unmask` would."""
        if self.identity is None or self.params is None:
            raise ProtocolViolation("only a roster member signs lists of survivors")
        self._check_view(survivors, dropped)
        view = (tuple(sorted(survivors)), tuple(sorted(dropped)))
        if self.signed_view is not None and self.signed_view != view:
            raise ProtocolViolation(
                "this site already signed another list of survivors for this round; the server is telling "
                "sites different stories about who dropped"
            )
        self.signed_view = view
        return self.identity.sign(survivors_message(bound_tag_of(self.params), *view))

    def _check_signatures(self, survivors: set[int], signatures: Mapping[int, bytes]) -> None:
        """A majority of this site's neighbourhood (the threshold) signed the list it signed itself."""
        p = self.params
        assert p is not None and self.roster is not None and self.signed_view is not None
        message = survivors_message(bound_tag_of(p), *self.signed_view)
        voters = (set(self.alive) | {p.index}) & survivors
        valid = {
            i
            for i in voters
            if i in signatures and i in p.members and self.roster.verify(p.members[i].member, message, signatures[i])
        }
        if len(valid) < p.threshold:
            raise ProtocolViolation(
                f"only {len(valid)} of this site's neighbourhood signed the same list of survivors, "
                f"{p.threshold} are needed before it reveals a dropped neighbour's mask key; the server may be "
                "telling sites different stories about who dropped"
            )

    def unmask(
        self, survivors: Sequence[int], dropped: Sequence[int], signatures: Mapping[int, bytes] | None = None
    ) -> tuple[dict[int, bytes], dict[int, bytes]]:
        """Shares of ``b`` for neighbours that finished and of ``s`` for those that dropped.

        With a roster, a dropped neighbour's ``s`` share leaves only for the list this site signed
        (:meth:`sign_survivors`) and with ``signatures`` on it from a majority of its neighbourhood.
        """
        alive_survivors, alive_dropped = self._check_view(survivors, dropped)
        p = self.params
        assert p is not None
        view = (tuple(sorted(survivors)), tuple(sorted(dropped)))
        if self.signed_view is not None and self.signed_view != view:
            raise ProtocolViolation(
                "asked to unmask under a list of survivors other than the one this site signed; the server is "
                "telling sites different stories about who dropped"
            )
        reveals_keys = bool(set(self.alive) & alive_dropped)
        if self.roster is not None and reveals_keys:
            if self.signed_view != (tuple(sorted(survivors)), tuple(sorted(dropped))):
                raise ProtocolViolation(
                    "asked to reveal dropped neighbours' mask keys for a list of survivors this site did not sign"
                )
            self._check_signatures(alive_survivors, signatures or {})
        self.unmasked = True
        mine = set(self.alive) | {p.index}
        b_out = {j: self.held_shares[j][0] for j in sorted(mine & alive_survivors)}
        s_out = {j: self.held_shares[j][1] for j in sorted(set(self.alive) & alive_dropped)}
        return b_out, s_out


class ServerRound:
    """The server's side of one round: assigns the graph, relays shares, removes masks."""

    def __init__(
        self,
        round_tag: bytes,
        advertised: Mapping[int, Advertisement],
        clip_range: float,
        min_survivors: int,
        vector_length: int,
        neighbours: int = 0,
        threshold_fraction: float = 0.5,
    ):
        self.round_tag, self.clip_range, self.min_survivors = round_tag, clip_range, max(2, min_survivors)
        if len(advertised) < self.min_survivors:
            raise SecureAggregationError(
                f"{len(advertised)} sites advertised keys; secure aggregation needs at least {self.min_survivors}"
            )
        self.vector_length = vector_length
        self.nodes = sorted(advertised)
        self.index = {node: i + 1 for i, node in enumerate(self.nodes)}
        self.node_of = {i: node for node, i in self.index.items()}
        self.ads = {self.index[n]: a for n, a in advertised.items()}
        k = neighbour_count(len(self.nodes), neighbours)
        self.threshold = reconstruction_threshold(k, threshold_fraction)
        self.total_examples = sum(a.num_examples for a in self.ads.values())
        if self.total_examples >= MAX_TOTAL_EXAMPLES:
            raise SecureAggregationError(f"{self.total_examples} examples advertised; a round holds fewer than 2**40")
        signed = {i: a.signed_keys for i, a in self.ads.items()}
        self.members = {i: s for i, s in signed.items() if s is not None} if all(signed.values()) else {}
        #: The round tag bound to the parameters every site is told (:func:`bound_round_tag`).
        self.bound_tag = bound_round_tag(
            round_tag,
            self.threshold,
            self.min_survivors,
            clip_range,
            len(self.nodes),
            self.total_examples,
            k,
            self.members,
        )
        self.graph = round_graph(round_tag, k, len(self.nodes), self.members)
        self.shared: set[int] = set()
        self.masked: dict[int, np.ndarray] = {}

    def share_keys_requests(self) -> dict[int, RoundParameters]:
        return {
            self.node_of[i]: RoundParameters(
                round_tag=self.round_tag,
                index=i,
                neighbours={j: (self.ads[j].c_public, self.ads[j].s_public) for j in self.graph[i]},
                threshold=self.threshold,
                min_survivors=self.min_survivors,
                clip_range=self.clip_range,
                num_participants=len(self.nodes),
                total_examples=self.total_examples,
                members=self.members,
            )
            for i in self.node_of
        }

    def _require(self, count: int, step: str) -> None:
        if count < self.min_survivors:
            raise SecureAggregationError(
                f"{step}: only {count} sites remain, fewer than the {self.min_survivors} needed; the round is abandoned"
            )

    def unshared(self, replies: Mapping[int, Mapping[int, bytes]]) -> list[int]:
        """The nodes that advertised but did not send a share to each of their neighbours.

        Sites mask with every neighbour or not at all (:meth:`ClientRound.receive_shares`), so a
        round with any such node has to be set up again without it.
        """
        complete = {n for n, r in replies.items() if n in self.index and set(self.graph[self.index[n]]) <= set(r)}
        return [n for n in self.nodes if n not in complete]

    def route_shares(self, replies: Mapping[int, Mapping[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """Each site gets the ciphertexts its neighbours addressed to it; raises
        SecureAggregationError unless every site that advertised shared with all its neighbours."""
        if missing := self.unshared(replies):
            raise SecureAggregationError(
                f"nodes {missing} did not share their keys with all their neighbours; sites mask with every "
                "neighbour or not at all, so the round has to be set up again without them"
            )
        replies = {n: r for n, r in replies.items() if n in self.index}
        self.shared = {self.index[n] for n in replies}
        self._require(len(self.shared), "share keys")
        by_index = {self.index[n]: r for n, r in replies.items()}
        return {
            self.node_of[i]: {j: by_index[j][i] for j in self.graph[i] if j in self.shared and i in by_index[j]}
            for i in sorted(self.shared)
        }

    def malformed(self, vector: np.ndarray) -> str | None:
        """What is wrong with a masked vector's type or shape, or None when it fits this round."""
        expected = (self.vector_length + 1,)
        if vector.dtype != np.uint64 or vector.shape != expected:
            return f"a masked vector of {vector.dtype} {vector.shape}; expected uint64 {expected}"
        return None

    def receive_masked(self, replies: Mapping[int, np.ndarray]) -> dict[int, tuple[list[int], list[int]]]:
        """Record the masked vectors; what each finished site is asked to unmask (survivors, dropped)."""
        for node, vector in replies.items():
            v = np.asarray(vector)
            if (problem := self.malformed(v)) is not None:
                raise SecureAggregationError(f"node {node} sent {problem}")
            if self.index[node] in self.shared:
                self.masked[self.index[node]] = v
        self._require(len(self.masked), "masked input")
        survivors = sorted(self.masked)
        dropped = sorted(self.shared - set(self.masked))
        return {self.node_of[i]: (survivors, dropped) for i in survivors}

    @property
    def needs_survivor_signatures(self) -> bool:
        """Whether sites will ask for signatures on the list of survivors: a roster round in which some dropped."""
        return bool(self.members) and bool(self.shared - set(self.masked))

    def signatures_by_index(self, signatures: Mapping[int, bytes]) -> dict[int, bytes]:
        """The survivors' signatures on the list (by node) keyed by index, as sites check them."""
        return {self.index[n]: sig for n, sig in signatures.items() if n in self.index}

    @property
    def dropped_nodes(self) -> list[int]:
        return [self.node_of[i] for i in sorted(set(self.node_of) - set(self.masked))]

    def _combine(
        self, owner: int, kind: int, answers: Mapping[int, tuple[Mapping[int, bytes], Mapping[int, bytes]]]
    ) -> bytes:
        # A share of the wrong size (a faulty site) counts as missing, not as a crash.
        holders = [h for h in sorted(answers) if len(answers[h][kind].get(owner, b"")) == 4 * _SHARE_WORDS]
        if len(holders) < self.threshold:
            what = "self-mask seed" if kind == 0 else "mask key"
            raise SecureAggregationError(
                f"unmask: only {len(holders)} shares of site {self.node_of[owner]}'s {what} came back, "
                f"{self.threshold} are needed; the round is abandoned"
            )
        rows = np.stack([_decode_share(answers[h][kind][owner]) for h in holders])
        return combine_shares(holders, rows, self.threshold, SEED_BYTES)

    def unmask(self, replies: Mapping[int, tuple[Mapping[int, bytes], Mapping[int, bytes]]]) -> SecureSum:
        """Remove all masks from the sum of the masked vectors."""
        answers = {self.index[n]: r for n, r in replies.items() if self.index[n] in self.masked}
        total = np.zeros(self.vector_length + 1, dtype=np.uint64)
        for i in sorted(self.masked):
            np.add(total, self.masked[i], out=total)
        for i in sorted(self.masked):
            add_mask(total, self._combine(i, 0, answers), -1)
        tag = self.bound_tag
        for j in sorted(self.shared - set(self.masked)):
            s_private = self._combine(j, 1, answers)
            if public_key_of(s_private) != self.ads[j].s_public:
                raise SecureAggregationError(f"unmask: shares of site {self.node_of[j]}'s mask key are inconsistent")
            for i in self.graph[j]:
                if i in self.masked:
                    seed = agree(s_private, self.ads[i].s_public, _info("mask", tag, i, j))
                    add_mask(total, seed, -1 if i < j else +1)
        finished = sum(self.ads[i].num_examples for i in self.masked)
        grid = QuantisationGrid(self.clip_range, self.total_examples)
        return SecureSum(
            mean_update=dequantise(total[:-1], grid, finished),
            survivors=[self.node_of[i] for i in sorted(self.masked)],
            dropped=self.dropped_nodes,
            clipped_values=int(total[-1]),
            weight=finished / self.total_examples,
            grid_step=grid.step,
        )


__all__ = [
    "ALREADY_MASKED",
    "ALREADY_REVEALED",
    "Advertisement",
    "ClientRound",
    "ProtocolViolation",
    "RoundParameters",
    "SecureAggregationError",
    "SecureSum",
    "ServerRound",
    "ShareDecryptionError",
]
