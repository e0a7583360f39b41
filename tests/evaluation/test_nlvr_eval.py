"""NLVR2 evaluation: the accuracy of predictions the test controls, the images and statements the model is given,
batching, and the refusal of malformed ground truth."""

import json

import pytest
import torch

from blip_fast.config import tiny_config
from blip_fast.data.annotations import NlvrAnnotations
from blip_fast.data.synth_tasks import write_task_dataset
from blip_fast.data.transforms import TransformConfig, eval_transform
from blip_fast.evaluation.nlvr import evaluate_nlvr, read_nlvr_statements
from blip_fast.images import load_image
from blip_fast.models.blip_nlvr import BlipNLVR
from blip_fast.text import BlipTokenizer, clean_caption

IMAGE_SIZE = 32

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(scope="module")
def nlvr_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("nlvr")
    write_task_dataset(out, "nlvr", 60, image_size=IMAGE_SIZE, seed=0)  # 48 training pairs, 6 dev, 6 test
    return out


def tiny_nlvr():
    torch.manual_seed(0)
    return BlipNLVR(tiny_config(image_size=IMAGE_SIZE)).eval()


def test_accuracy_of_controlled_predictions(nlvr_dir, tmp_path, monkeypatch):
    """The model answers "true" exactly when the statement says "left": the accuracy is counted by hand from the
    file, every batch gives the model each pair's first images, then their second images, the statements come
    cleaned as the original's (its "." removed), and the model is in eval mode."""
    entries = json.loads((nlvr_dir / "nlvr_test.json").read_text())
    entries.remove(next(e for e in entries if e["label"] == "True"))  # 2 true, 3 false: the majority is false
    for entry in entries:
        entry["sentence"] = entry["sentence"].capitalize() + "."
    (tmp_path / "test.json").write_text(json.dumps(entries))
    said = {clean_caption(e["sentence"], 40): e for e in entries}
    model, tokenizer, transform = tiny_nlvr().train(), BlipTokenizer(), TransformConfig.eval(IMAGE_SIZE)

    def logits(images, input_ids, attention_mask):
        assert not model.training
        sentences = tokenizer.batch_decode(input_ids)
        pairs = [said[s]["images"] for s in sentences]
        expected = [eval_transform(load_image(nlvr_dir / pair[side]), transform) for side in (0, 1) for pair in pairs]
        assert torch.equal(images, torch.stack(expected))
        true = torch.tensor([float("left" in s.split()) for s in sentences])
        return torch.stack([1 - true, true], dim=1)

    monkeypatch.setattr(model, "logits", logits)
    result = evaluate_nlvr(model, NlvrAnnotations(tmp_path / "test.json", nlvr_dir), IMAGE_SIZE, batch_size=4)
    predicted = [int("left" in clean_caption(e["sentence"], 40).split()) for e in entries]
    labels = [int(e["label"] == "True") for e in entries]
    assert model.training
    assert 0 < sum(predicted) < len(predicted)  # the predictor says both
    assert result.pairs == 5 and result.predictions == predicted
    hand = 100 * sum(p == label for p, label in zip(predicted, labels, strict=True)) / 5
    assert result.metrics == pytest.approx({"accuracy": hand, "majority_class": 60.0})
    assert result.score == pytest.approx(hand)
    assert result.summary() == f"NLVR2 on 5 statements: accuracy {hand:.2f} (majority class 60.00)"


def test_ground_truth_scores_100_and_its_opposite_0(nlvr_dir, monkeypatch):
    """Statements repeat with other labels (the dev split makes one about three pairs): the model knows the label
    by the pair's first image."""
    entries = json.loads((nlvr_dir / "nlvr_dev.json").read_text())
    transform = TransformConfig.eval(IMAGE_SIZE)
    firsts = torch.stack([eval_transform(load_image(nlvr_dir / e["images"][0]), transform) for e in entries])
    labels = torch.tensor([float(e["label"] == "True") for e in entries])
    model = tiny_nlvr()
    annotations = NlvrAnnotations(nlvr_dir / "nlvr_dev.json", nlvr_dir)
    for flip, accuracy in ((False, 100.0), (True, 0.0)):
        def logits(images, ids, mask, flip=flip):
            pair = (images[:ids.shape[0], None] == firsts[None]).flatten(2).all(dim=2).float().argmax(dim=1)
            true = labels[pair] if not flip else 1 - labels[pair]
            return torch.stack([1 - true, true], dim=1)

        monkeypatch.setattr(model, "logits", logits)
        assert evaluate_nlvr(model, annotations, IMAGE_SIZE, batch_size=4).score == accuracy


def test_predictions_are_the_models_whatever_the_batch(nlvr_dir):
    model = tiny_nlvr().train()
    annotations = NlvrAnnotations(nlvr_dir / "nlvr_test.json", nlvr_dir)
    results = [evaluate_nlvr(model, annotations, IMAGE_SIZE, batch_size=size) for size in (1, 4, 6)]
    assert model.training  # evaluated in eval mode, then given back in its mode
    assert results[0].predictions == results[1].predictions == results[2].predictions
    # the model's own logits of the first three pairs, one at a time
    model.eval()
    transform, tokenizer = TransformConfig.eval(IMAGE_SIZE), BlipTokenizer()
    for index, statement in enumerate(read_nlvr_statements(annotations, 3)):
        images = torch.stack([eval_transform(load_image(path), transform)
                              for path in (statement.first_image, statement.second_image)])
        text = tokenizer([statement.sentence], max_length=64)
        with torch.no_grad():
            logits = model.logits(images, text.input_ids, text.attention_mask)
        assert results[0].predictions[index] == int(logits.argmax())
    assert evaluate_nlvr(model, annotations, IMAGE_SIZE, limit=2).pairs == 2


@pytest.mark.parametrize("change, message", [
    (lambda e: e[1].update(label="true"), r"evaluation statement 1: .*label must be \"True\" or \"False\""),
    (lambda e: e[2].update(images=e[2]["images"][:1]), "evaluation statement 2: .*images must be a list of two"),
    (lambda e: e[3].update(sentence="..."), "evaluation statement 3: "),
    (lambda e: e[4]["images"].__setitem__(1, "images/missing.jpg"), "evaluation image: .*missing.jpg"),
])
def test_malformed_ground_truth_is_an_error(nlvr_dir, tmp_path, change, message):
    entries = json.loads((nlvr_dir / "nlvr_test.json").read_text())
    change(entries)
    (tmp_path / "split.json").write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=message):
        evaluate_nlvr(tiny_nlvr(), NlvrAnnotations(tmp_path / "split.json", nlvr_dir), IMAGE_SIZE)


def test_wrong_settings_are_refused(nlvr_dir):
    annotations = NlvrAnnotations(nlvr_dir / "nlvr_test.json", nlvr_dir)
    with pytest.raises(ValueError, match="no NLVR2 statements"):
        evaluate_nlvr(tiny_nlvr(), annotations, IMAGE_SIZE, limit=0)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        evaluate_nlvr(tiny_nlvr(), annotations, IMAGE_SIZE, batch_size=0)
