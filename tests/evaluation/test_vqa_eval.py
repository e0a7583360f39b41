"""VQA evaluation: answers ranked from the answer list against a plain loop over the answers, the official accuracy
of predictions the test controls, the submission file, batching, and the refusals (overlapping splits, malformed
ground truth)."""

import json

import pytest
import torch

from blip_fast.config import tiny_config
from blip_fast.data.annotations import VqaAnnotations
from blip_fast.data.synth_tasks import write_task_dataset
from blip_fast.data.transforms import TransformConfig, eval_transform
from blip_fast.evaluation.vqa import check_not_trained_on, evaluate_vqa, read_vqa_questions
from blip_fast.evaluation.vqa_accuracy import read_vqa_results
from blip_fast.images import load_image
from blip_fast.models.blip_vqa import BlipVQA, tokenize_answer_list
from blip_fast.models.generation import GenerationConfig
from blip_fast.text import BlipTokenizer, clean_question

IMAGE_SIZE = 32
MORE_ANSWERS = ["red circle", "big blue square", "on the left", "dark green", "two"]
DEC, SEP = 30522, 102

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(scope="module")
def vqa_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("vqa")
    write_task_dataset(out, "vqa", 20, image_size=IMAGE_SIZE, seed=0)  # 18 training images, 2 test: 10 questions
    return out


@pytest.fixture(scope="module")
def answer_list(vqa_dir):
    """The synthetic set's answers (one token each), and answers of several tokens, some sharing a first token with
    another ("red" and "red circle"), so that rows are padded and the shortlist's order matters."""
    return json.loads((vqa_dir / "answer_list.json").read_text()) + MORE_ANSWERS


def tiny_vqa(label_smoothing=0.1):
    torch.manual_seed(0)
    config = tiny_config(image_size=IMAGE_SIZE)
    config.label_smoothing = label_smoothing
    model = BlipVQA(config).eval()
    # the text matrices drawn wider than BERT's init (std 0.02), under which every question gets nearly the same
    # answer: here the picks differ between questions, and the shortlist of 1 picks otherwise than that of 4
    with torch.no_grad():
        for module, std in ((model.text_encoder, 0.1), (model.text_decoder, 0.2)):
            for name, weight in module.named_parameters():
                if weight.dim() == 2 and "word_embeddings" not in name:
                    weight.normal_(0, std)
    return model


def split_tensors(vqa_dir, answer_list, n=10):
    """Images, question tokens and answer-list tokens of the first ``n`` test questions, as the evaluation makes
    them."""
    annotations = VqaAnnotations(vqa_dir / "vqa_test.json", vqa_dir)
    questions = read_vqa_questions(annotations, n)
    images = torch.stack([eval_transform(load_image(q.image_path), TransformConfig.eval(IMAGE_SIZE))
                          for q in questions])
    text = BlipTokenizer()([q.question for q in questions], max_length=35)
    answers = tokenize_answer_list(answer_list, 64)
    return images, text.input_ids, text.attention_mask, answers


@torch.no_grad()
def plain_loop(model, image, question_ids, question_mask, answer_list):
    """One question, every answer run alone (no padding) through the decoder: the probability of its first token
    after [DEC], and its score -- its label-smoothed log-likelihood written out, the sum over its tokens of
    (1 - s) log p(token) + s * mean over the vocabulary of log p."""
    smoothing, tokenizer = model.config.label_smoothing, BlipTokenizer()
    states = model.question_states(image[None], question_ids[None], question_mask[None])
    first_probability, score = [], []
    for answer in answer_list:
        ids = tokenizer([answer], max_length=64).input_ids
        ids[0, 0] = DEC
        hidden = model.text_decoder.hidden_states(ids, None, states, question_mask[None])
        log_p = model.text_decoder.logits(hidden[0]).float().log_softmax(dim=-1)  # (L, V)
        first_probability.append(log_p[0, ids[0, 1]].exp().item())
        predicted, targets = log_p[:-1], ids[0, 1:]
        log_likelihood = predicted.gather(1, targets[:, None]).squeeze(1)
        score.append(((1 - smoothing) * log_likelihood + smoothing * predicted.mean(dim=1)).sum().item())
    return first_probability, score


