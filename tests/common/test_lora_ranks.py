"""Mixed LoRA ranks: truncation and zero padding, exactness under FFA-LoRA, the SVD step's error, the
peft layer resize, and the config that sets it all (lora.site_ranks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedtune.common.config import ConfigError, LoraSettings, load_config
from fedtune.common.models.lora_ranks import (
    adapter_rank,
    effective_rank,
    embed_adapter,
    refactorise_adapter,
    svd_refactorise,
    truncate_adapter,
    truncation_error,
)
from tests.conftest import SAMPLES

A_KEY, B_KEY, HEAD = "m.q.lora_A.weight", "m.q.lora_B.weight", "score.weight"
M, N, R_MAX = 12, 10, 4


def _global(rng: np.random.Generator, m: int = M, n: int = N, r: int = R_MAX) -> dict[str, np.ndarray]:
    return {
        A_KEY: rng.normal(size=(r, n)).astype(np.float32),
        B_KEY: rng.normal(size=(m, r)).astype(np.float32),
        HEAD: rng.normal(size=(3, n)).astype(np.float32),
    }


def test_truncation_keeps_the_first_components_and_embedding_restores_the_global_shapes():
    g = _global(np.random.default_rng(0))
    t = truncate_adapter(g, 2)
    assert t[A_KEY].shape == (2, N) and t[B_KEY].shape == (M, 2) and t[HEAD].shape == (3, N)
    np.testing.assert_array_equal(t[A_KEY], g[A_KEY][:2])
    np.testing.assert_array_equal(t[B_KEY], g[B_KEY][:, :2])
    assert adapter_rank(t) == 2 and adapter_rank(g) == R_MAX
    back = embed_adapter(t, g)
    assert all(np.array_equal(back[k], g[k]) for k in g)


def test_a_sites_update_is_zero_in_the_components_it_does_not_train():
    rng = np.random.default_rng(1)
    g = _global(rng)
    trained = {k: v + rng.normal(size=v.shape).astype(np.float32) for k, v in truncate_adapter(g, 1).items()}
    update = {k: v - g[k] for k, v in embed_adapter(trained, g).items()}
    assert np.all(update[A_KEY][1:] == 0) and np.all(update[A_KEY][:1] != 0)
    assert np.all(update[B_KEY][:, 1:] == 0) and np.all(update[B_KEY][:, :1] != 0)
    assert np.all(update[HEAD] != 0)  # the head is trained whole at every rank


def test_embedding_refuses_tensors_that_do_not_fit():
    g = _global(np.random.default_rng(2))
    with pytest.raises(ValueError, match="missing"):
        embed_adapter({k: v for k, v in g.items() if k != HEAD}, g)
    too_big = truncate_adapter(_global(np.random.default_rng(3), r=R_MAX + 1), R_MAX + 1)
    with pytest.raises(ValueError, match=r"lora_A.weight: site tensor of shape \(5, 10\)"):
        embed_adapter(too_big, g)


def test_site_rank_is_the_servers_maximum_at_most():
    assert effective_rank(0, 8) == 8 and effective_rank(3, 8) == 3 and effective_rank(16, 8) == 8
    with pytest.raises(ValueError, match="negative"):
        effective_rank(-1, 8)


def test_under_ffa_the_mean_of_padded_b_updates_is_exactly_the_mean_weight_update():
    """A frozen and shared: mean_i(pad(dB_i))·A = mean_i(dB_i·A[:r_i]), weighted or not."""
    rng = np.random.default_rng(4)
    a = rng.normal(size=(R_MAX, N))  # the shared frozen A (never sent under FFA)
    b_global = rng.normal(size=(M, R_MAX))  # non-zero, so a padding of zeros instead of the global would show
    ranks, weights = [4, 2, 1], np.array([30.0, 50.0, 20.0])
    sent, true_delta_w = [], []
    for r in ranks:
        b_site = b_global[:, :r] + rng.normal(size=(M, r))  # what the site trained, at its rank
        true_delta_w.append((b_site - b_global[:, :r]) @ a[:r])
        padded = embed_adapter({B_KEY: b_site}, {B_KEY: b_global})[B_KEY]
        sent.append(padded - b_global)  # the update a site sends (masked, under secure aggregation)
    mean_update = np.tensordot(weights / weights.sum(), np.stack(sent), axes=1)
    expected = np.tensordot(weights / weights.sum(), np.stack(true_delta_w), axes=1)
    np.testing.assert_allclose(mean_update @ a, expected, atol=1e-12)


def test_without_ffa_averaging_padded_factors_is_not_the_mean_weight_update():
    """Why the SVD step exists: with A trained, the mean of factors is not the mean of products."""
    rng = np.random.default_rng(5)
    g = {A_KEY: rng.normal(size=(R_MAX, N)), B_KEY: rng.normal(size=(M, R_MAX))}
    sites = []
    for r in (4, 2):
        trained = {k: v + 0.5 * rng.normal(size=v.shape) for k, v in truncate_adapter(g, r).items()}
        sites.append(embed_adapter(trained, g))
    mean = {k: np.mean([s[k] for s in sites], axis=0) for k in g}
    product_of_means = mean[B_KEY] @ mean[A_KEY]
    mean_of_products = np.mean([s[B_KEY] @ s[A_KEY] for s in sites], axis=0)
    assert np.linalg.norm(product_of_means - mean_of_products) > 0.1


@pytest.mark.parametrize(("m", "n", "r"), [(12, 10, 4), (3, 10, 5), (12, 2, 4)])
def test_svd_refactorisation_keeps_the_weight_update_and_orders_components(m, n, r):
    rng = np.random.default_rng(6)
    b, a = rng.normal(size=(m, r)).astype(np.float32), rng.normal(size=(r, n)).astype(np.float32)
    new_b, new_a, sigma = svd_refactorise(b, a)
    assert new_b.shape == b.shape and new_a.shape == a.shape and new_b.dtype == np.float32
    np.testing.assert_allclose(new_b @ new_a, b @ a, rtol=1e-4, atol=1e-4)
    assert np.all(np.diff(sigma) <= 1e-6) and sigma.shape == (r,)
    k = min(m, n, r)
    np.testing.assert_allclose(new_a[:k] @ new_a[:k].T, np.eye(k), atol=1e-5)  # A keeps unit, orthogonal rows
    np.testing.assert_allclose(sigma[:k], np.linalg.svd(b.astype(np.float64) @ a)[1][:k], rtol=1e-5)


def test_the_svd_ordered_truncation_error_is_the_singular_value_tail_and_beats_plain_truncation():
    rng = np.random.default_rng(7)
    b, a = rng.normal(size=(M, R_MAX)), rng.normal(size=(R_MAX, N))
    delta_w = b @ a
    new_b, new_a, sigma = svd_refactorise(b, a)
    for r in range(1, R_MAX + 1):
        svd_error = np.linalg.norm(delta_w - new_b[:, :r] @ new_a[:r])
        plain_error = np.linalg.norm(delta_w - b[:, :r] @ a[:r])
        assert svd_error == pytest.approx(truncation_error(sigma, r), abs=1e-9)
        assert svd_error <= plain_error + 1e-9
    assert truncation_error(sigma, R_MAX) == 0.0
    assert np.linalg.norm(delta_w - new_b[:, :1] @ new_a[:1]) < np.linalg.norm(delta_w - b[:, :1] @ a[:1])


def test_a_component_of_singular_value_zero_stays_trainable():
    """Zero in B, a unit row in A: LoRA's own starting point, so B's gradient there is not zero."""
    rng = np.random.default_rng(8)
    b, a = rng.normal(size=(M, R_MAX)), rng.normal(size=(R_MAX, N))
    b[:, 2:] = 0.0  # no site of rank > 2 yet
    new_b, new_a, sigma = svd_refactorise(b, a)
    assert sigma[2:] == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_allclose(new_b[:, 2:], 0.0, atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(new_a, axis=1), 1.0, atol=1e-9)


def test_refactorising_an_adapter_touches_each_lora_pair_only():
    g = _global(np.random.default_rng(9))
    out = refactorise_adapter(g)
    np.testing.assert_array_equal(out[HEAD], g[HEAD])
    np.testing.assert_allclose(out[B_KEY] @ out[A_KEY], g[B_KEY] @ g[A_KEY], rtol=1e-4, atol=1e-4)
    assert not np.allclose(out[A_KEY], g[A_KEY])
    with pytest.raises(ValueError, match="needs both LoRA factors"):
        refactorise_adapter({A_KEY: g[A_KEY]})


# --- the peft layers, resized in place ---------------------------------------------------------------


def _tiny_bert(spec, ffa: bool = False):
    from fedtune.common.models.lora import build_adapted_model

    model, tokenizer = build_adapted_model(spec, LoraSettings(rank=R_MAX, alpha=8, ffa=ffa))
    with torch.no_grad():  # B off zero, so every component changes the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    model.eval()
    return model, tokenizer


def _scalings(model) -> list[float]:
    from peft.tuners.lora import LoraLayer

    return [m.scaling["default"] for m in model.modules() if isinstance(m, LoraLayer)]


def _logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(["my card has not arrived", "what is the exchange rate"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def test_a_resized_model_computes_the_truncated_global_update_at_the_global_scaling(tiny_bert_spec):
    from peft import get_peft_model_state_dict

    from fedtune.common.models.lora import adapter_state, load_adapter_state
    from fedtune.common.models.lora_resize import lora_a_rows, lora_rank_of, set_lora_rank

    model, tokenizer = _tiny_bert(tiny_bert_spec)
    full = adapter_state(model, ffa=False)
    zeroed = {k: (np.concatenate([v[:, :2], 0 * v[:, 2:]], axis=1) if "lora_B" in k else v) for k, v in full.items()}
    load_adapter_state(model, zeroed, ffa=False)
    expected = _logits(model, tokenizer)  # the full-rank model with components 2, 3 switched off
    load_adapter_state(model, full, ffa=False)
    scalings = _scalings(model)
    assert scalings and set(scalings) == {8 / R_MAX}  # alpha / r_max

    set_lora_rank(model, 2, lora_a_rows(model))
    assert lora_rank_of(model) == 2
    shapes = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    assert all(s[0] == 2 for k, s in shapes.items() if "lora_A" in k)
    assert all(s[1] == 2 for k, s in shapes.items() if "lora_B" in k)
    assert _scalings(model) == scalings
    torch.testing.assert_close(_logits(model, tokenizer), expected)
    load_adapter_state(model, truncate_adapter(full, 2), ffa=False)  # the site's load path accepts it
    torch.testing.assert_close(_logits(model, tokenizer), expected)


def test_growing_back_restores_the_built_a_rows_frozen_under_ffa(tiny_bert_spec):
    from fedtune.common.models.lora import frozen_a_fingerprint
    from fedtune.common.models.lora_resize import lora_a_rows, set_lora_rank

    model, _ = _tiny_bert(tiny_bert_spec, ffa=True)
    built, rows = frozen_a_fingerprint(model), lora_a_rows(model)
    set_lora_rank(model, 1, rows)
    assert frozen_a_fingerprint(model) != built
    set_lora_rank(model, R_MAX, rows)
    assert frozen_a_fingerprint(model) == built
    lora = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad == ("lora_B" in n) for n, p in lora)
    b_new = [p for n, p in lora if "lora_B" in n][0]
    assert torch.all(b_new[:, 1:] == 0)  # columns it regained start at zero
    with pytest.raises(ValueError, match=r"outside 1\.\.4"):
        set_lora_rank(model, R_MAX + 1, rows)


# --- lora.site_ranks -----------------------------------------------------------------------------------


def _config(tmp_path, *lines: str):
    toml = tmp_path / "c.toml"
    toml.write_text(f"""
