"""From a configured data set to sites: real samples, natural federations, clear data errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtune.common.config import load_config, preset_path
from fedtune.common.data.federation_data import build_site_splits
from fedtune.common.data.readers import DataError, read_raw

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def test_banking77_preset_gives_disjoint_skewed_sites_and_a_separate_test_set():
    cfg = load_config(preset_path("banking77-minilm"))
    sites, test = build_site_splits(cfg)
    assert len(sites) == 3 and len(test) == cfg.data.max_eval_examples
    texts = [{(e.text, e.target) for e in s.train + s.val} for s in sites]
    assert not (texts[0] & texts[1]) and not (texts[1] & texts[2])
    assert sum(len(s.train) + len(s.val) for s in sites) == len(
        read_raw(cfg.data.path)[0]
    )  # the sample has no duplicates


@pytest.mark.skipif(not (SHARED / "medquad" / "medquad.jsonl").exists(), reason="shared data not on this machine")
def test_full_medquad_split_by_source_is_nine_hospitals(tmp_path):
    toml = tmp_path / "m.toml"
    toml.write_text(f"""
[model]
name = "tiny-llama"
[data]
path = "{SHARED / "medquad" / "medquad.jsonl"}"
task = "question-answer"
[partition]
scheme = "column"
column = "source"
num_clients = 9
""")
    sites, test = build_site_splits(load_config(toml))
    sources = [{e.group for e in s.train} for s in sites]
    assert all(len(s) == 1 for s in sources)
    assert sorted(next(iter(s)) for s in sources) == sorted(
        ["CDC", "CancerGov", "GARD", "GHR", "MPlusHealthTopics", "NHLBI", "NIDDK", "NIHSeniorHealth", "NINDS"]
    )
    assert len(test) == 256


def test_config_errors_reach_the_site_loader_with_file_line_and_field(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("text,category\nhello,not_a_label\nmy card is late,card_arrival\n")  # one label agreed
    toml = tmp_path / "c.toml"
    toml.write_text(f"""
[model]
name = "tiny-bert"
[data]
path = "{csv}"
labels = ["card_arrival"]
[data.fields]
label = "category"
""")
    with pytest.raises(DataError, match=r"d.csv, line 2, field 'category': label 'not_a_label' is not in the agreed"):
        build_site_splits(load_config(toml))
    toml.write_text(toml.read_text().replace('label = "category"', 'label = "intent"'))
    with pytest.raises(DataError, match=r"d.csv, line 1: no column 'intent' in the header; columns: text, category"):
        build_site_splits(load_config(toml))


def test_files_scheme_gives_each_site_its_own_files_and_the_server_its_own_test_set(tmp_path):
    from fedtune.common.config import ConfigError
    from fedtune.common.data.federation_data import load_site_files, server_test_set

    a, b, test = tmp_path / "a.jsonl", tmp_path / "b.csv", tmp_path / "test.jsonl"
    a.write_text("".join(f'{{"question": "qa{i}", "answer": "a"}}\n' for i in range(20)))
    b.write_text("question,answer\n" + "".join(f"qb{i},b\n" for i in range(10)))
    test.write_text('{"question": "t", "answer": "t"}\n')
    body = f"""
[model]
name = "tiny-llama"
[data]
task = "question-answer"
site_paths = ["{a}", "{b}"]
test_path = "{test}"
val_fraction = 0.2
[partition]
scheme = "files"
num_clients = 2
"""
    (tmp_path / "f.toml").write_text(body)
    cfg = load_config(tmp_path / "f.toml")
    site0, site1 = load_site_files(cfg, 0), load_site_files(cfg, 1)
    assert (len(site0.train), len(site0.val), len(site1.train), len(site1.val)) == (16, 4, 8, 2)
    assert {e.text for e in site1.train + site1.val} == {f"qb{i}" for i in range(10)}
    assert [e.text for e in server_test_set(cfg)] == ["t"]
    (tmp_path / "g.toml").write_text(body.replace("num_clients = 2", "num_clients = 3"))
    with pytest.raises(
        ConfigError, match="needs one data.site_paths entry per site: got 2 for partition.num_clients = 3"
    ):
        load_config(tmp_path / "g.toml")
    legacy = body.replace('name = "tiny-llama"', 'name = "tiny-llama"\ntask = "classification"')  # model.task
    (tmp_path / "h.toml").write_text(legacy)
    with pytest.raises(ConfigError, match="data.task = 'question-answer' does not fit model.task = 'classification'"):
        load_config(tmp_path / "h.toml", ["data.labels=['x']"])
