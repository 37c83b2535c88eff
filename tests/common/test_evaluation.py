"""Held-out scores from scikit-learn, the confusion-matrix plot, and generation prompts as training saw them."""

from __future__ import annotations

import pytest

from fedtune.common.evaluation import classification_report, macro_f1, top_labels


def test_per_class_precision_recall_and_confusion_matrix_by_hand():
    labels = ["a", "b", "c", "d"]  # "d" never occurs: it keeps its row and column, scored 0
    truth = [0, 0, 0, 1, 1, 2]
    pred = [0, 0, 1, 1, 2, 2]
    report = classification_report(truth, pred, labels, loss=0.5)
    assert report.accuracy == pytest.approx(4 / 6)
    scores = {c.label: c for c in report.per_class}
    assert (scores["a"].precision, scores["a"].recall, scores["a"].support) == (1.0, pytest.approx(2 / 3), 3)
    assert (scores["b"].precision, scores["b"].recall) == (0.5, 0.5)
    assert (scores["c"].precision, scores["c"].recall) == (0.5, 1.0)
    assert (scores["d"].precision, scores["d"].recall, scores["d"].support) == (0.0, 0.0, 0)
    assert report.confusion == ((2, 1, 0, 0), (0, 1, 1, 0), (0, 0, 1, 0), (0, 0, 0, 0))
    # Macro-F1 over the labels present in truth or prediction (a, b, c), as the rounds have always scored it.
    f1 = {"a": 0.8, "b": 0.5, "c": 2 / 3}
    assert report.macro_f1 == pytest.approx(sum(f1.values()) / 3)
    as_json = report.to_json()
    assert as_json["confusion-matrix"][0] == [2, 1, 0, 0] and as_json["per-class"][3]["label"] == "d"


def test_macro_f1_is_sklearns_and_scores_a_never_predicted_class_zero():
    assert macro_f1([0, 0, 1, 1], [0, 0, 1, 1]) == 1.0
    assert macro_f1([0, 1], [2, 1]) == pytest.approx((0 + 1 + 0) / 3)
    assert macro_f1([], []) == 0.0


def test_an_empty_file_scores_zero_without_failing():
    report = classification_report([], [], ["a", "b"])
    assert report.accuracy == 0.0 and report.confusion == ((0, 0), (0, 0))


def test_top_labels_most_probable_first():
    assert top_labels([0.1, 0.7, 0.2], ["a", "b", "c"], 2) == [("b", 0.7), ("c", 0.2)]


@pytest.mark.parametrize("n", [3, 77])
def test_the_confusion_matrix_png_grows_with_the_labels(tmp_path, n):
    from PIL import Image

    from fedtune.common.confusion_matrix_plot import plot_confusion_matrix

    labels = [f"label_{i}_with_a_long_name" for i in range(n)]
    matrix = [[(5 if i == j else (1 if j == (i + 1) % n else 0)) for j in range(n)] for i in range(n)]
    out = plot_confusion_matrix(matrix, labels, tmp_path / "cm.png", "test")
    width, height = Image.open(out).size
    assert height >= (600 if n <= 20 else 1800), (width, height)  # 77 labels: room for 77 readable tick labels


def test_generation_prompts_are_the_training_prompts(tiny_llama_spec):
    from fedtune.common.data.encoding import IGNORE_INDEX, encode_instructions
    from fedtune.common.data.shapes import Example
    from fedtune.common.generation import prompt_ids
    from fedtune.common.models.loading import load_tokenizer

    tokenizer = load_tokenizer(tiny_llama_spec)
    example = Example("What is CFS?", "A long answer.", context=(("system", "Be brief."),))
    encoded = encode_instructions([example], tokenizer, 64)
    learned = [i for i, label in enumerate(encoded.labels[0]) if label != IGNORE_INDEX]
    assert prompt_ids(example, tokenizer, 64) == encoded.input_ids[0][: learned[0]]
    assert prompt_ids(Example("What is CFS?", ""), tokenizer, 64) == prompt_ids(
        Example("What is CFS?", "anything"), tokenizer, 64
    )
