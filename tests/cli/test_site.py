"""``fedtune site init``/``pin`` and ``fedtune roster build``: each site makes its own key, the operator only
ever sees public keys, and a site's policy pins the roster it compared."""

from __future__ import annotations

import re

import pytest

from fedtune.cli import main
from fedtune.cli.exit_codes import ExitCode
from fedtune.client.policy import PolicyError, load_policy, policy_membership
from fedtune.common.roster import load_roster


def _init(tmp_path, name, capsys) -> str:
    assert main(["site", "init", str(tmp_path / name), "--name", name]) == ExitCode.OK
    out = capsys.readouterr().out
    (line,) = [s.strip() for s in out.splitlines() if s.strip().startswith(f"{name}=ed25519:")]
    return line


def test_sites_make_their_keys_the_operator_builds_the_roster_and_a_site_pins_it(tmp_path, capsys):
    lines = [_init(tmp_path, name, capsys) for name in ("bank-a", "bank-b", "bank-c")]
    assert "PRIVATE KEY" in (tmp_path / "bank-a" / "identity.pem").read_text()
    assert all("PRIVATE" not in line for line in lines), "only public keys are handed over"
    roster_path = tmp_path / "roster.toml"
    args = ["roster", "build", str(roster_path), "--federation", "banks", "--min-aggregation-sites", "3"]
    assert main(args + [a for line in lines for a in ("--member", line)]) == ExitCode.OK
    fingerprint = re.search(r"fingerprint: (sha256:\w+)", capsys.readouterr().out).group(1)
    assert load_roster(roster_path).fingerprint == fingerprint

    assert main(["site", "pin", str(roster_path), "--identity", str(tmp_path / "bank-a" / "identity.pem")]) == 0
    out = capsys.readouterr().out
    pin_lines = [s.strip() for s in out.splitlines() if re.match(r"\s+(roster|roster_fingerprint|identity_key) = ", s)]
    assert len(pin_lines) == 3
    policy = tmp_path / "bank-a" / "policy.toml"
    policy.write_text("[policy]\n" + "\n".join(pin_lines) + "\n")
    membership = policy_membership(load_policy(policy))
    assert membership is not None and membership.identity.member == "bank-a"
    assert membership.roster.min_aggregation_sites == 3

    # The operator changes the roster (drops bank-c, lowers the floor): the pinned site refuses it.
    assert main(["roster", "build", str(roster_path), "--federation", "banks", "--member", lines[0]]) == 0
    with pytest.raises(PolicyError, match="is not the pinned"):
        policy_membership(load_policy(policy))


def test_a_second_init_a_bad_name_and_a_policy_without_its_pin_fail_clearly(tmp_path, capsys):
    line = _init(tmp_path, "h1", capsys)
    assert main(["site", "init", str(tmp_path / "h1"), "--name", "h1"]) == ExitCode.USAGE
    assert f"exists; a site keeps one identity; its public line for the roster: {line}" in capsys.readouterr().err
    assert main(["site", "init", str(tmp_path / "x"), "--name", "bad name"]) == ExitCode.USAGE
    assert "a member name is 1-64" in capsys.readouterr().err
    assert main(["roster", "build", str(tmp_path / "r.toml"), "--federation", "f", "--member", "h1=rsa:abc"]) == 2
    assert "expected a public key 'ed25519:<base64>'" in capsys.readouterr().err
    policy = tmp_path / "policy.toml"
    policy.write_text('[policy]\nroster = "r.toml"\n')
    with pytest.raises(PolicyError, match="roster, roster_fingerprint and identity_key go together"):
        load_policy(policy)


def test_an_identity_missing_from_the_roster_is_refused(tmp_path, capsys):
    a, _ = _init(tmp_path, "a", capsys), _init(tmp_path, "b", capsys)
    assert main(["roster", "build", str(tmp_path / "r.toml"), "--federation", "f", "--member", a]) == 0
    capsys.readouterr()
    assert main(["site", "pin", str(tmp_path / "r.toml"), "--identity", str(tmp_path / "b" / "identity.pem")]) == 2
    assert "identity 'b' is not on the roster of 'f'" in capsys.readouterr().err


def test_the_operator_registers_a_sites_own_flower_key_and_never_holds_its_private_half(tmp_path, capsys):
    """`fedtune site init` also makes the site's Flower SuperNode key; `deploy init --site-key` takes its public
    half: the site's folder in the operator's output has no private key, and the registered key is the site's."""
    _init(tmp_path, "north", capsys)
    assert (tmp_path / "north" / "auth").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "north" / "auth.pub").read_bytes().startswith(b"ecdsa-sha2-nistp384 ")
    args = ["deploy", "init", str(tmp_path / "fed"), "--preset", "banking77-minilm", "--sites", "north", "south"]
    assert main([*args, "--site-key", f"north={tmp_path / 'north' / 'auth.pub'}"]) == ExitCode.OK
    capsys.readouterr()
    fed = tmp_path / "fed"
    assert (fed / "operator" / "site-keys" / "north.pub").read_bytes() == (tmp_path / "north" / "auth.pub").read_bytes()
    assert not (fed / "sites" / "north" / "auth").exists(), "the operator made no key for north"
    assert (fed / "sites" / "south" / "auth").exists(), "a site without --site-key gets one (trials on one machine)"
    # A private key handed over by mistake, or a site that is not in the federation, is refused.
    bad = [*args[:2], str(tmp_path / "fed2"), *args[3:]]
    assert main([*bad, "--site-key", f"north={tmp_path / 'north' / 'auth'}"]) == ExitCode.USAGE
    assert "never send or accept a private key" in capsys.readouterr().err
    assert main([*bad, "--site-key", f"east={tmp_path / 'north' / 'auth.pub'}"]) == ExitCode.USAGE
    assert "not in the federation" in capsys.readouterr().err
    # Running site init over an operator-made key refuses rather than replace it silently.
    assert main(["site", "init", str(fed / "sites" / "south"), "--name", "south"]) == ExitCode.USAGE
    assert "move it away to make this site's own" in capsys.readouterr().err