@pytest.fixture(scope="module")
def reference(vqa_dir, answer_list):
    """label smoothing -> (model, split tensors, the plain loop's (first-token probabilities, scores) of each
    question), computed once a module."""
    computed = {}

    def of(label_smoothing):
        if label_smoothing not in computed:
            model = tiny_vqa(label_smoothing)
            tensors = split_tensors(vqa_dir, answer_list)
            images, ids, mask, _ = tensors
            computed[label_smoothing] = model, tensors, [plain_loop(model, images[i], ids[i], mask[i], answer_list)
                                                         for i in range(10)]
        return computed[label_smoothing]

    return of


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("k", [1, 4, "all"])
def test_rank_picks_the_best_whole_answer_among_the_first_token_shortlist(reference, answer_list, k,
                                                                          label_smoothing):
    model, (images, ids, mask, answers), loops = reference(label_smoothing)
    k = len(answer_list) if k == "all" else k
    shortlist, scores = model.score_answers(images, ids, mask, answers.input_ids, answers.attention_mask, k)
    picked = model.rank_answers(images, ids, mask, answers.input_ids, answers.attention_mask, k)
    assert shortlist.shape == scores.shape == (10, k)
    for i, (first_probability, score) in enumerate(loops):
        probability, chosen = torch.tensor(first_probability), shortlist[i]
        # the k most probable first tokens, most probable first (answers that share a first token tie: topk orders
        # them as it likes, as in the original)
        assert len(set(chosen.tolist())) == k
        torch.testing.assert_close(probability[chosen], probability.sort(descending=True).values[:k], rtol=1e-5,
                                   atol=1e-8)
        torch.testing.assert_close(scores[i], torch.tensor(score)[chosen], rtol=1e-5, atol=1e-5)
        assert picked[i] == max(chosen.tolist(), key=score.__getitem__)
    assert len(set(picked.tolist())) > 2  # the questions do not all get one answer


def test_k_at_least_the_answer_list_ranks_every_answer(reference, answer_list):
    model, (images, ids, mask, answers), loops = reference(0.1)
    everything = len(answer_list)
    for k in (everything, everything + 1, 10_000):
        shortlist, _ = model.score_answers(images, ids, mask, answers.input_ids, answers.attention_mask, k)
        assert torch.equal(shortlist.sort(dim=1).values, torch.arange(everything).expand(10, -1))
        picked = model.rank_answers(images, ids, mask, answers.input_ids, answers.attention_mask, k)
        assert picked.tolist() == [max(range(everything), key=score.__getitem__) for _, score in loops]


def test_rank_does_not_depend_on_the_batch_or_the_passes(reference):
    model, (images, ids, mask, answers), _ = reference(0.1)
    together = model.rank_answers(images, ids, mask, answers.input_ids, answers.attention_mask, 5)
    one_question_a_pass = model.rank_answers(images, ids, mask, answers.input_ids, answers.attention_mask, 5,
                                             max_rows=1)
    # alone, a question's tokens have no padding
    alone = [model.rank_answers(images[i:i + 1], ids[i:i + 1, :int(mask[i].sum())], mask[i:i + 1, :int(mask[i].sum())],
                                answers.input_ids, answers.attention_mask, 5).item() for i in range(10)]
    assert torch.equal(one_question_a_pass, together)
    assert together.tolist() == alone


def test_answer_list_tokens():
    tokens = tokenize_answer_list(["yes", "dark red", ""], 64)
    assert tokens.input_ids.tolist() == [[DEC, 2748, SEP, 0], [DEC, 2601, 2417, SEP], [DEC, SEP, 0, 0]]
    assert tokens.attention_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    with pytest.raises(ValueError, match=r"answer 1 \('one two three'\) is longer than 4 tokens"):
        tokenize_answer_list(["one two", "one two three"], 4)
    assert tokenize_answer_list(["one two"], 4).input_ids.shape == (1, 4)


def test_evaluation_batches_give_the_same_answers(vqa_dir, answer_list):
    model = tiny_vqa()
    annotations = VqaAnnotations(vqa_dir / "vqa_test_answers.json", vqa_dir)
    ranked = [evaluate_vqa(model, annotations, IMAGE_SIZE, answer_list, k=4, batch_size=size) for size in (1, 3, 10)]
    assert ranked[0].answers == ranked[1].answers == ranked[2].answers
    assert len(ranked[0].answers) == 10 and set(ranked[0].answers.values()) <= set(answer_list)


def test_generated_answers_are_the_models(vqa_dir, answer_list):
    model = tiny_vqa().train()
    images, ids, mask, _ = split_tensors(vqa_dir, answer_list, n=4)
    annotations = VqaAnnotations(vqa_dir / "vqa_test.json", vqa_dir)
    result = evaluate_vqa(model, annotations, IMAGE_SIZE, None, inference="generate", limit=4)
    assert model.training  # evaluated in eval mode, then given back in its mode
    generation = GenerationConfig(strategy="beam", max_length=10, min_length=1, num_beams=3)  # the original's
    expected = BlipTokenizer().batch_decode(model.eval().generate(images, ids, mask, generation))
    assert list(result.answers.values()) == expected
    assert result.k == result.candidates == 0
    assert "generated, beam search with 3 beams" in result.summary()


