"""VqaBatches and NlvrBatches on the synthetic task sets (``blip-fast data synth --task vqa|nlvr``).

What is checked: that a batch lines up with the annotation entries (VQA: cleaned questions, every answer of each
question in order with the weights the original computes, the counts that split them; NLVR2: first images then
second images, labels, cleaned statements); NLVR2's swap (half the pairs, images exchanged and ``left``/``right``
exchanged, the label kept); that the models take the batches as they come; bad entries skipped and counted (a
second image's repairs too); exact resuming mid-epoch and across epochs, with workers; disjoint, complete ranks;
determinism in the seed whatever the worker count.
"""

import json

import pytest
import torch
from data_helpers import encode, photo_like, write_json

import blip_fast
from blip_fast.config import tiny_config
from blip_fast.data.annotations import NlvrAnnotations, VqaAnnotations
from blip_fast.data.decode import decode_image, read_image_file
from blip_fast.data.synth_tasks import write_task_dataset
from blip_fast.data.task_batches import NlvrBatch, NlvrBatches, VqaBatch, VqaBatches, exchange_sides
from blip_fast.data.transforms import PilTransform, TransformConfig
from blip_fast.text.clean import clean_caption, clean_question
from blip_fast.text.tokenizer import BlipTokenizer

TRAIN = TransformConfig.finetune(32, augment_ops=("Identity", "Rotate", "AutoContrast", "Equalize"))
EVAL = TransformConfig.eval(32)


@pytest.fixture(scope="module")
def vqa_dir(tmp_path_factory):
    """8 scenes of 48 px: 35 training questions (7 images x 5), 5 test questions."""
    out = tmp_path_factory.mktemp("vqa")
    write_task_dataset(out, "vqa", 8, image_size=48, seed=1)
    return out


@pytest.fixture(scope="module")
def vqa_entries(vqa_dir):
    """The training questions and three Visual Genome ones (one answer as a string, weight 0.2; a question with what
    ``pre_question`` removes)."""
    entries = json.loads((vqa_dir / "vqa_train.json").read_text())
    entries += [{"question_id": 90000 + k, "question": f'What is the "shape" #{k}...', "answer": f"a red circle {k}",
                 "image": entries[k]["image"], "dataset": "vg"} for k in range(3)]
    return entries


@pytest.fixture(scope="module")
def vqa_train(vqa_dir, vqa_entries):
    return VqaAnnotations(write_json(vqa_dir / "train_vg.json", vqa_entries), {"vqa": vqa_dir, "vg": vqa_dir})


@pytest.fixture(scope="module")
def nlvr_dir(tmp_path_factory):
    """30 pairs of 48 px: 24 training pairs, 3 dev, 3 test."""
    out = tmp_path_factory.mktemp("nlvr")
    write_task_dataset(out, "nlvr", 30, image_size=48, seed=2)
    return out


@pytest.fixture(scope="module")
def nlvr_entries(nlvr_dir):
    """The training pairs, the first with a statement of 47 words (cut at 40)."""
    entries = json.loads((nlvr_dir / "nlvr_train.json").read_text())
    entries[0]["sentence"] = " ".join([entries[0]["sentence"]] + ["and the left image is nice"] * 7)
    return entries


@pytest.fixture(scope="module")
def nlvr_train(nlvr_dir, nlvr_entries):
    return NlvrAnnotations(write_json(nlvr_dir / "train_long.json", nlvr_entries), nlvr_dir)


def original_answers(entry) -> tuple[list[str], list[float]]:
    """``vqa_dataset.__getitem__`` of the original (train split): the answers and their weights."""
    if entry["dataset"] == "vqa":
        answer_weight = {}
        for answer in entry["answer"]:
            if answer in answer_weight:
                answer_weight[answer] += 1 / len(entry["answer"])
            else:
                answer_weight[answer] = 1 / len(entry["answer"])
        return list(answer_weight.keys()), list(answer_weight.values())
    return [entry["answer"]], [0.2]


