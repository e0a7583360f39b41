"""COCO caption metrics through pycocoevalcap: BLEU and CIDEr against hand computations, the PTB tokenizer and its
Python stand-in, METEOR, and what happens without Java or without SPICE's models (never a download)."""

import math
import os
import shutil
import subprocess

import pytest
from pycocoevalcap.meteor.meteor import Meteor

from blip_fast.evaluation import caption_metrics as metrics_module
from blip_fast.evaluation.caption_metrics import basic_tokenize, caption_metrics, missing_spice_models

needs_java = pytest.mark.skipif(shutil.which("java") is None,
                                reason="`java` is not on PATH: PTBTokenizer and METEOR are Java programs")

# Tokenized (lowercased, punctuation dropped):
#   image 1 references "a dog runs on the grass" (6 words), "a dog is running" (4); prediction "a dog runs" (3)
#   image 2 reference  "a cat sleeps on a sofa" (6);            prediction "the cat sleeps on the sofa" (6)
# The line separator inside a reference is a space to the tokenizer, not a second caption.
REFERENCES = {1: ["A dog runs on the grass.", "A dog is\u2028running."], 2: ["A cat sleeps on a sofa."]}
PREDICTIONS = {1: "A dog runs!", 2: "The cat sleeps on the sofa."}
# BLEU is a corpus score: clipped n-gram matches and lengths are summed over the images first.
# Unigrams: image 1 matches a, dog, runs (3 of 3); image 2 matches cat, sleeps, on, sofa but neither "the" (4 of 6):
#   precision 7/9.
# Bigrams: image 1 "a dog", "dog runs" (2 of 2); image 2 "cat sleeps", "sleeps on" of "the cat", "cat sleeps",
#   "sleeps on", "on the", "the sofa" (2 of 5): precision 4/7.
# Brevity: the reference length closest to each prediction's, 4 (|4-3| < |6-3|) and 6: 10 against 9 predicted
#   words, penalty exp(1 - 10/9).
BREVITY = math.exp(1 - 10 / 9)
HAND_BLEU_1 = 7 / 9 * BREVITY
HAND_BLEU_2 = math.sqrt(7 / 9 * 4 / 7) * BREVITY  # geometric mean of the two precisions: sqrt(4/9) = 2/3
# METEOR of meteor-1.5.jar (-l en -norm) on the tokens above, as pycocoevalcap's Meteor gives it when called on them
# directly; pinned, as METEOR (stemming, synonyms, fragmentation penalty) has no closed form worth working by hand
PINNED_METEOR = 0.384631


def no_download(*args, **kwargs):
    raise AssertionError("pycocoevalcap tried to download Stanford CoreNLP")


@pytest.fixture(scope="module")
def ptb_result():
    """The fixture scored with Java (PTBTokenizer, METEOR), SPICE's models absent; a CoreNLP download would fail it."""
    if shutil.which("java") is None:
        # Java is a system package, not a pip one: a machine without it runs the Python-tokenized metrics (tested
        # below) and skips these; BLIP_FAST_REQUIRE_JAVA=1 makes that a failure where Java must be present
        reason = "`java` is not on PATH: PTBTokenizer and METEOR are Java programs"
        if os.environ.get("BLIP_FAST_REQUIRE_JAVA") == "1":
            pytest.fail(f"BLIP_FAST_REQUIRE_JAVA=1 but {reason}", pytrace=False)
        pytest.skip(f"{reason} (BLIP_FAST_REQUIRE_JAVA=1 makes this a failure)")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("pycocoevalcap.spice.get_stanford_models.urlretrieve", no_download)
        # SPICE's models absent whatever this machine has installed: the scores below are those without SPICE
        patch.setattr(metrics_module, "missing_spice_models", lambda: ["stanford-corenlp-3.6.0.jar"])
        return caption_metrics(REFERENCES, PREDICTIONS)


def test_bleu_by_hand_with_ptb_tokens(ptb_result):
    assert ptb_result.scores["Bleu_1"] == pytest.approx(HAND_BLEU_1, rel=1e-6)
    assert ptb_result.scores["Bleu_2"] == pytest.approx(HAND_BLEU_2, rel=1e-6)


def test_meteor_runs(ptb_result):
    assert ptb_result.scores["METEOR"] == pytest.approx(PINNED_METEOR, abs=5e-5)


