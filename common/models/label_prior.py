"""A classification head that starts from the label names: a zero-shot prior that costs no privacy.

A sentence encoder already places a question near the words of its intent ("my card has not
arrived" near "card arrival"). Setting each label's row of the head to the encoder's own pooled
features of the label's name, scaled to a common norm, makes round 0 a nearest-label-name
classifier: with equal row norms, ``argmax_c w_c . h`` is the label whose name is closest in
cosine to the record, whatever the record's feature norm. Only the federation's agreed label
list goes in, which every site and the server already hold, so no record is read and no
epsilon is spent; it is a public prior, like the pre-trained weights (the head initialisation
of zero-shot and few-shot classifiers, e.g. Tunstall et al. 2022, SetFit, reads label text the
same way). Under strong DP it matters most: DP-SGD at epsilon 1 learns slowly from a random
head, and starting near the answer leaves the noisy steps less to do (docs/benchmarks.md,
*Utility*).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["LabelPriorError", "install_label_prior", "label_prior_problem", "label_text"]


class LabelPriorError(ValueError):
    """The model's head cannot take the label-name prior; the message names the model and the setting."""


def label_text(label: str) -> str:
    """The words of a label name: ``card_arrival`` and ``card-arrival`` read as ``card arrival``."""
    return re.sub(r"[_\-\s]+", " ", label).strip() or label


def _head_problem(model: Any) -> str | None:
    """Why ``model``'s head cannot take the prior: only a linear ``classifier`` over one pooled vector a record
    can (BERT, MiniLM, DeBERTa-v2); a decoder's ``score`` reads every token's state, RoBERTa's head is two layers."""
    import torch

    if isinstance(getattr(model, "classifier", None), torch.nn.Linear):
        return None
    return (
        f"model.head_init = 'label_names' needs a single linear head over pooled features (BERT-style encoders "
        f"such as MiniLM, DeBERTa-v2); {type(model).__name__} ({model.config.model_type}) has none: set "
        "model.head_init = 'random'"
    )


def label_prior_problem(directory: Path, num_labels: int) -> str | None:
    """Why the model in ``directory`` cannot take the prior, from its structure alone: built on the meta
    device, so no weight is read and a run is refused before it writes anything."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(directory, num_labels=num_labels)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    return _head_problem(model)


def install_label_prior(model: Any, tokenizer: Any, labels: Sequence[str], scale: float, max_length: int) -> None:
    """Set the head's row of each label to its name's pooled features scaled to norm ``scale``, bias 0.

    The features are what the head itself receives, captured by a hook during one forward pass
    over the label names in eval mode (no dropout), so the prior follows the model's pooling.
    """
    import torch

    problem = _head_problem(model)
    if problem:
        raise LabelPriorError(problem)
    head = model.classifier
    if head.out_features != len(labels):
        raise LabelPriorError(f"the head has {head.out_features} outputs for {len(labels)} agreed labels")
    seen: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _module, inputs, _output: seen.append(inputs[0].detach()))
    was_training = model.training
    try:
        model.eval()
        batch = tokenizer(
            [label_text(label) for label in labels],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        device = head.weight.device
        with torch.no_grad():
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    finally:
        hook.remove()
        model.train(was_training)
    features = seen[0].float()
    if features.dim() != 2:
        raise LabelPriorError(
            f"model.head_init = 'label_names' needs a head over one pooled vector a record; the head of "
            f"{type(model).__name__} ({model.config.model_type}) reads every token's state: set "
            "model.head_init = 'random'"
        )
    norms = features.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise LabelPriorError("a label name has all-zero features: set model.head_init = 'random'")
    with torch.no_grad():
        head.weight.copy_((scale * features / norms).to(head.weight.dtype))
        if head.bias is not None:
            head.bias.zero_()
