"""From a configured data set to sites: real samples, natural federations, clear data errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import load_config, preset_path
from common.data.federation_data import build_site_splits
from common.data.readers import DataError, read_raw

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def test_banking77_preset_gives_disjoint_skewed_sites_and_a_separate_test_set():
    cfg = load_config(preset_path("banking77-minilm"))
    sites, test = build_site_splits(cfg)
    assert len(sites) == 3 and len(test) == cfg.data.max_eval_examples
    texts = [{(e.text, e.target) for e in s.train + s.val} for s in sites]
    assert not (texts[0] & texts[1]) and not (texts[1] & texts[2])
    assert sum(len(s.train) + len(s.val) for s in sites) == len(read_raw(cfg.data.path)[0])  # the sample has no duplicates


@pytest.mark.skipif(not (SHARED / "medquad" / "medquad.jsonl").exists(), reason="shared data not on this machine")
def test_full_medquad_split_by_source_is_nine_hospitals(tmp_path):
    toml = tmp_path / "m.toml"
    toml.write_text(f"""
[model]
name = "tiny-llama"
task = "causal-lm"
[data]
path = "{SHARED / 'medquad' / 'medquad.jsonl'}"
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


def test_data_errors_name_file_line_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{"question": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: invalid JSON"):
        read_records(bad)
    with pytest.raises(DataError, match="file not found"):
        read_records(tmp_path / "absent.csv")
    csv = tmp_path / "d.csv"
    csv.write_text("text,category\nhello,not_a_label\n")
    toml = tmp_path / "c.toml"
    toml.write_text(f"""
[model]
name = "tiny-bert"
[data]
path = "{csv}"
labels = ["card_arrival"]
label_field = "category"
""")
    with pytest.raises(DataError, match=r"d.csv, record 1: label 'not_a_label' is not in the agreed label set"):
        build_site_splits(load_config(toml))
    toml.write_text(toml.read_text().replace('label_field = "category"', 'label_field = "intent"'))
    with pytest.raises(DataError, match=r"record 1: missing field 'intent'"):
        build_site_splits(load_config(toml))