def test_spice_is_skipped_without_its_models_and_nothing_is_downloaded(ptb_result):
    assert list(ptb_result.scores) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]
    assert len(ptb_result.notices) == 1
    assert ptb_result.notices[0].startswith("SPICE skipped: Stanford CoreNLP 3.6.0 is not installed")
    assert "\n" not in ptb_result.notices[0]


def test_basic_tokenizer_gives_the_ptb_scores_on_plain_captions(ptb_result):
    basic = caption_metrics(REFERENCES, PREDICTIONS, java=False)
    for name in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"):
        assert basic.scores[name] == ptb_result.scores[name], name


def test_bleu_by_hand_with_basic_tokens():
    scores = caption_metrics(REFERENCES, PREDICTIONS, java=False).scores
    assert scores["Bleu_1"] == pytest.approx(HAND_BLEU_1, rel=1e-6)
    assert scores["Bleu_2"] == pytest.approx(HAND_BLEU_2, rel=1e-6)


def test_cider_by_hand():
    # 2 images, one reference each. idf of an n-gram = log(2 images) - log(max(1, images whose references hold it)):
    # "a" is in both -> 0; every other n-gram -> log 2 =: L (an n-gram no reference holds counts as in 1).
    # Image 1, "a dog sleeps" against "a dog runs":
    #   unigrams {a: 0, dog: L, sleeps: L} . {a: 0, dog: L, runs: L} = L^2, norms sqrt(2) L each -> 1/2
    #   bigrams  {a dog, dog sleeps} against {a dog, dog runs}: likewise 1/2; trigrams differ -> 0; no 4-grams -> 0
    #   equal lengths, so no length penalty: 10 * mean(1/2, 1/2, 0, 0) = 2.5
    # Image 2, "a cat sleeps" against itself: 1, 1, 1 for n = 1..3, no 4-grams: 10 * 3/4 = 7.5
    # CIDEr = mean(2.5, 7.5) = 5
    scores = caption_metrics({1: ["a dog runs"], 2: ["a cat sleeps"]}, {1: "a dog sleeps", 2: "a cat sleeps"},
                             java=False).scores
    assert scores["CIDEr"] == pytest.approx(5.0, rel=1e-9)


def test_predictions_equal_to_the_references():
    references = {1: ["a man rides a horse"], 2: ["two cats sleep on a bed"], 3: ["a red bus on the street"]}
    scores = caption_metrics(references, {image: refs[0] for image, refs in references.items()},
                             java=False).scores
    for n in (1, 2, 3, 4):
        assert scores[f"Bleu_{n}"] == pytest.approx(1.0, abs=1e-6)
    assert scores["ROUGE_L"] == pytest.approx(1.0)
    # each n-gram order has an n-gram outside some image's references: every cosine is 1, CIDEr its maximum 10
    assert scores["CIDEr"] == pytest.approx(10.0)


def test_an_empty_prediction_scores_zero_but_counts():
    scores = caption_metrics({1: ["a dog runs"], 2: ["a cat sleeps"]}, {1: "", 2: "a cat sleeps"},
                             java=False).scores
    assert scores["ROUGE_L"] == pytest.approx(0.5)
    assert scores["CIDEr"] == pytest.approx(10 * 3 / 4 / 2)


PTB_AGREEMENT = [
    "A man riding a wave on top of a surfboard.", "Two dogs playing in the snow, one is brown.",
    "A kitchen with a stove, sink, and refrigerator.", "The cat is sleeping on the laptop's keyboard.",
    'A "stop" sign on the corner of a street.', "There's a giraffe eating leaves from a tree!",
    "Is this a 2-story building?", "A woman holding an umbrella in the rain; it's wet.",
    "Three zebras: grazing in a field.", "A plate of food (broccoli, rice) on a [wooden] table.",
    "a bathroom with a toilet , sink and mirror", "A man in a t-shirt and jeans, 1,000 feet up.",
    "Children aren't playing; they're reading.", "A clock that reads 12:45 on a tower",
    "a dog's ball and the dogs' bed", "a 3.5 inch screen", "people walking down the street ...",
    "A sign says 'no parking'.", "A man wearing a hat & coat", "I cannot see, gonna look", "U.S.A. flags",
    "$5 for 50% off", "A man's DOG!!", "it is 5 o'clock", "a man -- with a hat", "I'm, you're, we've, they'll, she'd",
    "naïve café", "a man with 1/2 of a pie", "DON'T", "one;two:three",
]


