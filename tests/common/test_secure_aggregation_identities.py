"""A server that forges who takes part (issue 15, attacks 1 and 5): keys it made itself passed off as
neighbours' keys, sites that do not exist (Sybils), a member's signed keys replayed from another round.

Each attack recovers the victim's update from today's protocol without a roster (the faithful copy:
sites that trust whatever keys the server relays), and fails with a roster the victim pins: it
refuses before it encrypts a single share.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedtune.common.roster import Roster, RosterError, load_roster
from fedtune.common.secure_aggregation.protocol import Advertisement, ClientRound, ProtocolViolation, ServerRound
from fedtune.common.secure_aggregation.records import (
    advertisement_from,
    advertisement_record,
    params_from,
    params_record,
)
from fedtune.common.site_identity import IdentityError, SiteIdentity, load_identity

D = 2_000
CLIP = 0.1


def _tag(round_: int) -> bytes:
    return f"fedtune/run/{round_}".encode()


def _members(*names: str) -> tuple[dict[str, SiteIdentity], Roster]:
    identities = {n: SiteIdentity.generate(n) for n in names}
    return identities, Roster("hospitals", {n: i.public for n, i in identities.items()}, min_aggregation_sites=2)


def _play(sites: dict[int, ClientRound], updates: dict[int, np.ndarray], tag: bytes):
    """One complete round between ``sites`` and a server that follows the protocol's steps."""
    # The server states whatever floor the sites ask for: here every participant.
    server = ServerRound(tag, {n: s.advertise(tag) for n, s in sites.items()}, CLIP, len(sites), D)
    params = server.share_keys_requests()
    inboxes = server.route_shares({n: sites[n].share_keys(p) for n, p in params.items()})
    masked = {n: sites[n].masked_input(box, updates[n]) for n, box in inboxes.items()}
    requests = server.receive_masked(masked)
    return server.unmask({n: sites[n].unmask(*r) for n, r in requests.items()})


def _sybil_attack(victim: ClientRound, fakes: list[ClientRound], update: np.ndarray, tag: bytes) -> np.ndarray:
    """The server runs every other participant itself: the sum it unmasks is the victim's update alone."""
    sites = {1: victim} | {2 + i: f for i, f in enumerate(fakes)}
    updates = {1: update} | {2 + i: np.zeros(D, dtype=np.float32) for i in range(len(fakes))}
    result = _play(sites, updates, tag)
    total = sum(s.num_examples for s in sites.values())
    return result.mean_update * result.weight * total / victim.num_examples


@pytest.fixture
def update() -> np.ndarray:
    return np.random.default_rng(0).normal(0, 0.01, D).astype(np.float32)


def test_without_a_roster_a_server_of_sybils_recovers_the_victims_update(update):
    victim = ClientRound(300, min_survivors_floor=3)
    recovered = _sybil_attack(victim, [ClientRound(100), ClientRound(100)], update, _tag(1))
    np.testing.assert_allclose(recovered, update, atol=1e-5)


def test_with_a_roster_sybils_are_refused_before_any_share_is_encrypted(update):
    identities, roster = _members("victim", "clinic-a", "clinic-b")
    victim = ClientRound(300, min_survivors_floor=3, roster=roster, identity=identities["victim"])
    fakes = [ClientRound(100, identity=SiteIdentity.generate(f"ghost-{i}")) for i in range(2)]
    with pytest.raises(ProtocolViolation, match="'ghost-0' is not a member of federation 'hospitals'"):
        _sybil_attack(victim, fakes, update, _tag(1))
    assert victim.params is None  # nothing encrypted, nothing trained


def test_with_a_roster_keys_substituted_under_a_members_name_are_refused(update):
    """The server keeps the members' names but signs its own keys: it has no member's private key."""
    identities, roster = _members("victim", "clinic-a", "clinic-b")
    victim = ClientRound(300, roster=roster, identity=identities["victim"])
    fakes = [ClientRound(100, identity=SiteIdentity.generate(name)) for name in ("clinic-a", "clinic-b")]
    with pytest.raises(ProtocolViolation, match="do not carry its signature"):
        _sybil_attack(victim, fakes, update, _tag(1))


