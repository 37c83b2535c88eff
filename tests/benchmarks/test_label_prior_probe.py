"""The label-prior probe trains from the very head the product builds under model.head_init = 'label_names'."""

from __future__ import annotations

import numpy as np

from tests.benchmarks.scripts import load_benchmark_script
from tests.conftest import REPO

probe = load_benchmark_script("label_prior_probe")


def test_the_probes_prior_is_the_head_a_run_starts_from_at_the_asked_norm():
    """The probe's weights equal the head of the adapter a server builds under model.head_init = 'label_names'."""
    import dataclasses

    from fedtune.common.config import load_config, preset_path
    from fedtune.common.models.loading import model_spec
    from fedtune.common.models.lora import build_adapted_model

    samples = REPO / "common/data/samples/banking77"
    weights = probe.label_prior_weights(2.0, 3, 50, samples)
    cfg = load_config(preset_path("banking77-minilm"), ["model.head_init='label_names'", "model.head_init_scale=2.0"])
    model, _ = build_adapted_model(model_spec(cfg), cfg.lora)
    head = model.base_model.model.classifier.modules_to_save["default"]
    np.testing.assert_allclose(weights[:, :-1], head.weight.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert not weights[:, -1].any() and weights.shape[0] == 77  # bias 0; Banking77's agreed labels
    random_head = build_adapted_model(dataclasses.replace(model_spec(cfg), head_init="random"), cfg.lora)[0]
    assert not np.allclose(weights[:, :-1], random_head.base_model.model.classifier.weight.detach().numpy())


def test_the_plot_has_a_bar_for_every_cell_and_budget(tmp_path):
    rows = [
        {"epsilon": e, "prior_norm": n, "lr": lr, "accuracy": [0.5, 0.6]}
        for e in (1.0, None)
        for n, lr in ((None, 30.0), (3.0, 20.0))
    ]
    probe.plot(rows, 0.6, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
