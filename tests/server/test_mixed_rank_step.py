"""The server's step with sites of lower rank training A: the new global adapter is re-factorised
by SVD (same weight updates, components ordered by singular value); under FFA-LoRA it is not."""

from __future__ import annotations

import numpy as np

from fedtune.common.config import load_config, preset_path
from fedtune.server.federation import FederationServer
from fedtune.server.strategies import build_strategy

A, B = "base.layer.lora_A.weight", "base.layer.lora_B.weight"


class StubModel:
    def __init__(self):
        self.state_seen: dict[str, np.ndarray] = {}

    def update(self, state):
        self.state_seen = dict(state)


def _server(ffa: bool) -> FederationServer:
    cfg = load_config(
        preset_path("banking77-minilm"), [f"lora.ffa={str(ffa).lower()}", "lora.rank=4", "lora.site_ranks=[4, 2, 1]"]
    )
    server = FederationServer.__new__(FederationServer)
    server.cfg, server.model = cfg, StubModel()
    server.strategy = build_strategy(cfg.federation)
    return server


def test_with_a_trained_the_step_leaves_the_adapter_in_svd_form_with_the_same_product():
    rng = np.random.default_rng(0)
    current = {A: rng.normal(size=(4, 12)).astype(np.float32), B: rng.normal(size=(10, 4)).astype(np.float32)}
    delta = {k: rng.normal(scale=0.1, size=v.shape).astype(np.float32) for k, v in current.items()}
    server = _server(ffa=False)
    server._step(current, delta, 1)
    new = server.model.state_seen
    expected = (current[B] + delta[B]).astype(np.float64) @ (current[A] + delta[A]).astype(np.float64)
    np.testing.assert_allclose(new[B].astype(np.float64) @ new[A].astype(np.float64), expected, atol=1e-4)
    a = new[A].astype(np.float64)
    np.testing.assert_allclose(a @ a.T, np.eye(4), atol=1e-4)  # orthonormal rows
    assert np.all(np.diff(np.linalg.norm(new[B], axis=0)) <= 1e-6)  # singular values in order


def test_under_ffa_the_step_is_the_strategys_alone():
    rng = np.random.default_rng(1)
    current = {B: rng.normal(size=(10, 4)).astype(np.float32)}
    delta = {B: rng.normal(scale=0.1, size=(10, 4)).astype(np.float32)}
    server = _server(ffa=True)
    server._step(current, delta, 1)
    np.testing.assert_allclose(server.model.state_seen[B], current[B] + delta[B], rtol=1e-6)