[model]
name = "tiny-llama"
[lora]
rank = 4
{chr(10).join(lines)}
[data]
task = "question-answer"
path = "{SAMPLES / "medquad" / "medquad_sample.jsonl"}"
[partition]
num_clients = 3
""")
    return load_config(toml)


def test_site_ranks_give_each_partition_its_rank(tmp_path):
    cfg = _config(tmp_path, "site_ranks = [4, 2, 1]")
    assert [cfg.lora.site_rank(i) for i in range(3)] == [4, 2, 1]
    assert cfg.lora.svd_refactorisation
    assert _config(tmp_path).lora.site_rank(2) == 4
    assert not _config(tmp_path, "site_ranks = [4, 2, 1]", "ffa = true").lora.svd_refactorisation
    assert not _config(tmp_path, "site_ranks = [4, 4, 4]").lora.svd_refactorisation


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["site_ranks = [4, 2]"], r"lora.site_ranks has 2 entries for partition.num_clients = 3"),
        (["site_ranks = [4, 2, 5]"], r"lora.site_ranks \[4, 2, 5\]: every entry must be within 1..lora.rank = 4"),
        (["site_ranks = [4, 0, 1]"], r"every entry must be within 1..lora.rank"),
    ],
)
def test_site_ranks_are_validated_naming_the_field(tmp_path, lines, message):
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, *lines)


def test_the_svd_step_refuses_a_server_optimiser_with_moments(tmp_path):
    toml_lines = ["site_ranks = [4, 2, 1]", "[federation]", 'strategy = "fedadam"']
    with pytest.raises(ConfigError, match="federation.strategy = 'fedadam'.*use federation.strategy = 'fedavg'"):
        _config(tmp_path, *toml_lines)
    _config(tmp_path, "site_ranks = [4, 2, 1]", "ffa = true", "[federation]", 'strategy = "fedadam"')
