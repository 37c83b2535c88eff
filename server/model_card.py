"""Model cards (``README.md``) for what a run exports: the merged model and each round's adapter.

A card says what a reader must know before using the model (Mitchell et al. 2019, "Model
Cards for Model Reporting"): the base model, the data in the operator's words
(``run.data_description``), how it was trained (rounds, sites), the privacy each site spent
(epsilon and delta, from the sites' own accounting in ``metrics.jsonl``; site-level epsilon
when that guarantee is on), and the server's held-out metrics for that round. Written with
huggingface_hub's ``ModelCard``, so the hub and other tools read its metadata.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.common.atomic_files import atomic_write_bytes
from fedtune.common.config import FedtuneConfig
from fedtune.server.checkpoints import CheckpointStore
from fedtune.server.exported_model import fedtune_version, read_export_record

CARD_FILE = "README.md"

#: Hub ids of the built-in base models, for the card's ``base_model`` metadata.
BUILTIN_HUB_IDS = {
    "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
}


@dataclass(frozen=True)
class SitePrivacy:
    """One site's record-level DP spending: by the rounds the model comes from, and by the whole run."""

    site: str
    epsilon: float  # through the card's round (what this model's release costs the site)
    epsilon_run: float  # through the last round the run trained (what the site's ledger holds for it)
    delta: float
    rounds_trained: int


@dataclass(frozen=True)
class CardFacts:
    """Everything a card states; built from the config and metrics.jsonl by :func:`card_facts`."""

    kind: str  # "merged" or "adapter"
    base_model: str
    base_hub_id: str | None
    task: str
    classifies: bool
    labels: tuple[str, ...]
    data_description: str
    round: int
    rounds_run: int
    dp: bool
    sites: tuple[SitePrivacy, ...]
    site_level_epsilon: float | None
    site_level_delta: float | None
    metrics: dict[str, float]
    fedtune_version: str
    run_name: str
    remote_code: bool = False  # a mean-pooled classifier shipping modeling_fedtune.py
    head_from_label_names: bool = False  # model.head_init = "label_names"


def _base_model(cfg: FedtuneConfig) -> tuple[str, str | None]:
    if cfg.model.path is not None:
        return str(cfg.model.path), None
    return cfg.model.name, BUILTIN_HUB_IDS.get(cfg.model.name)


def site_privacy(records: list[dict[str, Any]], through: int, delta: float) -> tuple[SitePrivacy, ...]:
    """Each site's epsilon by round ``through`` and by the end of the run, from the rounds' ``train`` entries.

    A site's ``epsilon`` is cumulative (its ledger's spend in the run), so the latest entry counts.
    """
    upto: dict[str, float] = {}
    total: dict[str, float] = {}
    rounds: dict[str, int] = {}
    for record in sorted(records, key=lambda r: r.get("round", 0)):
        for site, entry in (record.get("train") or {}).items():
            eps = float(entry.get("epsilon", math.inf))
            total[site] = eps
            if record.get("round", 0) <= through:
                upto[site] = eps
                rounds[site] = rounds.get(site, 0) + 1
    return tuple(
        SitePrivacy(site, upto.get(site, 0.0), total[site], delta, rounds.get(site, 0)) for site in sorted(total)
    )


def card_facts(
    cfg: FedtuneConfig,
    records: list[dict[str, Any]],
    round_: int,
    kind: str,
    labels: tuple[str, ...] = (),
    remote_code: bool = False,
) -> CardFacts:
    """The facts of the model built from round ``round_`` of a run whose rounds are ``records``."""
    this = next((r for r in records if r.get("round") == round_), {})
    base, hub_id = _base_model(cfg)
    return CardFacts(
        kind=kind,
        base_model=base,
        base_hub_id=hub_id,
        task=cfg.data.task,
        classifies=cfg.task.classifies,
        labels=tuple(labels),
        data_description=cfg.run.data_description.strip(),
        round=round_,
        rounds_run=max((int(r.get("round", 0)) for r in records), default=0),
        dp=cfg.privacy.enabled,
        sites=site_privacy(records, round_, cfg.privacy.delta),
        site_level_epsilon=this.get("site-level-epsilon"),
        site_level_delta=this.get("site-level-delta"),
        metrics={k: float(v) for k, v in (this.get("server") or {}).items()},
        fedtune_version=fedtune_version(),
        run_name=cfg.run.name,
        remote_code=remote_code,
        head_from_label_names=cfg.task.classifies and cfg.model.head_init == "label_names",
    )


def _eps(value: float) -> str:
    return "∞ (no DP)" if not math.isfinite(value) else f"{value:.3g}"


