"""A site's own ceilings, read from a file the site controls; the server's plan can only be narrower.

The server proposes a plan (epsilon, delta, noise via the site's own calibration, secure
aggregation on or off, run id); a site checks it against its policy before any training
and refuses, saying which limit was hit. Nothing the server sends can widen a policy: it
is loaded from the site's disk, never from a message.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedtune.client.membership import Membership, MembershipError, load_membership
from fedtune.common.toml_files import read_toml


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names the file and field."""


class PolicyViolation(RuntimeError):
    """A server request beyond this site's policy; ``str()`` is sent back as the refusal."""


class SitePolicy(BaseModel):
    """Limits a site sets for itself. The defaults impose nothing beyond the protocol's own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_epsilon: float | None = Field(None, gt=0)
    max_delta: float | None = Field(None, gt=0, lt=1)
    min_noise_multiplier: float = Field(0.0, ge=0)
    min_site_noise_multiplier: float = Field(
        0.0,
        ge=0,
        description="Above 0: refuse plans without site-level DP by distributed noise of at least this "
        "noise multiplier (privacy.site_level.noise_multiplier).",
    )
    require_dp: bool = False
    require_secure_aggregation: bool = False
    min_aggregation_sites: int = Field(2, ge=2)
    accepted_run_ids: list[str] = Field(default_factory=list)
    allow_site_metrics: bool = True
    data_path: Path | None = None
    lora_rank: int = Field(
        0,
        ge=0,
        description="LoRA rank this site trains at, from its compute (0: the federation's lora.rank). Above "
        "lora.rank it trains at lora.rank; below, only the global adapter's first lora_rank components.",
    )
    secure_noise: bool = Field(
        False,
        description="Draw DP-SGD noise with Opacus' secure_mode (each value a sum of four Gaussian draws), "
        "which closes floating-point attacks on the noise; `fedtune deploy init` turns it on.",
    )
    roster: Path | None = Field(
        None,
        description="The federation's roster this site pins (common.roster); with it, the site signs its "
        "secure-aggregation keys and accepts only keys that roster members signed.",
    )
    roster_fingerprint: str = Field(
        "",
        description="The roster's fingerprint, as compared with the other members out of band; a roster "
        "file with another fingerprint is refused. Required with roster.",
    )
    identity_key: Path | None = Field(
        None, description="This site's identity key, made on this machine by `fedtune site init`. Required with roster."
    )
    source: str = "default policy"

    @model_validator(mode="after")
    def _membership_complete(self) -> SitePolicy:
        given = [self.roster is not None, bool(self.roster_fingerprint), self.identity_key is not None]
        if any(given) and not all(given):
            raise ValueError("roster, roster_fingerprint and identity_key go together: set all three or none")
        return self

    def check_plan(self, run_id: str, dp: bool, epsilon: float, delta: float, secure_aggregation: bool) -> None:
        """Refuse a plan that this site's policy does not allow (before anything is trained or spent)."""
        where = f"(local policy {self.source})"
        if self.accepted_run_ids and run_id not in self.accepted_run_ids:
            raise PolicyViolation(f"run {run_id!r} is not in accepted_run_ids {where}")
        if self.require_dp and not dp:
            raise PolicyViolation(f"the plan turns differential privacy off; this site requires it {where}")
        if self.require_secure_aggregation and not secure_aggregation:
            raise PolicyViolation(f"the plan turns secure aggregation off; this site requires it {where}")
        if dp and self.max_epsilon is not None and epsilon > self.max_epsilon:
            raise PolicyViolation(
                f"the plan asks for epsilon = {epsilon:g}; this site allows at most "
                f"max_epsilon = {self.max_epsilon:g} {where}"
            )
        if dp and self.max_delta is not None and delta > self.max_delta:
            raise PolicyViolation(
                f"the plan asks for delta = {delta:g}; this site allows at most max_delta = {self.max_delta:g} {where}"
            )

    def check_noise(self, noise_multiplier: float) -> None:
        if noise_multiplier < self.min_noise_multiplier:
            raise PolicyViolation(
                f"the plan needs noise multiplier {noise_multiplier:.3f}, below min_noise_multiplier = "
                f"{self.min_noise_multiplier:g} (local policy {self.source}); ask for a smaller epsilon or fewer steps"
            )

    def check_site_level(self, noise: str, noise_multiplier: float) -> None:
        """With ``min_site_noise_multiplier`` set, refuse a plan without site-level DP by distributed noise
        (``noise``: the plan's site_noise) of at least that multiplier: server-added noise protects the
        site from whoever sees the model, not from the operator."""
        if self.min_site_noise_multiplier <= 0:
            return
        if noise != "distributed" or noise_multiplier < self.min_site_noise_multiplier:
            raise PolicyViolation(
                f"the plan's site-level DP is noise = {noise!r} with multiplier {noise_multiplier:g}; this site "
                f"requires distributed noise with at least min_site_noise_multiplier = "
                f"{self.min_site_noise_multiplier:g} (local policy {self.source})"
            )


def load_policy(path: Path) -> SitePolicy:
    """The ``[policy]`` table of a TOML file; relative ``data_path`` is taken from the file's folder."""
    path = Path(path)
    raw = read_toml(path, PolicyError, "policy file")
    table = raw.get("policy")
    if not isinstance(table, dict):
        raise PolicyError(f"{path}: expected a [policy] table")
    for key in ("data_path", "roster", "identity_key"):
        if isinstance(table.get(key), str) and not Path(table[key]).is_absolute():
            table[key] = str((path.parent / table[key]).resolve())
    try:
        return SitePolicy(**table, source=str(path))
    except ValidationError as exc:
        problems = "; ".join(
            f"policy.{'.'.join(map(str, e['loc']))}: {e['msg']}" if e["loc"] else f"policy: {e['msg']}"
            for e in exc.errors()
        )
        raise PolicyError(f"{path}: {problems}") from exc


def policy_membership(policy: SitePolicy) -> Membership | None:
    """The roster and identity the policy names, loaded and checked (None when it names none)."""
    if policy.roster is None or policy.identity_key is None:
        return None
    try:
        return load_membership(policy.roster, policy.identity_key, policy.roster_fingerprint)
    except MembershipError as exc:
        raise PolicyError(f"{policy.source}: {exc}") from exc
