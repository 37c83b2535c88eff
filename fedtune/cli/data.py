"""``fedtune data check``: can a site train on these files? Answered locally, nothing is sent."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fedtune.cli.config_options import add_config_options
from fedtune.cli.exit_codes import ExitCode
from fedtune.common.config import ConfigError, FedtuneConfig, config_from_dict, load_config, preset_path
from fedtune.common.data.readers import DataError, DataUsageError
from fedtune.common.tasks.registry import TASK_NAMES, task_for


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="site data tools").add_subparsers(dest="data_command", required=True)
    check = data.add_parser(
        "check",
        help="validate a site's data before training: counts, labels, token lengths, malformed records",
        description="Reads PATH (a file or folder) exactly as a site would at start-up and prints a summary. "
        "Exit status: 0 trainable, 1 not trainable, 2 bad usage or config. Nothing is sent anywhere.",
    )
    check.add_argument("path", type=Path, help="data file (.jsonl, .json, .csv, .tsv, .parquet) or folder")
    check.add_argument(
        "--task", choices=TASK_NAMES, help="the task, named by the record shape (default: the config's data.task)"
    )
    add_config_options(
        check,
        config_help="take field mapping, labels, model and privacy from this TOML",
        preset_help="take them from a built-in config",
        set_help="e.g. data.fields.label=category, data.delimiter=';'",
    )
    check.add_argument("--labels", type=Path, help="JSON list of the agreed label names (classification)")
    check.add_argument("--model", help="tokenizer for token lengths: built-in name or local model directory")
    check.add_argument("--no-tokens", action="store_true", help="skip tokenisation (no length histogram)")
    check.set_defaults(run=run)


def _check_config(args: argparse.Namespace) -> FedtuneConfig:
    """The config a data check validates against: a given one with PATH and --task swapped in, or a minimal one."""
    path = args.path.expanduser().resolve()
    overrides = [f"data.path={_toml_str(path)}", *args.set]
    if args.task:
        overrides.append(f"data.task={_toml_str(args.task)}")
    if args.labels:
        overrides.append(f"data.labels_file={_toml_str(args.labels.expanduser().resolve())}")
    if args.model:  # a path (even one that does not exist) is a directory to check, not a built-in name
        is_path = "/" in args.model or os.sep in args.model or args.model.startswith((".", "~"))
        if is_path or Path(args.model).exists():
            overrides.append(f"model.path={_toml_str(Path(args.model).expanduser().resolve())}")
        else:
            overrides.append(f"model.name={_toml_str(args.model)}")
    if args.config or args.preset:
        return load_config(args.config or preset_path(args.preset), overrides + ['partition.scheme="iid"'])
    if not args.task:
        raise ConfigError("fedtune data check: give --task (one of " + ", ".join(TASK_NAMES) + ") or --config")
    classify = task_for(args.task).classifies
    raw = {"model": {"name": "minilm-l6" if classify else "smollm2-135m"}}
    if classify and not args.labels and not any(o.startswith("data.labels") for o in args.set):
        raise ConfigError(
            "fedtune data check: classification needs the federation's agreed labels: "
            '--labels FILE (a JSON list of names) or --set data.labels=\'["a", "b"]\''
        )
    return config_from_dict(raw, "the command line", Path.cwd(), overrides)


def _toml_str(value: object) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def run(args: argparse.Namespace) -> ExitCode:
    from fedtune.common.data.check import check_data

    cfg = _check_config(args)
    tokenizer = None
    if not args.no_tokens:  # the model is checked before any data is read
        from fedtune.common.models.loading import load_tokenizer
        from fedtune.common.models.lora import checked_model_spec

        tokenizer = load_tokenizer(checked_model_spec(cfg))
    try:
        result = check_data(cfg, args.path, tokenizer)
    except DataUsageError:
        raise  # the settings do not fit the file: a usage error (exit 2), said as one line
    except DataError as exc:
        print(f"NOT TRAINABLE: {exc}", file=sys.stderr)
        return ExitCode.FAILED
    print(result.format())
    return ExitCode.OK if result.trainable else ExitCode.FAILED
