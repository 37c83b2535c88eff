"""``fedtune plan``: each site's noise multiplier, epsilon after each round, steps and batch, before anything runs.

The site sizes come from the partition a simulation would make (or each site's own files, or
``--records`` where the operator cannot read them); the arithmetic is ``common.privacy.planning``.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from dataclasses import asdict

from fedtune.cli.config_options import add_config_options, config_from_args
from fedtune.cli.exit_codes import ExitCode
from fedtune.common.config import ConfigError, FedtuneConfig
from fedtune.common.privacy.planning import PrivacyPlan, plan_privacy

WIDTH = 100


def register(sub: argparse._SubParsersAction) -> None:
    plan = sub.add_parser(
        "plan",
        help="print each site's noise multiplier and epsilon round by round, and settings that waste the budget",
        description="Computes what each site will do under the config, before anything runs: its training records, "
        "expected batch and sample rate, the noise multiplier it will calibrate, epsilon after each round (what its "
        "ledger will say), site-level epsilon when privacy.site_level is on, and warnings where the settings are "
        "known to waste the budget. Exit status 1 when a site would refuse to train.",
    )
    add_config_options(plan)
    plan.add_argument(
        "--records",
        type=int,
        nargs="+",
        metavar="N",
        help="each site's training records, site-0 first (a deployment, where the sites' data cannot be read "
        "here); default: the partition a simulation would make, or each site's data.site_paths",
    )
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(run=run)


def site_records(cfg: FedtuneConfig) -> list[int]:
    """Each site's training records: its own files (partition.scheme = 'files') or its share of data.path."""
    from fedtune.common.data.federation_data import build_site_splits, load_site_files

    if cfg.partition.scheme == "files":
        return [len(load_site_files(cfg, i).train) for i in range(cfg.partition.num_clients)]
    return [len(site.train) for site in build_site_splits(cfg)[0]]


def run(args: argparse.Namespace) -> ExitCode:
    from fedtune.server.site_sampling import SiteSampling

    cfg = config_from_args(args)
    if args.records is not None and any(n <= 0 for n in args.records):
        raise ConfigError(f"--records {' '.join(map(str, args.records))}: every site needs at least one record")
    records = args.records if args.records is not None else site_records(cfg)
    sampling = SiteSampling.from_config(cfg.federation)
    plan = plan_privacy(cfg, records, sampling.rate(cfg.partition.num_clients), sampling.accountant_rate)
    print(plan_json(plan) if args.json else render_plan(plan, cfg))
    return ExitCode.FAILED if any(w.severity == "error" for w in plan.warnings) else ExitCode.OK


def plan_json(plan: PrivacyPlan) -> str:
    """The plan as JSON, with each site's derived figures (noise on the mean, passes) spelled out."""
    out = asdict(plan)
    for site, raw in zip(plan.sites, out["sites"], strict=True):
        raw |= {"noise_on_mean": site.noise_on_mean, "passes": site.passes}
    return json.dumps(out, indent=2)


def _fmt(value: float) -> str:
    return f"{value:.3f}" if 0.001 <= value < 1000 else f"{value:.3g}"


def render_plan(plan: PrivacyPlan, cfg: FedtuneConfig) -> str:
    """The plan as a person reads it: a line of settings, a row a site, a row a round, then the findings."""
    t = cfg.train
    privacy = (
        f"DP-SGD at epsilon {plan.epsilon:g}, delta {plan.delta:g} a site ({plan.accountant} accountant)"
        if plan.dp
        else "no DP"
    )
    lines = [
        f"{len(plan.sites)} sites, {plan.rounds} rounds x {plan.local_steps} local steps, {privacy}",
        f"optimizer {plan.optimizer}, lr {t.lr:g} ({t.lr_schedule}), batch_size {t.batch_size}, "
        f"max_grad_norm {cfg.privacy.max_grad_norm:g}",
        "",
        f"{'site':<10}{'records':>8}{'batch':>7}{'q':>9}{'steps':>7}{'noise':>8}{'noise/B':>9}{'passes':>8}"
        f"{'epsilon':>9}",
    ]
    for s in plan.sites:
        if s.problem:
            lines.append(f"{s.site:<10}{s.records:>8}  refuses: {s.problem}")
            continue
        eps = _fmt(s.final_epsilon) if plan.dp else "-"
        lines.append(
            f"{s.site:<10}{s.records:>8}{s.expected_batch:>7}{s.sample_rate:>9.4f}{s.total_steps:>7}"
            f"{s.noise_multiplier:>8.3f}{s.noise_on_mean:>9.4f}{s.passes:>8.1f}{eps:>9}"
        )
    lines += [
        "",
        "batch: expected records a step (Poisson sampling at rate q = batch / records); noise: the multiplier",
        "the site will calibrate; noise/B: std of the noise on a step's mean gradient per coordinate, in clip",
        "norms (the clipped signal's whole norm is at most one clip norm, over every trained coordinate);",
        "passes: expected uses of each record over the run.",
    ]
    level = plan.site_level
    trained = [s for s in plan.sites if not s.problem]
    if plan.dp and trained or level is not None:
        head = f"{'round':>5}{'lr':>10}" + "".join(f"{s.site:>9}" for s in trained if plan.dp)
        if level is not None:
            head += f"{'site-level':>12}{'(no samp.)':>12}"
        lines += ["", "epsilon after each round (what each site's ledger will say):", head]
        eps_columns = [dict(s.epsilon_by_round) for s in trained] if plan.dp else []
        level_eps = dict(level.epsilon_by_round) if level else {}
        level_all = dict(level.epsilon_without_sampling_by_round) if level else {}
        for r, lr in plan.lr_by_round:
            row = f"{r:>5}{lr:>10.3g}" + "".join(f"{_fmt(col[r]):>9}" for col in eps_columns)
            if level is not None:
                row += f"{_fmt(level_eps[r]):>12}{_fmt(level_all[r]):>12}"
            lines.append(row)
        if level is not None:
            lines.append(
                f"site-level DP: z = {level.noise_multiplier:g}, delta {level.delta:g}, site sampling rate "
                f"{level.sampling_rate:.3g} (the no-sampling column holds whoever picks the sites)"
            )
    if plan.warnings:
        lines += ["", "findings:"]
        for w in plan.warnings:
            lines += textwrap.wrap(f"{w.severity} [{w.code}]: {w.message}", WIDTH, subsequent_indent="    ")
    else:
        lines += ["", "findings: none"]
    return "\n".join(lines)