@needs_java
def test_basic_tokenizer_agrees_with_ptbtokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ptb = PTBTokenizer().tokenize({i: [{"caption": caption}] for i, caption in enumerate(PTB_AGREEMENT)})
    assert [basic_tokenize(caption) for caption in PTB_AGREEMENT] == [ptb[i][0] for i in range(len(PTB_AGREEMENT))]


@pytest.mark.parametrize("caption, tokens", [
    ("A dog runs.", "a dog runs"),
    ("The dog's ball (red).", "the dog 's ball -lrb- red -rrb-"),  # brackets survive, as they do in COCO's evaluation
    ("don't, can't", "do n't ca n't"),
    ("1,000 at 10:30, 3.5 kg.", "1,000 at 10:30 3.5 kg"),
    ("U.S.A. end.", "u.s.a. end"),
])
def test_basic_tokenizer_rules(caption, tokens):
    assert basic_tokenize(caption) == tokens


def test_without_java_the_default_is_an_error_and_java_false_runs(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without java
    with pytest.raises(ValueError, match="need Java: `java` is not on PATH.*java=False"):
        caption_metrics(REFERENCES, PREDICTIONS)
    result = caption_metrics(REFERENCES, PREDICTIONS, java=False)
    assert list(result.scores) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"]
    assert result.notices == [
        "tokenized in Python (java=False), not by PTBTokenizer: close to, not always equal to, the official COCO "
        "scores",
        "METEOR skipped: it runs on Java (java=False)",
        "SPICE skipped: it runs on Java (java=False)",
    ]


def fake_java(folder, jar: str, script: str) -> None:
    """A `java` in ``folder`` that runs ``script`` (sh) when its arguments name ``jar``, the real java otherwise."""
    java = folder / "java"
    real = shutil.which("java")
    java.write_text(f'#!/bin/sh\ncase "$*" in *{jar}*) {script};; *) exec {real} "$@";; esac\n')
    java.chmod(0o755)


@needs_java
def test_a_tokenizer_failure_is_raised(monkeypatch, tmp_path):
    # PTBTokenizer's wrapper pairs the output lines with the captions without counting them: a JVM that prints nothing
    # would leave all but one caption out
    fake_java(tmp_path, "stanford-corenlp", "echo 'Error: Could not find or load main class' >&2; exit 1")
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with pytest.raises(RuntimeError, match="PTBTokenizer returned fewer lines than captions"):
        caption_metrics(REFERENCES, PREDICTIONS)


@needs_java
def test_a_meteor_failure_is_raised_and_leaves_nothing_to_hang_on(monkeypatch, tmp_path):
    # METEOR's JVM stops before scoring (as when it cannot get its 2 GB heap): pycocoevalcap would read the empty line
    # as a score, and its Meteor.__del__ would wait forever for the lock that the failed compute_score still holds
    fake_java(tmp_path, "meteor-1.5.jar", "echo 'Error: Could not reserve enough space for object heap' >&2; exit 1")
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    scorers = []

    class RecordedMeteor(Meteor):
        def __init__(self):
            super().__init__()
            scorers.append(self)

    monkeypatch.setattr(metrics_module, "Meteor", RecordedMeteor)
    with pytest.raises(RuntimeError, match="METEOR failed: Error: Could not reserve enough space"):
        caption_metrics(REFERENCES, PREDICTIONS)
    (scorer,) = scorers
    free = scorer.lock.acquire(blocking=False)
    scorer.lock.release()  # ours, or the one the failed compute_score kept: Meteor.__del__ can run either way
    assert free, "the failed METEOR scorer still holds its lock: its __del__ would wait forever"
    assert scorer.meteor_p.returncode is not None and scorer.meteor_p.stdout.closed


class FakeSpice:
    """Stands in for pycocoevalcap's Spice, whose real run takes minutes and CoreNLP."""

    failure = None

    def compute_score(self, gts, res):
        if self.failure is not None:
            raise self.failure
        assert gts == {1: ["a dog runs on the grass", "a dog is running"], 2: ["a cat sleeps on a sofa"]}
        assert res == {1: ["a dog runs"], 2: ["the cat sleeps on the sofa"]}
        return 0.25, []


@pytest.fixture
def stubbed_java(monkeypatch):
    """`java` found, the Java tools stubbed (Python tokens, METEOR 0.5): the java=True path, without Java."""
    def python_tokens(references, predictions):
        return ({image: [basic_tokenize(c) for c in captions] for image, captions in references.items()},
                {image: [basic_tokenize(caption)] for image, caption in predictions.items()})

    monkeypatch.setattr(metrics_module.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(metrics_module, "_ptb_tokenize", python_tokens)
    monkeypatch.setattr(metrics_module, "_meteor", lambda gts, res: 0.5)


@pytest.fixture
def installed_spice(monkeypatch, stubbed_java):
    """SPICE's models installed, SPICE itself a stand-in."""
    monkeypatch.setattr(metrics_module, "missing_spice_models", lambda: [])
    monkeypatch.setattr(metrics_module, "Spice", FakeSpice)
    return FakeSpice


def test_spice_without_its_models_is_skipped_and_downloads_nothing(monkeypatch, tmp_path, stubbed_java):
    monkeypatch.setattr("pycocoevalcap.spice.get_stanford_models.SPICEDIR", str(tmp_path))  # surely no models there

    def no_download(*args, **kwargs):
        raise AssertionError("pycocoevalcap tried to download Stanford CoreNLP")

    monkeypatch.setattr("pycocoevalcap.spice.get_stanford_models.urlretrieve", no_download)
    result = caption_metrics(REFERENCES, PREDICTIONS)
    assert "SPICE" not in result.scores and result.scores["METEOR"] == 0.5
    assert result.notices == [f"SPICE skipped: Stanford CoreNLP 3.6.0 is not installed ({tmp_path}/lib/stanford-corenlp"
                              f"-3.6.0.jar, {tmp_path}/lib/stanford-corenlp-3.6.0-models.jar missing); pycocoevalcap "
                              f"would download it, blip_fast does not"]


def test_spice_runs_on_the_tokens_when_its_models_are_installed(installed_spice):
    result = caption_metrics(REFERENCES, PREDICTIONS)
    assert result.scores["SPICE"] == 0.25 and result.scores["METEOR"] == 0.5
    assert list(result.scores)[-1] == "SPICE" and result.notices == []


def test_a_spice_failure_is_raised(installed_spice, monkeypatch):
    monkeypatch.setattr(installed_spice, "failure", subprocess.CalledProcessError(1, ["java"]))
    with pytest.raises(RuntimeError, match="SPICE failed \\(java exit status 1"):
        caption_metrics(REFERENCES, PREDICTIONS)


def test_missing_spice_models_looks_where_pycocoevalcap_decides_to_download(monkeypatch, tmp_path):
    # get_stanford_models downloads when SPICEDIR/SPICELIB/JAR.jar is missing: the check must follow the same constants
    monkeypatch.setattr("pycocoevalcap.spice.get_stanford_models.SPICEDIR", str(tmp_path))
    lib = tmp_path / "lib"
    lib.mkdir()
    assert missing_spice_models() == [str(lib / "stanford-corenlp-3.6.0.jar"),
                                      str(lib / "stanford-corenlp-3.6.0-models.jar")]
    (lib / "stanford-corenlp-3.6.0.jar").write_bytes(b"")
    assert missing_spice_models() == [str(lib / "stanford-corenlp-3.6.0-models.jar")]
    (lib / "stanford-corenlp-3.6.0-models.jar").write_bytes(b"")
    assert missing_spice_models() == []


@pytest.mark.parametrize("references, predictions, message", [
    ({}, {}, "no images"),
    ({1: ["a"]}, {2: "a"}, "1 without a prediction \\(first \\[1\\]\\), 1 without references \\(first \\[2\\]\\)"),
    ({1: "a dog"}, {1: "a dog"}, "references must be a non-empty list of str"),
    ({1: []}, {1: "a dog"}, "references must be a non-empty list of str"),
    ({1: ["a dog", None]}, {1: "a dog"}, "references must be a non-empty list of str"),
    ({1: ["a dog"]}, {1: ["a dog"]}, "a prediction is one str"),
])
def test_malformed_inputs_are_refused(references, predictions, message):
    with pytest.raises(ValueError, match=message):
        caption_metrics(references, predictions, java=False)


def test_caption_evaluation_without_java_stops_before_captioning(monkeypatch, tmp_path):
    from blip_fast.evaluation.captioning import evaluate_captioning

    class NeverCaptions:
        def prompt_ids(self, *args):
            raise AssertionError("captioning began although the metrics cannot run")

    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without java
    with pytest.raises(ValueError, match="need Java"):
        evaluate_captioning(NeverCaptions(), annotations=[], image_size=64)
