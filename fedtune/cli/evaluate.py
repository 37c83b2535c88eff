"""``fedtune evaluate``: score a fine-tuned model on a labelled file, and write what was found to ``eval.json``.

Classification: accuracy, macro-F1, per-class precision and recall (scikit-learn), and a
confusion-matrix PNG. Causal LM: loss and perplexity of the fine-tuned and the base model on
the file's responses, and a few greedy generations side by side. The file is read exactly as a
site reads its data (any format, the config's field mapping and agreed labels).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fedtune.cli.config_options import add_config_options, config_from_args
from fedtune.cli.exit_codes import ExitCode
from fedtune.cli.model_source import TrainedModel, locate
from fedtune.common.config import ConfigError, FedtuneConfig
from fedtune.common.data.readers import DataError
from fedtune.common.models.builtin import ModelFetchError

EVAL_FILE = "eval.json"
CONFUSION_PNG = "confusion_matrix.png"
GENERATIONS_FILE = "generations.md"


def register(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser(
        "evaluate",
        help="score a fine-tuned model on a labelled file: metrics, confusion matrix or generations, eval.json",
        description="PATH: a run directory (its merged model, else its kept checkpoint), a checkpoint directory or "
        "a merged model directory. Writes eval.json (and confusion_matrix.png or generations.md) to --out "
        "(default: RUN_DIR/eval, or MODEL_DIR/../eval). Exit status: 0 done, 2 bad path, file or config, "
        "3 model not loadable.",
    )
    ev.add_argument("path", type=Path, metavar="RUN_DIR|MODEL_DIR")
    ev.add_argument("--data", type=Path, required=True, help="labelled file or folder, any format a site can read")
    ev.add_argument("--out", type=Path, help="folder for eval.json and the plots")
    add_config_options(
        ev,
        config_help="the config the model was trained with (only for a merged directory without fedtune.json)",
        preset_help="the built-in config the model was trained with (as --config)",
        set_help="override how the file is read, e.g. data.fields.label=category",
    )
    ev.add_argument("--batch-size", type=int, default=0, help="records a forward pass (default: train.eval_batch_size)")
    ev.add_argument("--generations", type=int, default=3, help="causal LM: records to generate for (default 3)")
    ev.add_argument("--max-new-tokens", type=int, default=64, help="causal LM: length of each generation")
    ev.add_argument("--no-base", action="store_true", help="causal LM: skip the base model's loss and generations")
    ev.set_defaults(run=run)


def _progress(total: int, what: str) -> Any:
    from tqdm.auto import tqdm

    # On a terminal only (disable=None), and gone when done: the console keeps the results.
    return tqdm(total=total, desc=what, unit="record", leave=False, disable=None, dynamic_ncols=True)


def _given_config(args: argparse.Namespace) -> FedtuneConfig | None:
    return config_from_args(args) if (args.config or args.preset) else None


def run(args: argparse.Namespace) -> ExitCode:
    from fedtune.common.data.federation_data import load_examples

    if args.batch_size < 0 or args.generations < 0 or args.max_new_tokens <= 0:
        raise ConfigError("--batch-size and --generations must be >= 0, --max-new-tokens > 0")
    trained = locate(args.path, _given_config(args))
    if not args.data.exists():
        raise FileNotFoundError(f"{args.data}: no such data file or folder (--data)")
    cfg = trained.config_for(args.data, args.set)
    examples = load_examples(args.data, cfg)
    if not examples:
        raise DataError(f"{args.data}: no usable records to evaluate on")
    out_dir = Path(args.out) if args.out else trained.default_out
    out_dir.mkdir(parents=True, exist_ok=True)
    batch_size = args.batch_size or cfg.train.eval_batch_size
    model, tokenizer = trained.load()
    head = cfg.task.head
    labels = trained.labels()
    encoded = head.encode(examples, tokenizer, labels, cfg.model.max_length)
    result: dict[str, Any] = {
        "model": trained.description,
        "round": trained.round,
        "data": str(args.data),
        "task": cfg.data.task,
        "num-examples": len(examples),
    }
    if head.classifies:
        result |= _classification(model, encoded, labels, batch_size, out_dir, trained)
        lines = [
            f"  accuracy {result['metrics']['accuracy']:.4f}   macro-F1 {result['metrics']['macro-f1']:.4f}   "
            f"loss {result['metrics']['loss']:.4f}",
            f"  confusion matrix: {out_dir / CONFUSION_PNG}",
        ]
    else:
        result |= _generation(args, trained, cfg, model, tokenizer, examples, encoded, batch_size, out_dir)
        base = result.get("base-metrics")
        lines = [
            f"  loss {result['metrics']['loss']:.4f}   perplexity {result['metrics']['perplexity']:.2f}"
            + (f"   (base model: loss {base['loss']:.4f}, perplexity {base['perplexity']:.2f})" if base else ""),
        ]
        if result["generations"]:
            lines.append(f"  generations: {out_dir / GENERATIONS_FILE}")
    (out_dir / EVAL_FILE).write_text(json.dumps(result, indent=2, allow_nan=True) + "\n", encoding="utf-8")
    print(f"evaluated {trained.description} on {args.data}: {len(examples)} records")
    print("\n".join([*lines, f"  report: {out_dir / EVAL_FILE}"]))
    return ExitCode.OK


def _classification(
    model: Any, encoded: Any, labels: list[str], batch_size: int, out_dir: Path, trained: TrainedModel
) -> dict[str, Any]:
    from fedtune.common.confusion_matrix_plot import plot_confusion_matrix
    from fedtune.common.evaluation import classification_report, classifier_outputs

    with _progress(len(encoded), "evaluating") as bar:
        outputs = classifier_outputs(model, encoded, batch_size, bar.update)
    report = classification_report(outputs.truth, outputs.predicted, labels, outputs.loss).to_json()
    title = f"{trained.description}: accuracy {report['accuracy']:.3f}, macro-F1 {report['macro-f1']:.3f}"
    plot_confusion_matrix(report["confusion-matrix"], labels, out_dir / CONFUSION_PNG, title)
    metrics = {k: report.pop(k) for k in ("loss", "accuracy", "macro-f1")}
    report.pop("num-examples")
    return {"metrics": metrics, **report, "confusion-matrix-plot": CONFUSION_PNG}


def _generation(
    args: argparse.Namespace,
    trained: TrainedModel,
    cfg: FedtuneConfig,
    model: Any,
    tokenizer: Any,
    examples: list,
    encoded: Any,
    batch_size: int,
    out_dir: Path,
) -> dict[str, Any]:
    from fedtune.common.evaluation import evaluate_generator
    from fedtune.common.generation import complete, prompt_ids

    with _progress(len(encoded), "evaluating") as bar:
        metrics = evaluate_generator(model, encoded, batch_size, bar.update)
    base, base_note = None, None
    if not args.no_base:
        try:
            base, base_tokenizer = trained.load_base()
        except (ConfigError, ModelFetchError) as exc:  # the base model stayed on another machine, say
            base_note = f"base model not available: {exc}"
            print(f"fedtune: {base_note}; comparing without it", file=sys.stderr)
    base_metrics = None
    if base is not None:
        base_encoded = cfg.task.head.encode(examples, base_tokenizer, [], cfg.model.max_length)
        with _progress(len(base_encoded), "evaluating the base model") as bar:
            base_metrics = evaluate_generator(base, base_encoded, batch_size, bar.update)
    generations = []
    chosen = examples[: args.generations]
    with _progress(len(chosen), "generating") as bar:
        for example in chosen:
            row = {
                "prompt": example.text,
                "reference": example.target,
                "fine-tuned": complete(
                    model, tokenizer, prompt_ids(example, tokenizer, cfg.model.max_length), args.max_new_tokens
                ),
            }
            if base is not None:
                row["base"] = complete(
                    base, base_tokenizer, prompt_ids(example, base_tokenizer, cfg.model.max_length), args.max_new_tokens
                )
            generations.append(row)
            bar.update(1)
    if generations:
        (out_dir / GENERATIONS_FILE).write_text(_generations_markdown(trained, generations), encoding="utf-8")
    return {
        "metrics": metrics,
        "base-metrics": base_metrics,
        **({"base-note": base_note} if base_note else {}),
        "generations": generations,
    }


def _generations_markdown(trained: TrainedModel, generations: list[dict[str, str]]) -> str:
    """Each record's prompt, then the reference, the base model's and the fine-tuned model's answers."""
    lines = [f"# Generations: {trained.description}", ""]
    for i, row in enumerate(generations, start=1):
        lines += [f"## {i}. {row['prompt']}", ""]
        for key in ("reference", "base", "fine-tuned"):
            if key in row:
                lines += [f"**{key}:**", "", row[key] or "_(empty)_", ""]
    return "\n".join(lines)