def test_evaluation_answers_are_the_models(vqa_dir, answer_list):
    model = tiny_vqa()
    images, ids, mask, answers = split_tensors(vqa_dir, answer_list, n=4)
    annotations = VqaAnnotations(vqa_dir / "vqa_test.json", vqa_dir)
    result = evaluate_vqa(model, annotations, IMAGE_SIZE, answer_list, k=4, limit=4)
    picked = model.rank_answers(images, ids, mask, answers.input_ids, answers.attention_mask, 4)
    assert list(result.answers.values()) == [answer_list[i] for i in picked.tolist()]
    assert list(result.answers) == [e["question_id"] for e in json.loads((vqa_dir / "vqa_test.json").read_text())[:4]]
    assert result.accuracy is None and result.metrics == {}
    assert "no human answers" in result.summary()
    with pytest.raises(ValueError, match="no human answers"):
        _ = result.score


HAND_QUESTIONS = [  # question, the humans' answers, answer type, what the controlled model answers
    ("Is there a circle?", ["yes"] * 10, "yes/no", "yes"),
    ("How many (shapes) are there?", ["2"] * 3 + ["3"] * 7, "number", "2"),
    ("What color is the square?", ["blue"] * 9 + ["red"], "other", "red"),
    ("What shape is on the left?", ["circle"] * 10, "other", "square"),
]


def hand_split(vqa_dir, tmp_path, with_types=True):
    image = json.loads((vqa_dir / "vqa_test.json").read_text())[0]["image"]
    entries = [{"question_id": 7 + i, "question": q, "answer": humans, "image": image, "dataset": "vqa"}
               | ({"answer_type": kind} if with_types else {})
               for i, (q, humans, kind, _) in enumerate(HAND_QUESTIONS)]
    path = tmp_path / "hand.json"
    path.write_text(json.dumps(entries))
    return path


def controlled(model, monkeypatch, answer_list):
    """The model answers each question with its answer in HAND_QUESTIONS, read back from the question tokens."""
    chosen = {clean_question(q): answer for q, _, _, answer in HAND_QUESTIONS}
    tokenizer = BlipTokenizer()

    def rank_answers(images, question_ids, question_mask, answer_ids, answer_mask, k):
        return torch.tensor([answer_list.index(chosen[q]) for q in tokenizer.batch_decode(question_ids)])

    def generate(images, question_ids, question_mask, generation):
        answers = [chosen[q] for q in tokenizer.batch_decode(question_ids)]
        return tokenizer(answers, max_length=10).input_ids

    monkeypatch.setattr(model, "rank_answers", rank_answers)
    monkeypatch.setattr(model, "generate", generate)


@pytest.mark.parametrize("inference", ["rank", "generate"])
def test_accuracy_of_controlled_answers(vqa_dir, answer_list, tmp_path, monkeypatch, inference):
    model = tiny_vqa()
    controlled(model, monkeypatch, answer_list)
    result = evaluate_vqa(model, VqaAnnotations(hand_split(vqa_dir, tmp_path), vqa_dir), IMAGE_SIZE, answer_list,
                          inference=inference, batch_size=3)
    # by hand: 10 of 10 humans -> 100; "2" by 3 of 10: the 3 see 2 others (2/3), the 7 see 3 (1) -> 90;
    # "red" by 1 of 10: that one sees none (0), the 9 see 1 (1/3) -> 30; "square" by none -> 0
    per_question = {7: 100.0, 8: 90.0, 9: 30.0, 10: 0.0}
    assert result.accuracy.per_question == pytest.approx(per_question, abs=1e-9)
    assert result.metrics == pytest.approx({"accuracy": 55.0, "accuracy_yes/no": 100.0, "accuracy_number": 90.0,
                                            "accuracy_other": 15.0}, abs=1e-9)
    assert result.score == pytest.approx(55.0)
    assert result.answers == {7: "yes", 8: "2", 9: "red", 10: "square"}
    assert "accuracy 55.00 (yes/no 100.00, number 90.00, other 15.00)" in result.summary()
    assert read_vqa_results(result.write_answers(tmp_path / "results.json")) == result.answers
    assert json.loads((tmp_path / "results.json").read_text())[0] == {"question_id": 7, "answer": "yes"}


