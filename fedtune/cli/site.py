"""``fedtune site`` and ``fedtune roster``: site-owned identities and the federation's pinned roster.

A site makes its identity key on its own machine and hands over only the public half; the
operator collects the public keys into a roster; every site checks the roster's fingerprint
with the others out of band and pins it in its ``policy.toml``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedtune.cli.exit_codes import ExitCode
from fedtune.client.membership import IDENTITY_FILE, MembershipError, load_membership
from fedtune.common.atomic_files import atomic_write_json
from fedtune.common.config import ConfigError
from fedtune.common.roster import MEMBER_NAME, Roster, RosterError, load_roster
from fedtune.common.site_identity import (
    IdentityError,
    SiteIdentity,
    decode_public_key,
    encode_public_key,
    key_fingerprint,
    load_identity,
)
from fedtune.deploy.app_approval import (
    APPROVAL_KEY,
    TRUSTED_ENTITIES,
    BundleRefused,
    approve_bundle,
    make_approval_key,
    review_bundle,
)
from fedtune.deploy.credentials import make_site_auth_key


def register(sub: argparse._SubParsersAction) -> None:
    site = sub.add_parser("site", help="a site's identity and the roster it pins").add_subparsers(
        dest="site_command", required=True
    )
    init = site.add_parser(
        "init",
        help="make this site's identity key (on the site's own machine)",
        description=f"Writes DIR/{IDENTITY_FILE} (the secure-aggregation identity) and DIR/auth (the Flower "
        "SuperNode key), both mode 0600, neither leaving this machine; prints what to send the operator: "
        "DIR/auth.pub and the public key line for the roster.",
    )
    init.add_argument("dir", type=Path, help="the site's folder (e.g. the one with its policy.toml)")
    init.add_argument("--name", required=True, help="this site's member name on the roster, e.g. hospital-a")
    init.set_defaults(run=_site_init)
    pin = site.add_parser(
        "pin",
        help="check a roster against this site's identity and print the policy.toml lines that pin it",
        description="Prints the roster's fingerprint: compare it with the other members out of band (a call, "
        "a letter) before pasting the lines into policy.toml.",
    )
    pin.add_argument("roster", type=Path, help="the roster file the operator sent")
    pin.add_argument("--identity", type=Path, required=True, help=f"this site's {IDENTITY_FILE}")
    pin.set_defaults(run=_site_pin)
    approve = site.add_parser(
        "approve",
        help="review an app bundle and sign it with this site's approval key",
        description="Refuses a bundle that carries any code but fedtune's own entry points; prints the "
        "federation's config to read; writes the approval for the operator to add to the registry "
        "(`fedtune deploy add-approval`). The site's SuperNode runs only bundles it approved.",
    )
    approve.add_argument("fab", type=Path, help="the bundle (.fab) the operator sent")
    approve.add_argument("--dir", type=Path, required=True, help="this site's folder (where `fedtune site init` ran)")
    approve.set_defaults(run=_site_approve)

    roster = sub.add_parser("roster", help="the operator's side of the roster").add_subparsers(
        dest="roster_command", required=True
    )
    build = roster.add_parser(
        "build",
        help="write the roster from the members' public keys",
        description="Every member pins the file written here; any later change (a member added or removed) "
        "changes its fingerprint, and each site must compare and pin the new one.",
    )
    build.add_argument("out", type=Path, help="the roster file to write (e.g. roster.toml)")
    build.add_argument("--federation", required=True, help="the federation's name")
    build.add_argument(
        "--member",
        action="append",
        required=True,
        metavar="NAME=ed25519:KEY",
        help="a member and the public key `fedtune site init` printed for it (repeat for each)",
    )
    build.add_argument(
        "--min-aggregation-sites", type=int, default=2, help="the fewest sites any revealed sum may cover"
    )
    build.add_argument(
        "--colluding-members",
        type=int,
        default=0,
        help="members colluding with a deviating operator that rounds must withstand, counted across the "
        "federation (0: none; each member then refuses a reconstruction threshold t unless 2t > k + 1 + this)",
    )
    build.set_defaults(run=_roster_build)


def _site_init(args: argparse.Namespace) -> ExitCode:
    path = Path(args.dir) / IDENTITY_FILE
    if path.exists():
        try:
            line = f"; its public line for the roster: {_public_line(load_identity(path))}"
        except IdentityError:
            line = ""
        raise FileExistsError(f"{path} exists; a site keeps one identity{line}")
    if (Path(args.dir) / "auth").exists():
        raise FileExistsError(
            f"{Path(args.dir) / 'auth'} exists (a Flower key made by `fedtune deploy init` on the operator's "
            "machine?): move it away to make this site's own, then send the new auth.pub to the operator"
        )
    if not MEMBER_NAME.fullmatch(args.name):
        raise ConfigError(f"--name {args.name!r}: a member name is 1-64 letters, digits, '.', '_' or '-'")
    identity = SiteIdentity.generate(args.name)
    identity.save(path)
    auth_public = make_site_auth_key(Path(args.dir), args.name)
    make_approval_key(Path(args.dir), args.name)
    print(
        f"wrote {path}, {Path(args.dir) / 'auth'} and {Path(args.dir) / APPROVAL_KEY} (private: they never leave "
        f"this machine), and {Path(args.dir) / TRUSTED_ENTITIES} (this site runs only bundles it approved: "
        "`fedtune site approve`)\n\n"
        f"send the operator {auth_public} (this site's Flower key: `fedtune deploy init --site-key "
        f"{args.name}={auth_public.name}`) and this line for the roster:\n"
        f"  {_public_line(identity)}\n\nkey fingerprint (to read out when asked): "
        f"{key_fingerprint(identity.public)}"
    )
    return ExitCode.OK


def _public_line(identity: SiteIdentity) -> str:
    return f"{identity.member}={encode_public_key(identity.public)}"


def _site_pin(args: argparse.Namespace) -> ExitCode:
    try:
        membership = load_membership(args.roster, args.identity)
    except MembershipError as exc:
        raise ConfigError(str(exc)) from exc
    roster = membership.roster
    print(
        f"roster of {roster.federation!r}: {len(roster.members)} members ({', '.join(sorted(roster.members))}), "
        f"min_aggregation_sites = {roster.min_aggregation_sites}, "
        f"colluding_members = {roster.colluding_members}\nfingerprint: {roster.fingerprint}\n\n"
        "compare the fingerprint with the other members out of band, then add to policy.toml's [policy]:\n"
        f'  roster = "{Path(args.roster).resolve()}"\n  roster_fingerprint = "{roster.fingerprint}"\n'
        f'  identity_key = "{Path(args.identity).resolve()}"'
    )
    return ExitCode.OK


def _site_approve(args: argparse.Namespace) -> ExitCode:
    try:
        fab = Path(args.fab).read_bytes()
        review = review_bundle(fab)
        verification = approve_bundle(fab, args.dir)
    except BundleRefused as exc:
        raise ConfigError(f"{args.fab}: refused: {exc}") from exc
    out = Path(args.dir) / "approvals" / f"{Path(args.fab).stem}.approval.json"
    atomic_write_json(out, {**verification, "fab_sha256": review.sha256})
    settings = ", ".join(
        f"{section}.{key} = {value!r}"
        for section, key in (("run", "name"), ("privacy", "epsilon"), ("privacy", "delta"), ("federation", "rounds"))
        if (value := review.config.get(section, {}).get(key)) is not None
    )
    print(
        f"{review.app_id}=={review.version} (sha256 {review.sha256[:16]}…): fedtune's entry points only\n"
        f"  {settings}\n  (your policy.toml still caps what any plan can make this site do)\n"
        f"wrote {out}: send it to the operator (`fedtune deploy add-approval`)"
    )
    return ExitCode.OK


def _roster_build(args: argparse.Namespace) -> ExitCode:
    members: dict[str, bytes] = {}
    try:
        for item in args.member:
            name, sep, key = item.partition("=")
            if not sep or name in members:
                raise ConfigError(f"--member {item!r}: expected NAME=ed25519:KEY, each name once")
            members[name] = decode_public_key(key, f"--member {name}")
        roster = Roster(args.federation, members, args.min_aggregation_sites, args.colluding_members)
    except (IdentityError, RosterError) as exc:
        raise ConfigError(str(exc)) from exc
    if Path(args.out).exists():
        try:
            print(f"replacing {args.out} (fingerprint was {load_roster(args.out).fingerprint})")
        except RosterError:
            print(f"replacing {args.out} (not a valid roster)")
    roster.save(args.out)
    print(
        f"wrote {args.out}: {len(members)} members, min_aggregation_sites = {roster.min_aggregation_sites}, "
        f"colluding_members = {roster.colluding_members}\n"
        f"fingerprint: {roster.fingerprint}\n\nsend the file to every member; each runs "
        "`fedtune site pin` and compares the fingerprint with the others out of band"
    )
    return ExitCode.OK