def tokens(tokenizer: BlipTokenizer, text: str, max_length: int = 512) -> list[int]:
    return tokenizer([text], max_length=max_length).input_ids[0].tolist()


def rows(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """Each row's real tokens, after checking that padding is only at its end."""
    assert torch.equal(mask, (ids != 0).long())
    assert ids.shape[1] == mask.sum(1).max()                    # padded to the longest of the batch
    return [row[:n].tolist() for row, n in zip(ids, mask.sum(1), strict=True)]


def take(batches, n: int) -> list:
    """The first ``n`` batches over successive epochs, stopping in the middle of one."""
    out = []
    while len(out) < n:
        for batch in batches:
            out.append(batch)
            if len(out) == n:
                break
    return out


def until_epoch(batches, epoch: int) -> list:
    out = []
    while batches.epoch < epoch:
        out += list(batches)
    return out


def assert_same(got: list, want: list):
    assert [b.keys for b in got] == [b.keys for b in want]
    for a, b in zip(got, want, strict=True):
        for name, value in vars(a).items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, getattr(b, name)), f"{name} differs in batch {a.keys}"


def images_by_key(batches: list[NlvrBatch]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for batch in batches:
        n = len(batch)
        for i, key in enumerate(batch.keys):
            out[key] = (batch.images[i], batch.images[n + i])
    return out


# ---------------------------------------------------------------------------------------------
# What a batch holds
# ---------------------------------------------------------------------------------------------

def test_vqa_batches_line_up_with_the_entries(vqa_train, vqa_entries):
    tokenizer = BlipTokenizer()
    by_key = {str(e["question_id"]): e for e in vqa_entries}
    got = list(VqaBatches(vqa_train, TRAIN, 4, seed=1, drop_last=False))
    assert all(isinstance(b, VqaBatch) for b in got) and sum(map(len, got)) == len(vqa_entries) == 38
    assert {key for b in got for key in b.keys} == set(by_key)
    shared = 0
    for batch in got:
        n = len(batch)
        assert batch.images.shape == (n, 3, 32, 32) and batch.images.dtype == torch.float32
        assert batch.answers_per_question.dtype == torch.long and batch.weights.dtype == torch.float32
        assert batch.answer_ids.shape[0] == batch.weights.shape[0] == batch.answers_per_question.sum()
        questions = rows(batch.question_ids, batch.question_mask)
        answers = rows(batch.answer_ids, batch.answer_mask)
        want_weights, first = [], 0
        for key, question, count in zip(batch.keys, questions, batch.answers_per_question.tolist(), strict=True):
            entry = by_key[key]
            assert question == tokens(tokenizer, clean_question(entry["question"]), 35)
            assert question[0] == tokenizer.cls_token_id
            texts, weights = original_answers(entry)
            assert answers[first:first + count] == [tokens(tokenizer, text) for text in texts]
            want_weights += weights
            shared += count > 1
            first += count
        assert torch.equal(batch.weights, torch.Tensor(want_weights))     # vqa_collate_fn's torch.Tensor
    assert shared > 0, "no question with several answers: the weights are not tested"
    moved = got[0].to("cpu", non_blocking=True)
    assert torch.equal(moved.answer_ids, got[0].answer_ids) and moved.keys == got[0].keys


def test_nlvr_batches_hold_first_images_then_second_images(nlvr_dir, nlvr_entries, nlvr_train):
    tokenizer = BlipTokenizer()
    entries = nlvr_entries
    assert len(entries[0]["sentence"].split()) > 40
    transform = PilTransform(EVAL)

    def image(path):
        return transform(decode_image(read_image_file(nlvr_dir / path)))

    got = list(NlvrBatches(nlvr_train, EVAL, 5, seed=1, swap=False, drop_last=False))
    assert all(isinstance(b, NlvrBatch) for b in got) and sum(map(len, got)) == 24
    for batch in got:
        n = len(batch)
        assert batch.images.shape == (2 * n, 3, 32, 32) and batch.targets.shape == (n,)
        assert batch.targets.dtype == torch.long
        for i, (key, sentence) in enumerate(zip(batch.keys, rows(batch.input_ids, batch.attention_mask),
                                                strict=True)):
            entry = entries[int(key)]
            assert torch.equal(batch.images[i], image(entry["images"][0]))
            assert torch.equal(batch.images[n + i], image(entry["images"][1]))
            assert batch.targets[i] == (entry["label"] == "True")
            assert sentence == tokens(tokenizer, clean_caption(entry["sentence"], 40))
    assert {0, 1} == {t for b in got for t in b.targets.tolist()}


def test_nlvr_swaps_half_the_pairs_with_left_and_right(nlvr_entries, nlvr_train):
    tokenizer = BlipTokenizer()
    entries = nlvr_entries

    def epoch(swap):
        batches = list(NlvrBatches(nlvr_train, TRAIN, 4, seed=3, swap=swap, drop_last=False))
        texts = {key: tokenizer.decode(ids) for b in batches for key, ids in zip(b.keys, b.input_ids, strict=True)}
        targets = {key: t for b in batches for key, t in zip(b.keys, b.targets.tolist(), strict=True)}
        return images_by_key(batches), texts, targets

    kept_images, kept_texts, kept_targets = epoch(swap=False)
    images, texts, targets = epoch(swap=True)
    assert targets == kept_targets == {str(i): int(e["label"] == "True") for i, e in enumerate(entries)}
    swapped, sided = set(), 0
    for key, (first, second) in images.items():
        plain = clean_caption(entries[int(key)]["sentence"], 40)
        assert kept_texts[key] == plain
        if torch.equal(first, kept_images[key][0]):
            assert torch.equal(second, kept_images[key][1]) and texts[key] == plain
            continue
        # each image keeps its own draw: a swapped pair is the unswapped one in the other order
        assert torch.equal(first, kept_images[key][1]) and torch.equal(second, kept_images[key][0])
        assert texts[key] == exchange_sides(plain)
        swapped.add(key)
        sided += texts[key] != plain
    assert 6 <= len(swapped) <= 18, f"{len(swapped)} of 24 pairs swapped"
    assert 0 < sided < len(swapped), "no swapped statement names a side, or every one does"


def test_exchange_sides_swaps_whole_words_only():
    assert exchange_sides("the left image has more shapes than the right image") == \
        "the right image has more shapes than the left image"
    assert exchange_sides("a leftover shape, right?") == "a leftover shape, right?"


def test_the_models_take_the_batches(vqa_train, nlvr_train):
    config = tiny_config(32)
    positions = config.text.max_position_embeddings
    vqa = next(iter(VqaBatches(vqa_train, TRAIN, 4, answer_max_length=positions)))
    loss = blip_fast.build_model("vqa", config)(vqa.images, vqa.question_ids, vqa.question_mask, vqa.answer_ids,
                                                vqa.answer_mask, vqa.weights, vqa.answers_per_question)
    assert loss.ndim == 0 and torch.isfinite(loss)
    nlvr = next(iter(NlvrBatches(nlvr_train, TRAIN, 4, max_length=positions)))
    loss = blip_fast.build_model("nlvr", config)(nlvr.images, nlvr.input_ids, nlvr.attention_mask, nlvr.targets)
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_task_batches_pin_their_tensors_for_a_gpu(vqa_train, nlvr_train, monkeypatch):
    """With ``pin_memory`` (the trainers ask for it on a GPU) each batch's tensors are pinned through its
    ``pin_memory``; without a GPU the DataLoader pins nothing, so pinning is recorded here instead of done."""
    pinned = []

    def pin(tensor):
        pinned.append(tensor.data_ptr())
        return tensor.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    for batches in (VqaBatches(vqa_train, TRAIN, 4, pin_memory=True),
                    NlvrBatches(nlvr_train, TRAIN, 4, pin_memory=True)):
        assert batches._loader._loader_options["pin_memory"] is True
        batch = next(iter(batches))
        pinned.clear()
        again = batch.pin_memory()
        assert type(again) is type(batch) and again.keys == batch.keys
        assert pinned == [t.data_ptr() for t in batch._tensors()]  # every tensor, in order
        for mine, theirs in zip(again._tensors(), batch._tensors(), strict=True):
            assert torch.equal(mine, theirs)


# ---------------------------------------------------------------------------------------------
# Bad entries
# ---------------------------------------------------------------------------------------------

def test_bad_vqa_entries_are_skipped_and_counted(vqa_dir, tmp_path):
    good = json.loads((vqa_dir / "vqa_train.json").read_text())[:6]
    image = good[0]["image"]
    bad = [{"question_id": 1, "question": "what color?", "image": image, "dataset": "vqa"},      # a test entry
           {"question_id": 2, "question": "what color?", "answer": ["", " "], "image": image, "dataset": "vqa"},
           {"question_id": 3, "question": "...", "answer": ["red"], "image": image, "dataset": "vqa"},
           {"question_id": 4, "question": "what?", "answer": ["red"], "image": "images/nope.jpg", "dataset": "vqa"},
           ["not", "an", "entry"]]
    batches = VqaBatches(VqaAnnotations(write_json(tmp_path / "bad.json", good + bad), vqa_dir), EVAL, 4,
                         drop_last=False)
    keys = [key for batch in batches for key in batch.keys]
    assert sorted(keys) == sorted(str(e["question_id"]) for e in good)
    assert dict(batches.stats.skipped) == {"no_answer": 2, "no_question": 1, "missing_image": 1, "bad_record": 1}
    assert batches.stats.samples == 6


def test_bad_nlvr_entries_are_skipped_and_counted(nlvr_dir, tmp_path):
    good = json.loads((nlvr_dir / "nlvr_train.json").read_text())[:6]
    for entry in good:
        entry["images"] = [str(nlvr_dir / path) for path in entry["images"]]
    jpeg = encode(photo_like(40, 40, seed=1), quality=90)
    (tmp_path / "cut.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    (tmp_path / "no_end.jpg").write_bytes(jpeg[:-2])
    first = good[0]["images"][0]
    bad = [{"images": [first], "sentence": "one image", "label": "True"},
           {"images": [first, first], "sentence": "a typo", "label": "ture"},
           {"images": [first, first], "sentence": "!!", "label": "True"},
           {"images": [first, first], "sentence": "- " * 45 + "dog", "label": "True"},     # no word in the first 40
           {"images": [first, str(tmp_path / "missing.jpg")], "sentence": "missing", "label": "False"},
           {"images": [first, str(tmp_path / "cut.jpg")], "sentence": "cut", "label": "False"},
           {"images": [first, str(tmp_path / "no_end.jpg")], "sentence": "repaired", "label": "False"}]
    batches = NlvrBatches(NlvrAnnotations(write_json(tmp_path / "bad.json", good + bad)), EVAL, 4, drop_last=False,
                          num_workers=1)
    keys = [key for batch in batches for key in batch.keys]
    assert sorted(keys, key=int) == [str(i) for i in range(6)] + ["12"]     # the repaired second image is kept
    stats = batches.stats
    assert dict(stats.skipped) == {"bad_record": 2, "no_caption": 2, "missing_image": 1, "corrupt_image": 1}
    assert stats.fixed["jpeg_end_marker_missing"] == 1 and stats.samples == 7


# ---------------------------------------------------------------------------------------------
# Resuming, ranks, determinism
# ---------------------------------------------------------------------------------------------

def make_vqa(source, seed=7, **settings):
    return VqaBatches(source, TRAIN, 4, seed=seed, **settings)


def make_nlvr(source, seed=7, **settings):
    return NlvrBatches(source, TRAIN, 3, seed=seed, **settings)


@pytest.mark.parametrize("kind", ["vqa", "nlvr"])
def test_resume_is_exact_mid_epoch_and_across_epochs(kind, vqa_train, nlvr_train):
    make, source = (make_vqa, vqa_train) if kind == "vqa" else (make_nlvr, nlvr_train)
    full = until_epoch(make(source, num_workers=2), 2)
    half = len(full) // 2
    for cut in (3, half, half + 2):
        first = make(source, num_workers=2)
        head = take(first, cut)
        state = json.loads(json.dumps(first.state_dict()))             # a checkpoint holds it as JSON
        resumed = make(source, num_workers=2)
        resumed.load_state_dict(state)
        assert resumed.epoch == first.epoch and resumed.stats.to_dict() == first.stats.to_dict()
        assert_same(head + until_epoch(resumed, 2), full)
    assert [b.keys for b in full[:half]] != [b.keys for b in full[half:]]     # epochs are shuffled anew


@pytest.mark.parametrize("kind", ["vqa", "nlvr"])
def test_ranks_split_the_data_disjointly_and_completely(kind, vqa_train, nlvr_train):
    make, source = (make_vqa, vqa_train) if kind == "vqa" else (make_nlvr, nlvr_train)
    keys = [[key for batch in make(source, rank=rank, world_size=2, drop_last=False) for key in batch.keys]
            for rank in range(2)]
    every = [key for batch in make(source, drop_last=False) for key in batch.keys]
    assert abs(len(keys[0]) - len(keys[1])) <= 1
    assert not set(keys[0]) & set(keys[1]) and sorted(keys[0] + keys[1]) == sorted(every)
    assert len(every) == len(source)


@pytest.mark.parametrize("kind", ["vqa", "nlvr"])
def test_batches_are_a_function_of_the_seed(kind, vqa_train, nlvr_train):
    make, source = (make_vqa, vqa_train) if kind == "vqa" else (make_nlvr, nlvr_train)

    def by_key(batches) -> dict:
        """Each sample's tensors (its images, its tokens), whichever batch it came in."""
        out = {}
        for batch in batches:
            n = len(batch)
            ids, mask = (batch.question_ids, batch.question_mask) if kind == "vqa" else (batch.input_ids,
                                                                                           batch.attention_mask)
            for i, key in enumerate(batch.keys):
                pair = (batch.images[i],) if kind == "vqa" else (batch.images[i], batch.images[n + i])
                out[key] = pair + (ids[i][mask[i].bool()],)       # the tokens without the batch's padding
        return out

    def same(a: dict, b: dict) -> bool:
        return a.keys() == b.keys() and all(torch.equal(x, y) for k in a for x, y in zip(a[k], b[k], strict=True))

    once, again = make(source, drop_last=False), make(source, drop_last=False)
    first, second = list(once), list(again)
    assert_same(first, second)
    workers = by_key(make(source, drop_last=False, num_workers=2))
    assert same(by_key(first), workers)              # the same crops and swaps whatever the worker count
    next_epoch = by_key(once)
    assert not same(by_key(first), next_epoch) and next_epoch.keys() == workers.keys()   # new draws each epoch
    other_seed = list(make(source, seed=8, drop_last=False))
    assert [b.keys for b in other_seed] != [b.keys for b in first] and not same(by_key(other_seed), by_key(first))


def test_user_mistakes_are_clear_errors(vqa_train, nlvr_train):
    with pytest.raises(ValueError, match="reads VqaAnnotations"):
        VqaBatches(nlvr_train, TRAIN, 4)
    with pytest.raises(ValueError, match="reads NlvrAnnotations"):
        NlvrBatches(vqa_train, TRAIN, 4)
    with pytest.raises(ValueError, match="batch_size"):
        VqaBatches(vqa_train, TRAIN, 0)
    with pytest.raises(ValueError, match="answer_max_length"):
        VqaBatches(vqa_train, TRAIN, 4, answer_max_length=1)
    with pytest.raises(ValueError, match="max_words"):
        NlvrBatches(nlvr_train, TRAIN, 4, max_words=0)
    with pytest.raises(ValueError, match="not a NlvrBatches state"):
        NlvrBatches(nlvr_train, TRAIN, 4).load_state_dict({"epoch": 1})
    with pytest.raises(ValueError, match="batch_size"):
        NlvrBatches(nlvr_train, TRAIN, 3).load_state_dict(NlvrBatches(nlvr_train, TRAIN, 4).state_dict())
