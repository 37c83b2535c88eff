"""The label-prior probe trains from the very head the product builds under model.head_init = 'label_names'."""

from __future__ import annotations

import numpy as np

from tests.benchmarks.scripts import load_benchmark_script
from tests.conftest import REPO

probe = load_benchmark_script("label_prior_probe")


def test_the_probes_prior_is_the_products_head_at_the_asked_norm(monkeypatch, tmp_path):
    import fedtune.common.models.label_prior as label_prior

    seen = {}
    real = label_prior.install_label_prior

    def recording(model, tokenizer, labels, scale, max_length):
        real(model, tokenizer, labels, scale, max_length)
        seen["head"] = model.classifier.weight.detach().numpy().copy()

    monkeypatch.setattr(label_prior, "install_label_prior", recording)
    weights = probe.label_prior_weights(2.0, 3, 50, REPO / "common/data/samples/banking77")
    np.testing.assert_array_equal(weights[:, :-1], seen["head"])
    assert not weights[:, -1].any()  # bias 0
    np.testing.assert_allclose(np.linalg.norm(weights[:, :-1], axis=1), 2.0, rtol=1e-6)
    assert weights.shape[0] == 77  # Banking77's agreed labels


def test_the_plot_has_a_bar_for_every_cell_and_budget(tmp_path):
    rows = [
        {"epsilon": e, "prior_norm": n, "lr": lr, "accuracy": [0.5, 0.6]}
        for e in (1.0, None)
        for n, lr in ((None, 30.0), (3.0, 20.0))
    ]
    probe.plot(rows, 0.6, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
