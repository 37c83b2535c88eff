"""``fedtune deploy``: set up a real federation (credentials, the signed app bundle, start scripts)."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from fedtune.cli.config_options import add_config_options, config_from_args
from fedtune.cli.exit_codes import ExitCode
from fedtune.common.config import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    deploy = sub.add_parser("deploy", help="set up a real federation").add_subparsers(
        dest="deploy_command", required=True
    )
    init = deploy.add_parser(
        "init",
        help="write the CA, TLS certificate, site keys, signing key, app bundle and start scripts",
        description="Writes OUT/operator (keep private: CA and signing keys) and OUT/sites/<site> (hand each "
        "folder to its site). Prints the commands each role runs.",
    )
    init.add_argument("out", type=Path, help="new folder for everything generated")
    add_config_options(init, config_help="the federation's TOML config", preset_help="a built-in config")
    init.add_argument("--host", default="127.0.0.1", help="address sites use to reach the SuperLink")
    init.add_argument("--port", type=int, default=8000, help="SuperLink port (Fleet, Control and Runtime APIs)")
    init.add_argument("--sites", nargs="+", metavar="SITE_ID", help="site names (default: site-0 .. site-N-1)")
    init.add_argument(
        "--site-key",
        action="append",
        default=[],
        metavar="SITE_ID=AUTH_PUB",
        help="a site's Flower public key, made on the site by `fedtune site init` (repeat per site); sites "
        "without one get a key pair made here, for trials on one machine",
    )
    sign = deploy.add_parser(
        "sign",
        help="rebuild and sign the app bundle after editing OUT/operator/app (bump its version)",
        description="Builds OUT/operator/app into a Flower app bundle, signs it with the operator's key and "
        "stores it in OUT/operator/registry, where the app registry serves it to the SuperLink.",
    )
    sign.add_argument("out", type=Path, help="the folder `fedtune deploy init` wrote")
    registry = deploy.add_parser(
        "registry",
        help="serve the signed app bundles to the SuperLink (run beside it)",
        description="A Hub-compatible endpoint on 127.0.0.1 for `flwr run @fedtune/fedtune-app==VERSION`. "
        "It holds no secret: sites check the signatures themselves.",
    )
    registry.add_argument("out", type=Path, help="the folder `fedtune deploy init` wrote")
    add = deploy.add_parser(
        "add-approval",
        help="add a site's approval (from `fedtune site approve`) to the bundle the registry serves",
        description="Sites run only bundles they approved: the registry serves each site's signature with the "
        "bundle whose sha256 the approval names.",
    )
    add.add_argument("out", type=Path, help="the folder `fedtune deploy init` wrote")
    add.add_argument("approvals", type=Path, nargs="+", help="approval files the sites sent")
    add.set_defaults(run=_deploy_add_approval)
    init.set_defaults(run=_deploy_init)
    sign.set_defaults(run=_deploy_sign)
    registry.set_defaults(run=_deploy_registry)


def _deploy_init(args: argparse.Namespace) -> ExitCode:
    from fedtune.deploy.bundle import init_deployment

    cfg = config_from_args(args)
    keys = {}
    for item in args.site_key:
        site, sep, path = item.partition("=")
        if not sep or not path:
            raise ConfigError(f"--site-key {item!r}: expected SITE_ID=PATH/TO/auth.pub")
        keys[site] = Path(path)
    try:
        d = init_deployment(args.out, cfg, args.host, args.port, args.sites, site_public_keys=keys)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    o = d.operator
    print(
        f"wrote {d.root}\n\noperator (keep {o} private):\n  {o / 'start-registry.sh'}   # serves the signed app\n"
        f"  {o / 'start-superlink.sh'}\n  {o / 'register-sites.sh'}   # once the SuperLink is up\n"
        f"  {o / 'run-federation.sh'}\n  {o / 'sign-app.sh'}   # after editing {d.app}\n\neach site:"
    )
    for site in d.sites:
        print(
            f"  give {d.site_dir(site)} to {site}; it edits policy.toml (data_path, limits) and runs start-supernode.sh"
        )
    return ExitCode.OK


def _deploy_sign(args: argparse.Namespace) -> ExitCode:
    from fedtune.deploy.app_registry import publish_app
    from fedtune.deploy.layout import load_deployment

    d = load_deployment(args.out)
    app = publish_app(d.app, d.operator / "signing.key", d.signing_key_id, d.registry)
    script = d.operator / "run-federation.sh"
    print(f"signed {app.spec}: {app.fab}\nrun it with: flwr run {app.spec} --stream (see {script})")
    return ExitCode.OK


def _deploy_registry(args: argparse.Namespace) -> ExitCode:
    from fedtune.deploy.app_registry import AppRegistry
    from fedtune.deploy.layout import load_deployment

    d = load_deployment(args.out)
    registry = AppRegistry(d.registry, port=d.registry_port)
    print(f"serving the signed apps in {d.registry} at {registry.api_url} (Ctrl-C stops)", flush=True)
    try:
        registry.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        registry.close()
    return ExitCode.OK


def _deploy_add_approval(args: argparse.Namespace) -> ExitCode:
    from fedtune.deploy.app_approval import add_approval
    from fedtune.deploy.layout import load_deployment

    registry = load_deployment(args.out).registry
    fabs = {hashlib.sha256(p.read_bytes()).hexdigest(): p for p in sorted(registry.glob("*.fab"))}
    for path in args.approvals:
        try:
            approval = json.loads(Path(path).read_text())
            fab = fabs[approval.pop("fab_sha256")]
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"{path}: not an approval of a bundle in {registry} ({exc})") from exc
        count = add_approval(fab, approval)
        print(f"{fab.name}: added {path} ({count} signature(s) served with it)")
    return ExitCode.OK
