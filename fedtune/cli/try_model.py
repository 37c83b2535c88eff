"""``fedtune predict`` and ``fedtune generate``: try a fine-tuned model from the command line.

Both take what ``fedtune evaluate`` takes (a run directory, a checkpoint or a merged model
directory). ``predict`` labels texts (a classifier); ``generate`` completes a prompt (a causal
LM), prompted as training prompted it: through the chat template, or raw for
``prompt-completion`` runs (``--raw`` forces raw).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedtune.cli.config_options import add_config_options, config_from_args
from fedtune.cli.exit_codes import ExitCode
from fedtune.cli.model_source import TrainedModel, locate
from fedtune.common.config import ConfigError

PREDICT_BATCH = 32


def _add_source(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, metavar="RUN_DIR|MODEL_DIR")
    add_config_options(
        parser,
        config_help="the config the model was trained with (only for a merged directory without fedtune.json)",
        preset_help="the built-in config the model was trained with (as --config)",
        set_help="override a value of --config or --preset",
    )


def register(sub: argparse._SubParsersAction) -> None:
    predict = sub.add_parser(
        "predict",
        help="label texts with a fine-tuned classifier (label and probability)",
        description="Prints one line a text: label, probability, text (tab-separated; --json: JSON lines).",
    )
    _add_source(predict)
    predict.add_argument("texts", nargs="*", metavar="TEXT", help="texts to label")
    predict.add_argument("--file", type=Path, help="UTF-8 text file, one text a line ('-': standard input)")
    predict.add_argument("--top", type=int, default=1, help="show the K most probable labels (default 1)")
    predict.add_argument("--json", action="store_true", help="JSON lines instead of tab-separated text")
    predict.set_defaults(run=run_predict)

    generate = sub.add_parser("generate", help="complete a prompt with a fine-tuned causal LM (greedy)")
    _add_source(generate)
    generate.add_argument("prompt", help="the prompt (a question, an instruction...)")
    generate.add_argument("--max-new-tokens", type=int, default=128, help="length of the completion (default 128)")
    generate.add_argument("--raw", action="store_true", help="no chat template: continue the prompt as written")
    generate.set_defaults(run=run_generate)


def _trained(args: argparse.Namespace, classifies: bool, command: str) -> TrainedModel:
    trained = locate(args.path, config_from_args(args) if (args.config or args.preset) else None)
    if trained.task.classifies != classifies:
        other = "generate" if classifies else "predict"
        raise ConfigError(
            f"{trained.description} is a {'classifier' if trained.task.classifies else 'causal LM'} "
            f"(data.task = {trained.task.name!r}): use `fedtune {other}`, not `fedtune {command}`"
        )
    return trained


def _texts(args: argparse.Namespace) -> list[str]:
    texts = list(args.texts)
    if args.file is not None:
        if str(args.file) == "-":
            content = sys.stdin.read()
        elif not args.file.is_file():
            raise FileNotFoundError(f"{args.file}: no such file (--file)")
        else:
            try:
                content = args.file.read_text(encoding="utf-8-sig")
            except UnicodeDecodeError as exc:
                raise ConfigError(f"{args.file}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from exc
        texts += [line.strip() for line in content.splitlines() if line.strip()]
    if not texts:
        raise ConfigError("fedtune predict: give TEXT arguments or --file")
    return texts


def run_predict(args: argparse.Namespace) -> ExitCode:
    import torch

    from fedtune.common.evaluation import top_labels

    if args.top < 1:
        raise ConfigError("--top must be at least 1")
    trained = _trained(args, classifies=True, command="predict")
    texts = _texts(args)
    labels = trained.labels()
    model, tokenizer = trained.load()
    for start in range(0, len(texts), PREDICT_BATCH):
        chunk = texts[start : start + PREDICT_BATCH]
        batch = tokenizer(chunk, padding=True, truncation=True, max_length=trained.max_length, return_tensors="pt")
        with torch.no_grad():
            probs = torch.softmax(model(**batch).logits.float(), dim=-1)
        for text, row in zip(chunk, probs.tolist(), strict=True):
            best = top_labels(row, labels, min(args.top, len(labels)))
            if args.json:
                print(json.dumps({"text": text, "labels": [{"label": n, "probability": p} for n, p in best]}))
            else:
                shown = "\t".join(f"{name}\t{p:.4f}" for name, p in best)
                print(f"{shown}\t{text}")
    return ExitCode.OK


def run_generate(args: argparse.Namespace) -> ExitCode:
    from fedtune.common.data.shapes import Example
    from fedtune.common.generation import complete, prompt_ids

    if args.max_new_tokens <= 0:
        raise ConfigError("--max-new-tokens must be positive")
    trained = _trained(args, classifies=False, command="generate")
    model, tokenizer = trained.load()
    templated = not args.raw and trained.task.name != "prompt-completion"
    example = Example(args.prompt, "", templated=templated)
    print(complete(model, tokenizer, prompt_ids(example, tokenizer, trained.max_length), args.max_new_tokens))
    return ExitCode.OK