def _usage(facts: CardFacts) -> str:
    if facts.kind == "adapter":
        return (
            "A LoRA adapter in peft's format: load the base model, then "
            "`peft.PeftModel.from_pretrained(base, this_directory)`; or, with fedtune, "
            "`fedtune predict`/`fedtune generate` on the run directory."
        )
    if facts.classifies and facts.remote_code:
        return (
            "The encoder is read by the mean of its token states, as in training; that pooling ships as "
            "`modeling_fedtune.py`, so pass `trust_remote_code=True`:\n\n"
            "```python\nfrom transformers import pipeline\n\n"
            'classify = pipeline("text-classification", model="PATH/TO/THIS/DIRECTORY", trust_remote_code=True)\n'
            "```"
        )
    task = "text-classification" if facts.classifies else "text-generation"
    load = f'model = pipeline("{task}", model="PATH/TO/THIS/DIRECTORY")'
    return f"```python\nfrom transformers import pipeline\n\n{load}\n```"


def _sites_trained(facts: CardFacts) -> str:
    by_round = sum(1 for s in facts.sites if s.rounds_trained)
    if by_round == len(facts.sites):
        return str(by_round)
    return f"{by_round} by round {facts.round}, {len(facts.sites)} in all"


def render_card(facts: CardFacts) -> str:
    """The card's text: YAML metadata for the hub, then the sections a reader looks for."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        base_model=facts.base_hub_id,
        library_name="peft" if facts.kind == "adapter" else "transformers",
        pipeline_tag="text-classification" if facts.classifies else "text-generation",
        tags=["fedtune", "federated-learning", "lora", *(["differential-privacy"] if facts.dp else [])],
    )
    what = "LoRA adapter" if facts.kind == "adapter" else "merged model (base weights + LoRA adapter)"
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {facts.run_name}: {what}, round {facts.round}",
        "",
        f"Fine-tuned with fedtune {facts.fedtune_version}: federated LoRA"
        + (", with record-level differential privacy (DP-SGD) at every site." if facts.dp else ", without DP."),
        "",
        "## Base model",
        "",
        f"`{facts.base_model}`" + (f" ({facts.base_hub_id})" if facts.base_hub_id else ""),
        "",
        "## Training data",
        "",
        facts.data_description or "_Not described by the operator (set `run.data_description` in the config)._",
        "",
        f"Task: `{facts.task}`"
        + (f"; {len(facts.labels)} labels: {', '.join(facts.labels[:20])}" if facts.labels else "")
        + (", ..." if len(facts.labels) > 20 else ""),
        "",
        "## Training",
        "",
        f"- Rounds: this model is round {facts.round} of the {facts.rounds_run} the run trained",
        f"- Sites that trained: {_sites_trained(facts)}",
        *(
            [
                "- Head: started from the base model's features of the label names (`model.head_init = "
                "'label_names'`), built from the label list alone: no record, no ε"
            ]
            if facts.head_from_label_names
            else []
        ),
        "",
        "## Privacy",
        "",
    ]
    if facts.sites:
        lines += [
            f"Each site's record-level (ε, δ) spent by the rounds this model comes from; the last column is the "
            f"site's spend over the whole run.{'' if facts.dp else ' DP was off: no guarantee.'}",
            "",
            "| site | rounds trained | ε (this model) | δ | ε (whole run) |",
            "|---|---|---|---|---|",
            *(
                f"| {s.site} | {s.rounds_trained} | {_eps(s.epsilon)} | {s.delta:.3g} | {_eps(s.epsilon_run)} |"
                for s in facts.sites
            ),
        ]
    else:
        lines.append("No site trained in the run's records.")
    if facts.site_level_epsilon is not None:
        lines += [
            "",
            f"Site-level DP (a whole site's participation): ε = {facts.site_level_epsilon:.3g}, "
            f"δ = {facts.site_level_delta or 0:.3g}.",
        ]
    lines += ["", "## Held-out metrics", ""]
    if facts.metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in facts.metrics.items()]
        lines += ["", "On the server's held-out set, after this round."]
    else:
        lines.append("None recorded for this round.")
    lines += ["", "## How to use", "", _usage(facts), ""]
    return str(ModelCard("\n".join(lines)))


def write_card(directory: Path, facts: CardFacts) -> Path:
    path = Path(directory) / CARD_FILE
    atomic_write_bytes(path, render_card(facts).encode("utf-8"))
    return path


def write_model_cards(run_dir: Path, cfg: FedtuneConfig, records: list[dict[str, Any]]) -> list[Path]:
    """A card in ``RUN_DIR/merged`` (for the round its ``fedtune.json`` names) and in each round's checkpoint."""
    from fedtune.common.data.federation_data import agreed_labels
    from fedtune.common.models.pooling import REMOTE_CODE_FILE

    run_dir = Path(run_dir)
    labels = tuple(agreed_labels(cfg))
    merged = run_dir / "merged"
    written = []
    record = read_export_record(merged) if merged.is_dir() else None
    if record is not None and record.round is not None:
        remote = (merged / REMOTE_CODE_FILE).exists()
        written.append(write_card(merged, card_facts(cfg, records, record.round, "merged", labels, remote)))
    store = CheckpointStore(run_dir / "checkpoints")
    for round_ in store.rounds():
        written.append(write_card(store.path_for(round_), card_facts(cfg, records, round_, "adapter", labels)))
    return written
