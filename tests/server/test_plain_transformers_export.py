"""The merged classifier loads with plain transformers and predicts exactly what fedtune's model predicts."""

from __future__ import annotations

import pytest
import torch

from tests.trained_runs import LABELS, build_run

TEXTS = [
    "my card has not arrived yet",
    "what exchange rate do you use for euros?",
    "the refund is still not on my statement after two weeks, please help",
    "hi",
]


def _fedtune_predictions(trained):
    """The global model as the server evaluated it: base + adapter, fedtune's pooling hook."""
    tokenizer = trained.model.tokenizer
    batch = tokenizer(TEXTS, padding=True, truncation=True, max_length=32, return_tensors="pt")
    model = trained.model.model.eval()
    with torch.no_grad():
        return torch.softmax(model(**batch).logits.float(), dim=-1)


@pytest.mark.parametrize("pooling", ["auto", "model"])  # tiny-bert: auto is mean pooling; model: BERT's own pooler
def test_pipeline_gives_fedtune_s_predictions_with_label_names(tmp_path, pooling):
    from transformers import pipeline

    trained = build_run(tmp_path, pooling=pooling)
    merged = trained.run_dir / "merged"
    expected = _fedtune_predictions(trained)
    shipped = (merged / "modeling_fedtune.py").exists()
    assert shipped == (pooling == "auto")
    classify = pipeline("text-classification", model=str(merged), trust_remote_code=shipped, top_k=None)
    if shipped:  # the code that ran is the file in the directory, not fedtune's
        assert type(classify.model).__module__.startswith("transformers_modules")
    got = classify(TEXTS, truncation=True, max_length=32)
    for row, want in zip(got, expected, strict=True):
        scores = {d["label"]: d["score"] for d in row}
        assert set(scores) == set(LABELS)
        probs = torch.tensor([scores[label] for label in LABELS])
        assert int(probs.argmax()) == int(want.argmax())
        torch.testing.assert_close(probs, want, rtol=1e-4, atol=1e-5)
    assert len({int(w.argmax()) for w in expected}) > 1 or expected.std() > 0.01  # the adapter does something


def test_plain_loading_without_trust_remote_code_fails_instead_of_dropping_the_pooling(tmp_path):
    """In a fresh interpreter, as a user of plain transformers (this process has registered fedtune's classes)."""
    import subprocess
    import sys

    merged = build_run(tmp_path).run_dir / "merged"
    load = f"from transformers import AutoModelForSequenceClassification as A; A.from_pretrained({str(merged)!r})"
    done = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert done.returncode != 0 and "trust_remote_code=True" in done.stderr, done.stderr[-2000:]