def test_a_members_signed_keys_replayed_from_another_round_are_refused(update):
    identities, roster = _members("victim", "clinic-a", "clinic-b")
    honest = {n: ClientRound(100, roster=roster, identity=identities[n]) for n in ("clinic-a", "clinic-b")}
    old_ads = {n: s.advertise(_tag(1)) for n, s in honest.items()}  # the server saw these in round 1
    victim = ClientRound(300, roster=roster, identity=identities["victim"])
    ads = {1: victim.advertise(_tag(2)), 2: old_ads["clinic-a"], 3: old_ads["clinic-b"]}
    params = ServerRound(_tag(2), ads, CLIP, 2, D).share_keys_requests()
    with pytest.raises(ProtocolViolation, match="index 2: the keys relayed as 'clinic-a'"):
        victim.share_keys(params[1])


def test_with_a_roster_unsigned_keys_doubled_members_and_foreign_own_keys_are_refused():
    identities, roster = _members("victim", "clinic-a", "clinic-b")
    tag = _tag(1)
    sites = {i + 1: ClientRound(100, roster=roster, identity=identities[n]) for i, n in enumerate(identities)}
    ads = {n: s.advertise(tag) for n, s in sites.items()}
    params = ServerRound(tag, ads, CLIP, 2, D).share_keys_requests()
    with pytest.raises(ProtocolViolation, match="relayed unsigned keys"):
        sites[1].share_keys(dataclasses.replace(params[1], members={}))
    doubled = {**params[1].members, 3: params[1].members[2]}
    with pytest.raises(ProtocolViolation, match="one roster member is listed under two indices"):
        ClientRound(100, roster=roster, identity=identities["victim"]).share_keys(
            dataclasses.replace(params[1], members=doubled)
        )
    stranger = ClientRound(100, roster=roster, identity=identities["victim"])  # fresh keys, same member
    with pytest.raises(ProtocolViolation, match="not the ones it signed"):
        stranger.share_keys(params[1])


def test_a_roster_floor_above_the_sites_own_is_enforced():
    identities, _ = _members("a", "b", "c")
    roster = Roster("hospitals", {n: i.public for n, i in identities.items()}, min_aggregation_sites=3)
    site = ClientRound(100, min_survivors_floor=2, roster=roster, identity=identities["a"])
    assert site.floor == 3
    ads = {i + 1: ClientRound(100, identity=identities[n]).advertise(_tag(1)) for i, n in enumerate("abc")}
    ads[1] = site.advertise(_tag(1))
    params = ServerRound(_tag(1), ads, CLIP, 2, D).share_keys_requests()
    with pytest.raises(ProtocolViolation, match="this site requires at least 3"):
        site.share_keys(params[1])


def test_members_of_a_roster_complete_a_round_with_the_exact_weighted_mean(update):
    identities, roster = _members("a", "b", "c", "d")
    sites = {i + 1: ClientRound(50 * (i + 1), roster=roster, identity=identities[n]) for i, n in enumerate("abcd")}
    rng = np.random.default_rng(1)
    updates = {n: rng.normal(0, 0.01, D).astype(np.float32) for n in sites}
    result = _play(sites, updates, _tag(1))
    truth = sum(sites[n].num_examples * updates[n].astype(np.float64) for n in sites) / 500
    np.testing.assert_allclose(result.mean_update, truth, atol=1e-5)


def test_signed_keys_survive_the_wire_records():
    identities, roster = _members("a", "b", "c")
    sites = {i + 1: ClientRound(100, roster=roster, identity=identities[n]) for i, n in enumerate("abc")}
    ads = {
        n: advertisement_from(advertisement_record(s.advertise(_tag(1)), _tag(1)), _tag(1)) for n, s in sites.items()
    }
    assert ads[1].member == "a" and len(ads[1].signature) == 64
    params = ServerRound(_tag(1), ads, CLIP, 2, D).share_keys_requests()
    assert params_from(params_record(params[1])) == params[1]
    sites[1].share_keys(params_from(params_record(params[1])))
    assert advertisement_from(advertisement_record(Advertisement(b"c" * 32, b"s" * 32, 5), b"t"), b"t").member == ""


