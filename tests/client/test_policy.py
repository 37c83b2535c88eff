"""A site's local policy caps what any server plan can make it do, and says which limit was hit."""

from __future__ import annotations

import json

import pytest

from fedtune.client.policy import PolicyError, SitePolicy, load_policy
from fedtune.client.site import Site, SiteRefusal
from tests.client.test_site import _request, site  # noqa: F401  (fixture)


def _with_policy(site, **limits) -> Site:  # noqa: F811
    site.policy = SitePolicy(**limits, source="/etc/fedtune/policy.toml")
    return site


def _adapter(site):  # noqa: F811
    from fedtune.common.models.lora import adapter_state

    return adapter_state(site.model, ffa=False)


@pytest.mark.parametrize(
    ("limits", "plan", "reason"),
    [
        (
            {"max_epsilon": 2.0},
            {},
            "the plan asks for epsilon = 3; this site allows at most max_epsilon = 2 "
            r"\(local policy /etc/fedtune/policy.toml\)",
        ),
        ({"max_delta": 1e-4}, {}, "the plan asks for delta = 0.001; this site allows at most max_delta = 0.0001"),
        ({"require_dp": True}, {"dp": False}, "the plan turns differential privacy off; this site requires it"),
        ({"require_secure_aggregation": True}, {}, "the plan turns secure aggregation off; this site requires it"),
        ({"accepted_run_ids": ["run-7"]}, {}, "run 'run-1' is not in accepted_run_ids"),
        (
            {"min_noise_multiplier": 5.0},
            {},
            r"the plan needs noise multiplier \d\.\d{3}, below min_noise_multiplier = 5",
        ),
    ],
)
def test_a_plan_beyond_the_policy_is_refused_before_anything_is_spent(site, limits, plan, reason):  # noqa: F811
    _with_policy(site, **limits)
    with pytest.raises(SiteRefusal, match=reason):
        site.train(_request(1, **plan), _adapter(site))
    assert not site.ledger_path.exists(), "a refused plan spends no privacy"


def test_a_plan_within_the_policy_trains(site):  # noqa: F811
    _with_policy(
        site,
        max_epsilon=3.0,
        max_delta=1e-3,
        require_dp=True,
        require_secure_aggregation=True,
        min_noise_multiplier=0.3,
        accepted_run_ids=["run-1"],
    )
    outcome = site.train(_request(1, secure_aggregation=True), _adapter(site))
    assert outcome.noise_multiplier >= 0.3
    assert json.loads(site.ledger_path.read_text())["entries"][0]["round"] == 1


def test_policy_file_errors_name_the_file_and_field(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text("[policy]\nmax_epsilon = -1\nmin_aggregation_sites = 1\n")
    with pytest.raises(
        PolicyError,
        match=r"policy.toml: policy.max_epsilon: Input should be greater than 0; "
        r"policy.min_aggregation_sites: Input should be greater than or equal to 2",
    ):
        load_policy(path)
    path.write_text("[policy]\nmax_epsilonn = 4\n")
    with pytest.raises(PolicyError, match="policy.max_epsilonn: Extra inputs are not permitted"):
        load_policy(path)
    with pytest.raises(PolicyError, match="missing.toml: policy file not found"):
        load_policy(tmp_path / "missing.toml")
    path.write_text('[policy]\nmax_epsilon = 4.0\ndata_path = "data/notes.jsonl"\n')
    policy = load_policy(path)
    assert policy.max_epsilon == 4.0 and policy.data_path == tmp_path / "data" / "notes.jsonl"
