"""The per-record loss is each record's own token mean, independent of the rest of the batch."""

from __future__ import annotations

import torch

from fedtune.common.data.encoding import IGNORE_INDEX
from fedtune.common.evaluation import macro_f1
from fedtune.common.losses import per_sample_causal_lm_loss


def test_per_record_loss_ignores_other_records_and_prompt_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.tensor(
        [[IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX, 1, 2, 3, 4, 5]]
    )
    losses, counts = per_sample_causal_lm_loss(logits, labels)
    assert counts.tolist() == [2, 5]
    alone, _ = per_sample_causal_lm_loss(logits[:1], labels[:1])
    torch.testing.assert_close(losses[0], alone[0])
    expected = torch.nn.functional.cross_entropy(logits[0, 1:3], labels[0, 2:4])  # token-mean of record 0 only
    torch.testing.assert_close(losses[0], expected)
    batch_token_mean = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )
    assert not torch.isclose(losses.mean(), batch_token_mean), "HF's batch token-mean is a different quantity"


def test_macro_f1_matches_the_textbook_definition():
    assert macro_f1([0, 0, 1, 1], [0, 0, 1, 1]) == 1.0
    # class 0: tp=1 fp=0 fn=1 -> 2/3; class 1: tp=1 fp=1 fn=0 -> 2/3; class 2 predicted only: 0
    assert abs(macro_f1([0, 0, 1], [0, 1, 1]) - (2 / 3 + 2 / 3) / 2) < 1e-12
    assert abs(macro_f1([0, 1], [2, 1]) - (0 + 1 + 0) / 3) < 1e-12
