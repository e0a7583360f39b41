"""VQA accuracy: each rule of the official answer normalisation on its own example, the leave-one-out accuracy
worked by hand, the per-answer-type breakdown and the official result file."""

import json
import os

import pytest

from blip_fast.evaluation.vqa_accuracy import (
    evaluate_vqa,
    normalize_answer,
    read_vqa_results,
    vqa_accuracy,
    write_vqa_results,
)


@pytest.mark.parametrize("answer, normal", [
    # line breaks and tabs are spaces, surrounding whitespace goes; a mark next to one touches a space
    ("\tyes\n", "yes"),
    ("x-y\n-z", "xy z"),
    # a mark touching no space becomes a space
    ("black/white", "black white"),
    ("t-shirt", "t shirt"),
    # a mark touching a space somewhere is deleted everywhere in the answer, the other marks still become spaces
    ("x-y -z", "xy z"),
    ("x-y, z/w", "x y z w"),
    # decided on the answer as given: the space the "/" becomes does not make the "-" after it touch a space
    ("x/-y-z", "x y z"),
    ("yes!", "yes"),
    # a comma between digits deletes every mark, not only the comma
    ("1,000", "1000"),
    ("1,000-2,000", "10002000"),
    # the apostrophe and the colon are not marks
    ("don't", "don't"),
    ("10:30", "10:30"),
    # a period is deleted unless a digit follows, even after a digit
    ("3.5", "3.5"),
    ("yes.", "yes"),
    ("2.", "2"),
    ("u.s.a", "usa"),
    (".5", ".5"),
    # lowercase
    ("Yes", "yes"),
    # number words become digits, up to ten
    ("two", "2"),
    ("none", "0"),
    ("Zero", "0"),
    ("ten", "10"),
    ("eleven", "eleven"),
    ("twenty one", "twenty 1"),
    # articles are dropped as words only
    ("a dog", "dog"),
    ("the cat", "cat"),
    ("an apple", "apple"),
    ("another theme", "another theme"),
    # contractions get their apostrophe; the official table's capitalised keys never match a lowercased word
    ("dont", "don't"),
    ("isnt", "isn't"),
    ("Im", "im"),
    ("somebody'd", "somebodyd"),
    # the steps compose: punctuation, then periods, then words
    ("The Two Dogs.", "2 dogs"),
    ("", ""),
    ("?!", ""),
])
def test_normalisation_rule(answer, normal):
    assert normalize_answer(answer) == normal


def test_normalisation_is_idempotent():
    # what lets human answers be normalised like predictions: an already normal answer is left as it is
    answers = ["The Two Dogs.", "x-y -z", "1,000-2,000", "dont", "somebody'd", "3.5 kg", "t-shirt!", "none"]
    for answer in answers:
        once = normalize_answer(answer)
        assert normalize_answer(once) == once


def test_three_humans_saying_two_against_a_predicted_2():
    # "two" normalises to "2", so 3 of the 10 humans match the prediction. Leave-one-out over the 10 humans:
    # each of the 3 matching humans leaves 2 matches among the other 9 -> min(1, 2/3) = 2/3;
    # each of the 7 others leaves all 3 matches -> min(1, 3/3) = 1.
    # (3 * 2/3 + 7 * 1) / 10 = 9 / 10 -> 90
    humans = ["two", "two", "two", "3", "3", "3", "3", "4", "many", "2 dogs"]
    assert vqa_accuracy("2", humans) == pytest.approx(90.0)


@pytest.mark.parametrize("matching, accuracy", [
    # 1 match:  the matching human sees 0 others -> 0; the 9 others see 1 -> 1/3: (0 + 9/3) / 10 = 0.3
    (1, 30.0),
    # 2 matches: 2 humans see 1 -> 1/3; 8 see 2 -> 2/3: (2/3 + 16/3) / 10 = 0.6
    (2, 60.0),
    # 3 matches: 3 humans see 2 -> 2/3; 7 see 3 -> 1: (2 + 7) / 10 = 0.9
    (3, 90.0),
    # 4 matches: 4 humans see 3 -> 1; 6 see 4 -> 1: 10 / 10
    (4, 100.0),
    (0, 0.0),
])
def test_accuracy_by_number_of_matching_humans(matching, accuracy):
    humans = ["yes"] * matching + ["no"] * (10 - matching)
    assert vqa_accuracy("Yes.", humans) == pytest.approx(accuracy)


def test_empty_prediction_scores_zero():
    assert vqa_accuracy("", ["yes"] * 10) == 0.0
    assert vqa_accuracy("   ", ["no"] * 3 + ["yes"] * 7) == 0.0


