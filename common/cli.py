"""``fedtune``: the command line for simulating a federation and fetching models."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.config import PRESETS_DIR, ConfigError, FedtuneConfig, config_from_dict, load_config, preset_path
from common.data.readers import DataError
from common.data.shapes import DATA_TASKS
from common.logs import configure_logging
from deploy.app_registry import RegistryError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtune", description="Federated DP-LoRA fine-tuning with Flower.")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run a whole federation on this machine (Flower simulation on Ray)")
    source = sim.add_mutually_exclusive_group()
    source.add_argument("--config", type=Path, help="TOML config file")
    source.add_argument("--preset", help="built-in config (see `fedtune presets`); default: banking77-minilm")
    source.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a run from its last complete round")
    sim.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    sub.add_parser("presets", help="list the built-in configs")
    data = sub.add_parser("data", help="site data tools").add_subparsers(dest="data_command", required=True)
    check = data.add_parser(
        "check", help="validate a site's data before training: counts, labels, token lengths, malformed records",
        description="Reads PATH (a file or folder) exactly as a site would at start-up and prints a summary. "
                    "Exit status: 0 trainable, 1 not trainable, 2 bad usage or config. Nothing is sent anywhere.",
    )
    check.add_argument("path", type=Path, help="data file (.jsonl, .json, .csv, .tsv, .parquet) or folder")
    check.add_argument("--task", choices=DATA_TASKS, help="record shape (default: the config's data.task)")
    check_cfg = check.add_mutually_exclusive_group()
    check_cfg.add_argument("--config", type=Path, help="take field mapping, labels, model and privacy from this TOML")
    check_cfg.add_argument("--preset", help="take them from a built-in config")
    check.add_argument("--labels", type=Path, help="JSON list of the agreed label names (classification)")
    check.add_argument("--model", help="tokenizer for token lengths: built-in name or local model directory")
    check.add_argument("--no-tokens", action="store_true", help="skip tokenisation (no length histogram)")
    check.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="e.g. data.fields.label=category, data.delimiter=';'")
    deploy = sub.add_parser("deploy", help="set up a real federation").add_subparsers(dest="deploy_command",
                                                                                      required=True)
    init = deploy.add_parser(
        "init", help="write the CA, TLS certificate, site keys, signing key, app bundle and start scripts",
        description="Writes OUT/operator (keep private: CA and signing keys) and OUT/sites/<site> (hand each "
                    "folder to its site). Prints the commands each role runs.",
    )
    init.add_argument("out", type=Path, help="new folder for everything generated")
    init_cfg = init.add_mutually_exclusive_group()
    init_cfg.add_argument("--config", type=Path, help="the federation's TOML config")
    init_cfg.add_argument("--preset", help="a built-in config")
    init.add_argument("--host", default="127.0.0.1", help="address sites use to reach the SuperLink")
    init.add_argument("--port", type=int, default=8000, help="SuperLink port (Fleet, Control and Runtime APIs)")
    init.add_argument("--sites", nargs="+", metavar="SITE_ID", help="site names (default: site-0 .. site-N-1)")
    init.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    sign = deploy.add_parser(
        "sign", help="rebuild and sign the app bundle after editing OUT/operator/app (bump its version)",
        description="Builds OUT/operator/app into a Flower app bundle, signs it with the operator's key and "
                    "stores it in OUT/operator/registry, where the app registry serves it to the SuperLink.",
    )
    sign.add_argument("out", type=Path, help="the folder `fedtune deploy init` wrote")
    registry = deploy.add_parser(
        "registry", help="serve the signed app bundles to the SuperLink (run beside it)",
        description="A Hub-compatible endpoint on 127.0.0.1 for `flwr run @fedtune/fedtune-app==VERSION`. "
                    "It holds no secret: sites check the signatures themselves.",
    )
    registry.add_argument("out", type=Path, help="the folder `fedtune deploy init` wrote")
    fetch = sub.add_parser("fetch-model", help="fetch and cache a built-in model now (smollm2-135m, minilm-l6)")
    fetch.add_argument("name")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging()
    try:
        if args.command == "presets":
            for path in sorted(PRESETS_DIR.glob("*.toml")):
                print(f"{path.stem:24s} {path}")
            return 0
        if args.command == "data":
            return _data_check(args)
        if args.command == "deploy":
            return {"init": _deploy_init, "sign": _deploy_sign, "registry": _deploy_registry}[args.deploy_command](args)
        if args.command == "fetch-model":
            from common.models.builtin import resolve_builtin

            print(resolve_builtin(args.name))
            return 0
        from server.run_directory import load_run_config
        from server.simulation import simulate

        if args.resume is not None:
            if args.set:
                raise ConfigError("--set cannot change a run being resumed; start a new run instead")
            run_dir = simulate(load_run_config(args.resume), run_dir=args.resume, resume=True)
        else:
            cfg = load_config(args.config or (preset_path(args.preset) if args.preset else None), args.set)
            run_dir = simulate(cfg)
        print(f"\nrun directory: {run_dir}\n  metrics: {run_dir / 'metrics.jsonl'}\n  plot: {run_dir / 'curves.png'}"
              f"\n  merged model: {run_dir / 'merged'}\n  site ledgers: {run_dir / 'sites'}")
        return 0
    except (ConfigError, DataError, FileExistsError, FileNotFoundError, RegistryError) as exc:
        print(f"fedtune: {exc}", file=sys.stderr)
        return 2


def _deploy_init(args: argparse.Namespace) -> int:
    from deploy.bundle import init_deployment

    cfg = load_config(args.config or (preset_path(args.preset) if args.preset else None), args.set)
    d = init_deployment(args.out, cfg, args.host, args.port, args.sites)
    o = d.operator
    print(f"wrote {d.root}\n\noperator (keep {o} private):\n  {o / 'start-registry.sh'}   # serves the signed app\n"
          f"  {o / 'start-superlink.sh'}\n  {o / 'register-sites.sh'}   # once the SuperLink is up\n"
          f"  {o / 'run-federation.sh'}\n  {o / 'sign-app.sh'}   # after editing {d.app}\n\neach site:")
    for site in d.sites:
        print(f"  give {d.site_dir(site)} to {site}; it edits policy.toml (data_path, limits) and runs "
              f"start-supernode.sh")
    return 0


def _deploy_sign(args: argparse.Namespace) -> int:
    from deploy.app_registry import publish_app
    from deploy.bundle import load_deployment

    d = load_deployment(args.out)
    app = publish_app(d.app, d.operator / "signing.key", d.signing_key_id, d.registry)
    print(f"signed {app.spec}: {app.fab}\nrun it with: flwr run {app.spec} --stream (see {d.operator / 'run-federation.sh'})")
    return 0


def _deploy_registry(args: argparse.Namespace) -> int:
    from deploy.app_registry import AppRegistry
    from deploy.bundle import load_deployment

    d = load_deployment(args.out)
    registry = AppRegistry(d.registry, port=d.registry_port)
    print(f"serving the signed apps in {d.registry} at {registry.api_url} (Ctrl-C stops)", flush=True)
    try:
        registry.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        registry.close()
    return 0


def _check_config(args: argparse.Namespace) -> FedtuneConfig:
    """The config a data check validates against: a given one with PATH and --task swapped in, or a minimal one."""
    path = args.path.expanduser().resolve()
    overrides = [f"data.path={_toml_str(path)}", *args.set]
    if args.task:
        overrides.append(f"data.task={_toml_str(args.task)}")
    if args.labels:
        overrides.append(f"data.labels_file={_toml_str(args.labels.expanduser().resolve())}")
    if args.model:
        key = "model.path" if Path(args.model).is_dir() else "model.name"
        value = Path(args.model).resolve() if key == "model.path" else args.model
        overrides.append(f"{key}={_toml_str(value)}")
    if args.config or args.preset:
        return load_config(args.config or preset_path(args.preset), overrides + ["partition.scheme=\"iid\""])
    if not args.task:
        raise ConfigError("fedtune data check: give --task (one of " + ", ".join(DATA_TASKS) + ") or --config")
    classify = args.task == "classification"
    raw = {"model": {"name": "minilm-l6" if classify else "smollm2-135m",
                     "task": "classification" if classify else "causal-lm"}}
    if classify and not args.labels and not any(o.startswith("data.labels") for o in args.set):
        raise ConfigError("fedtune data check: classification needs the federation's agreed labels: "
                          "--labels FILE (a JSON list of names) or --set data.labels='[\"a\", \"b\"]'")
    return config_from_dict(raw, "the command line", Path.cwd(), overrides)


def _toml_str(value: object) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _data_check(args: argparse.Namespace) -> int:
    from common.data.check import check_data

    cfg = _check_config(args)
    tokenizer = None
    if not args.no_tokens:
        from common.models.loading import load_tokenizer, model_spec

        tokenizer = load_tokenizer(model_spec(cfg))
    try:
        result = check_data(cfg, args.path, tokenizer)
    except DataError as exc:
        print(f"NOT TRAINABLE: {exc}", file=sys.stderr)
        return 1
    print(result.format())
    return 0 if result.trainable else 1


if __name__ == "__main__":
    sys.exit(main())
