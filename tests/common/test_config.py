"""Configuration is validated once, and every error names the field and what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtune.common.config import ConfigError, load_config, preset_path

BASE = """
[model]
name = "tiny-bert"
[data]
path = "{data}"
task = "classification"
labels = ["a", "b"]
"""


def _write(tmp_path: Path, extra: str = "", data: str | None = None) -> Path:
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\nhello,a\n")
    path = tmp_path / "fedtune.toml"
    path.write_text(BASE.format(data=data or csv) + extra)
    return path


def test_presets_load_and_resolve_paths_against_the_file():
    for name in ("banking77-minilm", "medquad-smollm2"):
        cfg = load_config(preset_path(name))
        assert cfg.data.path.is_absolute() and cfg.data.path.exists()


def test_relative_paths_resolve_against_the_toml_directory(tmp_path):
    (tmp_path / "d.csv").write_text("text,label\nhi,a\n")
    cfg = load_config(_write(tmp_path, data="d.csv"))
    assert cfg.data.path == (tmp_path / "d.csv").resolve()


def test_overrides_are_typed(tmp_path):
    cfg = load_config(_write(tmp_path), ["train.lr=0.01", "privacy.epsilon=3", "lora.ffa=true"])
    assert cfg.train.lr == 0.01 and cfg.privacy.epsilon == 3.0 and cfg.lora.ffa is True


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["privacy.epsilon=0"], "privacy.epsilon: Input should be greater than 0 (got 0)"),
        (["privacy.epsilon=-1"], "privacy.epsilon: Input should be greater than 0"),
        (["privacy.delta=1.5"], "privacy.delta: Input should be less than 1"),
        (["lora.rank=0"], "lora.rank: Input should be greater than 0"),
        (["train.lrr=0.1"], "train.lrr: unknown key"),
        (["modle.name='x'"], "modle: unknown key"),
        (["data.task='translation'"], "data.task: unknown task 'translation'; known tasks: classification, chat"),
        (["model.task='translation'"], "model.task = 'translation' is not 'classification' or 'causal-lm'"),
        (["federation.min_clients=9"], "federation.min_clients (9) exceeds partition.num_clients (3)"),
    ],
)
def test_impossible_values_fail_fast_naming_the_field(tmp_path, overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path), overrides)
    assert expected in str(err.value)
    assert str(tmp_path / "fedtune.toml") in str(err.value)


def test_missing_data_file_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.path: file not found: .*nope\.csv"):
        load_config(_write(tmp_path, data=str(tmp_path / "nope.csv")))


def test_missing_config_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_classification_requires_the_agreed_label_set(tmp_path):
    path = _write(tmp_path)
    path.write_text(path.read_text().replace('labels = ["a", "b"]\n', ""))
    with pytest.raises(ConfigError, match="classification needs the agreed label set"):
        load_config(path)


def test_delta_must_be_below_one_over_n_on_every_site(tmp_path):
    from fedtune.common.data.federation_data import SiteSplit
    from fedtune.common.data.shapes import Example
    from fedtune.simulation import check_privacy_feasible

    cfg = load_config(_write(tmp_path), ["privacy.delta=0.03"])
    sites = [SiteSplit(train=[Example("t", "a")] * 150, val=[]), SiteSplit(train=[Example("t", "a")] * 50, val=[])]
    with pytest.raises(ConfigError, match=r"privacy.delta = 0.03 must be below 1/n .* largest site has n = 150"):
        check_privacy_feasible(cfg, sites)
    # Below 1/50 but not below 1/150: the larger site would refuse every round.
    with pytest.raises(ConfigError, match=r"n = 150 training records, so use delta < 6.67e-03"):
        check_privacy_feasible(load_config(_write(tmp_path), ["privacy.delta=0.01"]), sites)
    check_privacy_feasible(load_config(_write(tmp_path), ["privacy.delta=0.001"]), sites)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["federation.aggregation_rule='krum'", "partition.num_clients=5"],
            "federation.aggregation_rule = 'krum' needs secure_aggregation.enabled = false",
        ),
        (
            ["federation.aggregation_rule='trimmed_mean'", "partition.num_clients=5"],
            "federation.aggregation_rule = 'trimmed_mean' needs secure_aggregation.enabled = false",
        ),
        (
            ["federation.aggregation_rule='krum'", "secure_aggregation.enabled=false", "federation.krum_byzantine=1"],
            "needs more than 4 sites (n > 2f + 2), partition.num_clients = 3",
        ),
        (
            ["federation.aggregation_rule='krum'", "secure_aggregation.enabled=false", "partition.num_clients=5"]
            + ["federation.krum_select=5"],
            "federation.krum_select = 5 exceeds partition.num_clients - federation.krum_byzantine = 4",
        ),
        (
            ["federation.aggregation_rule='trimmed_mean'", "secure_aggregation.enabled=false"]
            + ["federation.trim_fraction=0.2"],
            "federation.trim_fraction = 0.2 trims no update of partition.num_clients = 3",
        ),
        (["federation.trim_fraction=0.5"], "federation.trim_fraction: Input should be less than 0.5"),
        (["federation.aggregation_rule='median'"], "federation.aggregation_rule: Input should be 'mean'"),
    ],
)
def test_a_robust_rule_needs_secure_aggregation_off_and_enough_sites(tmp_path, overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path), overrides)
    assert expected in str(err.value)


def test_a_robust_rule_with_secure_aggregation_off_and_enough_sites_loads(tmp_path):
    off = ["secure_aggregation.enabled=false", "partition.num_clients=5"]
    cfg = load_config(_write(tmp_path), [*off, "federation.aggregation_rule='krum'", "federation.krum_select=4"])
    fed = cfg.federation
    assert (fed.aggregation_rule, fed.krum_byzantine, fed.krum_select) == ("krum", 1, 4)
    cfg = load_config(_write(tmp_path), [*off, "federation.aggregation_rule='trimmed_mean'"])
    assert cfg.federation.trim_fraction == 0.2  # 1 of 5 trimmed at each end
    assert load_config(_write(tmp_path)).federation.aggregation_rule == "mean"