@pytest.mark.parametrize("humans", [[], ["yes"], "yes"])
def test_too_few_human_answers_are_refused(humans):
    with pytest.raises(ValueError, match="at least two human answers"):
        vqa_accuracy("yes", humans)


def test_evaluate_per_question_overall_and_answer_type():
    humans = {
        1: ["yes"] * 10,                      # "yes" -> 100
        2: ["2"] * 2 + ["3"] * 8,             # "two" -> 2 matches -> 60
        3: ["red"] + ["blue"] * 9,            # "a red" -> 1 match -> 30
        4: ["no"] * 10,                       # "yes" -> 0
    }
    predictions = {1: "yes", 2: "two", 3: "a red", 4: "yes"}
    types = {1: "yes/no", 2: "number", 3: "other", 4: "yes/no"}
    result = evaluate_vqa(predictions, humans, types)
    assert result.per_question == pytest.approx({1: 100.0, 2: 60.0, 3: 30.0, 4: 0.0})
    assert result.overall == pytest.approx((100 + 60 + 30 + 0) / 4)
    assert result.per_answer_type == pytest.approx({"yes/no": 50.0, "number": 60.0, "other": 30.0})
    assert evaluate_vqa(predictions, humans).per_answer_type == {}


@pytest.mark.parametrize("predictions, types, message", [
    ({1: "yes"}, None, "predictions do not cover .* 1 missing \\(first \\[2\\]\\), 0 unknown"),
    ({1: "yes", 2: "no", 3: "x"}, None, "0 missing .* 1 unknown \\(first \\[3\\]\\)"),
    ({1: "yes", 2: "no"}, {1: "yes/no"}, "answer_types do not cover"),
])
def test_evaluate_refuses_mismatched_questions(predictions, types, message):
    with pytest.raises(ValueError, match=message):
        evaluate_vqa(predictions, {1: ["yes"] * 10, 2: ["no"] * 10}, types)


def test_result_file_round_trip(tmp_path):
    results = {262148000: "down", 393225001: "2", 7: "t-shirt \u00e9t\u00e9"}
    path = write_vqa_results(tmp_path / "out" / "vqa_result.json", results)
    assert json.loads(path.read_text(encoding="utf-8")) == [
        {"question_id": 262148000, "answer": "down"},
        {"question_id": 393225001, "answer": "2"},
        {"question_id": 7, "answer": "t-shirt \u00e9t\u00e9"},
    ]
    assert read_vqa_results(path) == results
    assert [p.name for p in path.parent.iterdir()] == ["vqa_result.json"]  # no temporary file left behind


def test_a_write_that_fails_before_its_rename_keeps_the_old_file(tmp_path, monkeypatch):
    path = write_vqa_results(tmp_path / "vqa_result.json", {1: "yes"})

    def failing_rename(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_rename)
    with pytest.raises(OSError, match="disk full"):
        write_vqa_results(path, {2: "no"})
    assert read_vqa_results(path) == {1: "yes"}
    assert [p.name for p in tmp_path.iterdir()] == ["vqa_result.json"]  # the temporary file is gone too


def test_invalid_results_are_refused_before_writing(tmp_path):
    path = write_vqa_results(tmp_path / "vqa_result.json", {1: "yes"})
    with pytest.raises(ValueError, match="int question id and a str answer"):
        write_vqa_results(path, {2: "no", "3": "yes"})
    with pytest.raises(ValueError, match="int question id and a str answer"):
        write_vqa_results(path, {True: "yes"})
    assert read_vqa_results(path) == {1: "yes"}
    assert [p.name for p in tmp_path.iterdir()] == ["vqa_result.json"]


@pytest.mark.parametrize("content, message", [
    ("not json", "not a JSON result file"),
    ('{"question_id": 1, "answer": "yes"}', "is a JSON list, found dict"),
    ('[{"question_id": 1}]', "entry 0 is not"),
    ('[{"question_id": "1", "answer": "yes"}]', "entry 0 is not"),
    ('[{"question_id": 1, "answer": 2}]', "entry 0 is not"),
    ('[{"question_id": 1, "answer": "yes"}, ["x"]]', "entry 1 is not"),
    ('[{"question_id": 1, "answer": "yes"}, {"question_id": 1, "answer": "no"}]', "question 1 is answered twice"),
])
def test_malformed_result_files_are_refused(tmp_path, content, message):
    path = tmp_path / "vqa_result.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        read_vqa_results(path)