def test_roster_and_identity_files_round_trip_and_a_changed_roster_is_not_the_pinned_one(tmp_path):
    identities, roster = _members("bank-a", "bank-b")
    identities["bank-a"].save(tmp_path / "identity.pem")
    assert oct((tmp_path / "identity.pem").stat().st_mode & 0o777) == "0o600"
    assert load_identity(tmp_path / "identity.pem") == identities["bank-a"]
    roster.save(tmp_path / "roster.toml")
    assert load_roster(tmp_path / "roster.toml", roster.fingerprint) == roster
    text = (tmp_path / "roster.toml").read_text().replace("min_aggregation_sites = 2", "min_aggregation_sites = 5")
    (tmp_path / "roster.toml").write_text(text)
    with pytest.raises(RosterError, match=r"roster.toml: roster fingerprint sha256:\w+ is not the pinned"):
        load_roster(tmp_path / "roster.toml", roster.fingerprint)
    (tmp_path / "roster.toml").write_text(text.replace('"ed25519:', '"rsa:', 1))
    with pytest.raises(RosterError, match=r"members.bank-a: expected a public key 'ed25519:<base64>'"):
        load_roster(tmp_path / "roster.toml")
    (tmp_path / "bad.pem").write_text("hello\n")
    with pytest.raises(IdentityError, match="bad.pem: not a fedtune identity key"):
        load_identity(tmp_path / "bad.pem")


def test_a_threshold_below_a_majority_is_refused_it_would_let_the_server_rebuild_both_secrets():
    """With t <= (k + 1) / 2, the holders told "it dropped" and those told "it finished" could each reach t."""
    sites = {n: ClientRound(100) for n in range(1, 6)}
    params = ServerRound(_tag(1), {n: s.advertise() for n, s in sites.items()}, CLIP, 2, D).share_keys_requests()
    assert params[1].threshold == 3 and len(params[1].neighbours) == 4
    with pytest.raises(ProtocolViolation, match="threshold 2 of 5 shares is not a majority"):
        sites[1].share_keys(dataclasses.replace(params[1], threshold=2))
    sites[2].share_keys(params[2])  # the server's own threshold (3 of 5) is accepted


def test_colluding_members_travels_in_the_roster_and_its_fingerprint_only_when_set(tmp_path):
    identities, roster = _members("bank-a", "bank-b")
    guarded = dataclasses.replace(roster, colluding_members=1)
    assert guarded.fingerprint != roster.fingerprint
    assert "colluding_members" not in roster.to_toml()  # rosters pinned before it keep their fingerprint
    guarded.save(tmp_path / "roster.toml")
    assert load_roster(tmp_path / "roster.toml", guarded.fingerprint) == guarded
    text = (tmp_path / "roster.toml").read_text()
    (tmp_path / "roster.toml").write_text(text.replace("colluding_members = 1", "colluding_members = 0"))
    with pytest.raises(RosterError, match="is not the pinned"):
        load_roster(tmp_path / "roster.toml", guarded.fingerprint)
    (tmp_path / "roster.toml").write_text(text.replace("colluding_members = 1", 'colluding_members = "1"'))
    with pytest.raises(RosterError, match=r"roster.toml: roster.colluding_members: expected an integer, got '1'"):
        load_roster(tmp_path / "roster.toml")
    with pytest.raises(RosterError, match="colluding_members is at least 0"):
        dataclasses.replace(roster, colluding_members=-1)


@pytest.mark.parametrize(("fraction", "refused"), [(0.5, True), (2 / 3, False)])
def test_members_of_a_roster_that_withstands_a_colluder_refuse_a_bare_majority_threshold(fraction, refused):
    """colluding_members = 1 needs 2t > k + 2: with k = 4, t = 3 (a bare majority) is refused before
    any share is encrypted, and t = 4 (threshold_fraction 2/3) is accepted."""
    names = [f"h{i}" for i in range(1, 6)]
    identities = {n: SiteIdentity.generate(n) for n in names}
    roster = Roster("hospitals", {n: i.public for n, i in identities.items()}, colluding_members=1)
    sites = {i: ClientRound(100, roster=roster, identity=identities[n]) for i, n in enumerate(names, start=1)}
    server = ServerRound(
        _tag(1), {i: s.advertise(_tag(1)) for i, s in sites.items()}, CLIP, 2, D, threshold_fraction=fraction
    )
    params = server.share_keys_requests()
    if refused:
        with pytest.raises(
            ProtocolViolation, match=r"threshold 3 of 5 shares cannot withstand the roster's colluding_members = 1"
        ):
            sites[1].share_keys(params[1])
    else:
        assert params[1].threshold == 4
        updates = {i: np.full(D, 0.01 * i, dtype=np.float32) for i in sites}
        inboxes = server.route_shares({i: sites[i].share_keys(p) for i, p in params.items()})
        masked = {i: sites[i].masked_input(box, updates[i]) for i, box in inboxes.items()}
        result = server.unmask({i: sites[i].unmask(*r) for i, r in server.receive_masked(masked).items()})
        np.testing.assert_allclose(result.mean_update, np.full(D, 0.03), rtol=1e-6)  # float32 inputs