def test_accuracy_without_answer_types(vqa_dir, answer_list, tmp_path, monkeypatch):
    model = tiny_vqa()
    controlled(model, monkeypatch, answer_list)
    result = evaluate_vqa(model, VqaAnnotations(hand_split(vqa_dir, tmp_path, with_types=False), vqa_dir),
                          IMAGE_SIZE, answer_list)
    assert result.metrics == pytest.approx({"accuracy": 55.0})
    assert result.summary().endswith("accuracy 55.00")


def test_synthetic_ground_truth_scores_100(vqa_dir, answer_list, monkeypatch):
    """Answering every question with the humans' majority answer scores 100 on the synthetic test split (at most
    3 of its 10 humans dissent, so the majority answer has at least 7)."""
    entries = json.loads((vqa_dir / "vqa_test_answers.json").read_text())
    truth = {clean_question(e["question"]): max(set(e["answer"]), key=e["answer"].count) for e in entries}
    model, tokenizer = tiny_vqa(), BlipTokenizer()
    monkeypatch.setattr(model, "rank_answers", lambda images, ids, mask, answer_ids, answer_mask, k: torch.tensor(
        [answer_list.index(truth[q]) for q in tokenizer.batch_decode(ids)]))
    result = evaluate_vqa(model, VqaAnnotations(vqa_dir / "vqa_test_answers.json", vqa_dir), IMAGE_SIZE,
                          answer_list)
    assert result.questions == 10 and result.score == pytest.approx(100.0)


def test_training_questions_are_refused(vqa_dir, tmp_path):
    train, test = vqa_dir / "vqa_train.json", vqa_dir / "vqa_test_answers.json"
    check_not_trained_on([train], test)
    with pytest.raises(ValueError, match=r"90 of the 90 evaluation questions are training questions too "
                                         r"\(.*vqa_train.json; first question ids \[0, 1, 2, 3, 4\]\)"):
        check_not_trained_on(train, train)
    # one training question among the held-out ones
    held_out = json.loads(test.read_text())
    leaked = json.loads(train.read_text())[5] | {"dataset": "vqa"}
    (tmp_path / "leaky.json").write_text(json.dumps(held_out + [leaked]))
    leaked_id = leaked["question_id"]
    with pytest.raises(ValueError, match=rf"1 of the 11 evaluation questions .* first question ids \[{leaked_id}\]"):
        check_not_trained_on(train, tmp_path / "leaky.json")
    # Visual Genome numbers its questions on its own: the same number there is another question
    (tmp_path / "vg.json").write_text(json.dumps([dict(leaked, dataset="vg")]))
    check_not_trained_on(tmp_path / "vg.json", train)


def write_split(tmp_path, entries):
    path = tmp_path / "split.json"
    path.write_text(json.dumps(entries))
    return path


@pytest.mark.parametrize("change, message", [
    (lambda e: e[1].pop("answer"), r"9 evaluation questions have the humans' answers \(\"answer\"\) and 1 do not"),
    (lambda e: e[2].update(answer=["yes"]), "must be a list of at least two human answers"),
    (lambda e: e[2].update(answer="yes"), "must be a list of at least two human answers"),
    (lambda e: e[3].update(question_id=e[0]["question_id"]), "is given twice"),
    (lambda e: e[3].update(question_id="12"), "question_id must be an int"),
    (lambda e: e[4].update(question="..."), "evaluation question 4: .*unusable question"),
    (lambda e: e[5].update(image="images/missing.jpg"), "evaluation image: .*missing.jpg"),
    (lambda e: e[6].update(answer_type="other"), "1 evaluation questions have an answer_type and 9 do not"),
])
def test_malformed_ground_truth_is_an_error(vqa_dir, answer_list, tmp_path, change, message):
    entries = json.loads((vqa_dir / "vqa_test_answers.json").read_text())
    change(entries)
    with pytest.raises(ValueError, match=message):
        evaluate_vqa(tiny_vqa(), VqaAnnotations(write_split(tmp_path, entries), vqa_dir), IMAGE_SIZE, answer_list)


def test_wrong_settings_are_refused(vqa_dir, answer_list):
    annotations = VqaAnnotations(vqa_dir / "vqa_test.json", vqa_dir)
    with pytest.raises(ValueError, match="rank inference needs the answer list"):
        evaluate_vqa(tiny_vqa(), annotations, IMAGE_SIZE, None)
    with pytest.raises(ValueError, match="inference must be one of rank, generate"):
        evaluate_vqa(tiny_vqa(), annotations, IMAGE_SIZE, answer_list, inference="beam")
    with pytest.raises(ValueError, match="no VQA questions"):
        evaluate_vqa(tiny_vqa(), annotations, IMAGE_SIZE, answer_list, limit=0)
