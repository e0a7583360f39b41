"""``blip-fast data synth --task``: downstream sets our readers read, whose every text is true of its scene.

The checks re-derive each caption, answer and label from ``scenes.json`` with their own reading of the
words (not the writer's tables), so a writer that says something false of a scene fails them.
"""

import json
import re
from collections import Counter
from pathlib import PurePosixPath

import pytest

from blip_fast.cli import main
from blip_fast.data import synth_tasks
from blip_fast.data.annotations import CaptionAnnotations, RetrievalAnnotations, VqaAnnotations, load_json_list
from blip_fast.data.sample import DataStats
from blip_fast.data.synth import write_synthetic_dataset
from blip_fast.data.synth_tasks import write_task_dataset
from blip_fast.data.synthetic import SceneObject, caption

ARGS = dict(n=20, image_size=32, seed=3)
SIZES = {"big": "big", "large": "big", "small": "small", "little": "small"}
PLACES = {"left": "on the left", "right": "on the right", "top": "at the top", "upper": "at the top",
          "bottom": "at the bottom", "lower": "at the bottom", "middle": "in the middle", "center": "in the middle"}


def files(root) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def folders(root) -> set:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_dir()}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Each task's set, 20 images (nlvr: pairs) of 32 px."""
    root = tmp_path_factory.mktemp("tasks")
    return {task: (root / task, write_task_dataset(root / task, task, **ARGS)) for task in ("retrieval", "vqa", "nlvr")}


def scenes_of(out) -> dict:
    return {path: sorted((o["color"], o["shape"], o["size"], o["place"]) for o in scene)
            for path, scene in json.loads((out / "scenes.json").read_text()).items()}


def objects_named(text: str) -> list:
    """The objects a caption names, read back as (color, shape, size, place)."""
    text = re.sub(r"^(a picture of|there is|an image of|a drawing of) ", "", text)
    objects = []
    for phrase in text.split(" and "):
        size, color, shape, place = re.fullmatch(r"a (\w+) (\w+) (\w+) (.+)", phrase).groups()
        [where] = [PLACES[word] for word in place.split() if word in PLACES]
        objects.append((color, shape, SIZES[size], where))
    return sorted(objects)


def test_caption_keeps_its_one_wording():
    scene = [SceneObject("red", "circle", "big", "on the left"), SceneObject("blue", "square", "small", "at the top")]
    assert caption(scene) == "a big red circle on the left and a small blue square at the top"


# --- retrieval ---------------------------------------------------------------------------------------------------

def test_retrieval_reads_as_karpathy_with_five_true_captions_per_image(written):
    out, info = written["retrieval"]
    scenes = scenes_of(out)
    assert info["task"] == "retrieval"
    assert {s: (e["images"], e["captions"]) for s, e in info["splits"].items()} == {
        "train": (16, 80), "val": (2, 10), "test": (2, 10)}
    train = CaptionAnnotations(out / "train.json", out)
    assert len(train) == 80 and list(train.img_ids) == [f"{i:06d}" for i in range(16)]
    by_image = {}
    for index in range(len(train)):
        sample = train.sample(index, DataStats())
        image = PurePosixPath(sample.image_path).relative_to(out).as_posix()
        assert image == f"images/{sample.extra['image_id']}.jpg" and (out / image).is_file()
        assert sample.extra["img_id"] == int(sample.extra["image_id"])
        by_image.setdefault(image, []).append(sample.caption)
    for split, first in (("val", 16), ("test", 18)):
        entries = load_json_list(out / f"{split}.json")
        assert all(set(entry) == {"image", "caption"} for entry in entries)
        source = RetrievalAnnotations(out / f"{split}.json", out)
        assert source.img2txt == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]] and source.txt2img == [0] * 5 + [1] * 5
        for index in range(len(source)):
            sample = source.sample(index, DataStats())
            assert sample.image_path == str(out / f"images/{first + index:06d}.jpg")
            by_image[entries[index]["image"]] = sample.caption
    assert by_image.keys() == scenes.keys() and len(scenes) == 20
    for image, texts in by_image.items():
        assert len(texts) == len(set(texts)) == 5, texts
        for text in texts:
            assert objects_named(text) == scenes[image], (image, text)
    words = " ".join(text for texts in by_image.values() for text in texts).split()
    assert {"large", "little", "center", "there", "picture"} <= set(words)      # the wordings really vary


# --- vqa ---------------------------------------------------------------------------------------------------------

def only(objects: list):
    """The one object a question or statement names (it must be the only one of its kind)."""
    [obj] = objects
    return obj


SHORT_PLACES = {"on the left": "left", "on the right": "right", "at the top": "top", "at the bottom": "bottom",
                "in the middle": "middle"}
# every form of question, and its answer read from a scene of (color, shape, size, place) tuples
QUESTIONS = {
    "count": (r"how many shapes are there\?", lambda s, m: str(len(s))),
    "count shape": (r"how many (circle|square|triangle)s are there\?", lambda s, m: str(sum(o[1] == m[1] for o in s))),
    "is there": (r"is there a (?:(\w+) )?(\w+)\?",
                 lambda s, m: "yes" if any(o[1] == m[2] and m[1] in (None, o[0]) for o in s) else "no"),
    "color of shape": (r"what color is the (\w+)\?", lambda s, m: only([o for o in s if o[1] == m[1]])[0]),
    "color at place": (r"what color is the shape (.+)\?", lambda s, m: only([o for o in s if o[3] == m[1]])[0]),
    "shape at place": (r"what shape is (.+)\?", lambda s, m: only([o for o in s if o[3] == m[1]])[1]),
    "place": (r"where is the (\w+) (\w+)\?", lambda s, m: SHORT_PLACES[only([o for o in s if o[:2] == m.groups()])[3]]),
    "size": (r"is the (\w+) (\w+) big or small\?", lambda s, m: only([o for o in s if o[:2] == m.groups()])[2]),
}


def true_answer(question: str, scene: list) -> tuple[str, str]:
    """(the question's form, its answer)."""
    [(form, pattern, answer)] = [(form, pattern, answer) for form, (pattern, answer) in QUESTIONS.items()
                                 if re.fullmatch(pattern, question)]
    return form, answer(scene, re.fullmatch(pattern, question))


def test_vqa_reads_as_vqa_v2_and_answers_the_scene(written):
    out, info = written["vqa"]
    scenes = scenes_of(out)
    assert info["task"] == "vqa" and {s: e["questions"] for s, e in info["splits"].items()} == {"train": 90, "test": 10}
    answer_list = load_json_list(out / "answer_list.json")
    train = load_json_list(out / "vqa_train.json")
    test = load_json_list(out / "vqa_test.json")
    test_answers = load_json_list(out / "vqa_test_answers.json")
    assert all(set(e) == {"question_id", "question", "answer", "image", "dataset"} for e in train + test_answers)
    assert test == [{k: v for k, v in e.items() if k != "answer"} for e in test_answers]
    ids = [e["question_id"] for e in train + test]
    assert len(set(ids)) == len(ids) and all(type(i) is int for i in ids)
    source = VqaAnnotations(out / "vqa_train.json", out)
    dissent, forms, yes_no = 0, Counter(), Counter()
    for index, entry in enumerate(train + test_answers):
        assert entry["dataset"] == "vqa" and len(entry["answer"]) == 10 and set(entry["answer"]) <= set(answer_list)
        votes = Counter(entry["answer"])
        truth, count = votes.most_common(1)[0]
        form, answer = true_answer(entry["question"], scenes[entry["image"]])
        assert truth == answer, entry
        forms[form] += 1
        yes_no[answer] += form == "is there"
        assert count >= 7                               # the dissenters never outvote the truth
        dissent += count < 10
        if index < len(train):                          # the weights as the original's vqa_dataset computes them
            extra = source.sample(index, DataStats()).extra
            assert dict(zip(extra["answers"], extra["weights"], strict=True)) == pytest.approx(
                {answer: n / 10 for answer, n in votes.items()})
    assert 0.1 < dissent / len(train + test) < 0.7      # some questions split the humans: min(n / 3, 1) matters
    assert forms.keys() == QUESTIONS.keys(), forms      # every form of question is asked
    assert abs(yes_no["yes"] - yes_no["no"]) <= 0.5 * forms["is there"], yes_no   # "is there" is not always "no"
    assert not any("answers" in VqaAnnotations(out / "vqa_test.json", out).sample(i, DataStats()).extra
                   for i in range(len(test)))


# --- nlvr --------------------------------------------------------------------------------------------------------

NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")


def named_by(thing: str):
    """Which objects ``a big red circle``, ``a triangle``, ``a green shape``... names."""
    words = thing.split()[1:]
    shape = None if words[-1] == "shape" else words[-1]
    return lambda o: (shape in (None, o[1]) and all(w in (o[0], o[2]) for w in words[:-1]))


# every form of statement, and whether it is true of the pair {"left": scene, "right": scene}
STATEMENTS = {
    "exactly": (r"the (left|right) image contains exactly (\w+) shapes?",
                lambda p, m: len(p[m[1]]) == NUMBERS.index(m[2])),
    "contains": (r"the (left|right) image contains (a [a-z ]+)", lambda p, m: any(map(named_by(m[2]), p[m[1]]))),
    "both": (r"both images contain (a [a-z ]+)", lambda p, m: all(any(map(named_by(m[1]), s)) for s in p.values())),
    "neither": (r"neither image contains (a [a-z ]+)",
                lambda p, m: not any(map(named_by(m[1]), p["left"] + p["right"]))),
    "more": (r"the (left|right) image has more shapes than the (left|right) image",
             lambda p, m: m[1] != m[2] and len(p[m[1]]) > len(p[m[2]])),
    "same": (r"both images have the same number of shapes", lambda p, m: len(p["left"]) == len(p["right"])),
    "total": (r"there are (\w+) shapes in total", lambda p, m: len(p["left"]) + len(p["right"]) == NUMBERS.index(m[1])),
}


def true_statement(sentence: str, left: list, right: list) -> tuple[str, str]:
    """(the sentence's form, "True" or "False")."""
    [(form, pattern, truth)] = [(form, pattern, truth) for form, (pattern, truth) in STATEMENTS.items()
                                if re.fullmatch(pattern, sentence)]
    return form, str(truth({"left": left, "right": right}, re.fullmatch(pattern, sentence)))


def swapped(sentence: str) -> str:
    """The sentence as the original's nlvr_dataset reads it with the images swapped."""
    return " ".join({"left": "right", "right": "left"}.get(word, word) for word in sentence.split(" "))


def check_nlvr(out, info, pairs: dict) -> Counter:
    """Check each split of an NLVR set; the forms of its statements."""
    scenes = scenes_of(out)
    assert info["task"] == "nlvr"
    forms = Counter()
    for split, name in (("train", "nlvr_train.json"), ("val", "nlvr_dev.json"), ("test", "nlvr_test.json")):
        entries = load_json_list(out / name)
        true = (pairs[split] + 1) // 2
        assert info["splits"][split] == {"pairs": pairs[split], "true": true, "json": name}
        assert len(entries) == pairs[split] and Counter(e["label"] for e in entries) == {
            "True": true, "False": pairs[split] - true}
        for entry in entries:
            assert set(entry) == {"images", "sentence", "label"} and isinstance(entry["sentence"], str)
            left, right = entry["images"]
            assert left != right and (out / left).is_file() and (out / right).is_file()
            form, truth = true_statement(entry["sentence"], scenes[left], scenes[right])
            assert truth == entry["label"], entry
            forms[form] += 1
            # "left" and "right" name the images only, so the original's swap keeps the label true
            assert true_statement(swapped(entry["sentence"]), scenes[right], scenes[left])[1] == entry["label"]
    return forms


def test_nlvr_labels_follow_the_pair_and_are_balanced(written):
    out, info = written["nlvr"]
    check_nlvr(out, info, {"train": 16, "val": 2, "test": 2})


def test_nlvr_every_statement_form_over_a_larger_set(tmp_path):
    info = write_task_dataset(tmp_path, "nlvr", 101, image_size=8, seed=1)
    forms = check_nlvr(tmp_path, info, {"train": 81, "val": 10, "test": 10})
    assert forms.keys() == STATEMENTS.keys(), forms


# --- every task --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["retrieval", "vqa", "nlvr"])
def test_same_seed_same_bytes_and_never_the_pretraining_images(tmp_path, task, written):
    write_task_dataset(tmp_path / "again", task, **ARGS)
    write_task_dataset(tmp_path / "other", task, **{**ARGS, "seed": 4})
    out, info = written[task]
    first, again, other = files(out), files(tmp_path / "again"), files(tmp_path / "other")
    assert first == again
    assert first.keys() == other.keys() and first["scenes.json"] != other["scenes.json"]
    assert set(info["files"]) | {"info.json"} == set(first) and info["files"] == sorted(info["files"])
    write_synthetic_dataset(tmp_path / "pretrain", **ARGS)
    pretraining = set(files(tmp_path / "pretrain").values())     # the same seed draws other scenes and jitter
    assert not {data for name, data in first.items() if name.startswith("images/")} & pretraining


@pytest.mark.parametrize("task", ["retrieval", "vqa", "nlvr"])
def test_overwrite_deletes_only_its_own_files(tmp_path, task):
    out = tmp_path / "data"
    write_task_dataset(out, task, **ARGS)
    with pytest.raises(ValueError, match="not empty"):
        write_task_dataset(out, task, **ARGS)
    (out / "images" / "mine.jpg").write_bytes(b"the user's")
    before = files(out)
    with pytest.raises(ValueError, match=r"did not write \(images/mine.jpg\)"):
        write_task_dataset(out, task, **ARGS, overwrite=True)
    assert files(out) == before
    (out / "images" / "mine.jpg").unlink()
    user = tmp_path / "user"
    (user / "images").mkdir(parents=True)
    (user / "vqa_train.json").write_text("[]")
    with pytest.raises(ValueError, match="not a dataset this command wrote"):
        write_task_dataset(user, task, **ARGS, overwrite=True)
    assert (user / "vqa_train.json").read_text() == "[]"


def test_overwrite_replaces_any_kind_of_set_with_any_other(tmp_path):
    """The pretraining set's shards/ goes with its files: an empty folder no manifest names would block the next."""
    out = tmp_path / "data"
    write_task_dataset(out, "retrieval", **ARGS)
    fresh = files(out)
    for task in ("vqa", "nlvr", "pretraining", "retrieval", "pretraining", "nlvr", "retrieval"):
        if task == "pretraining":
            info = write_synthetic_dataset(out, **ARGS, overwrite=True)
            assert folders(out) == {"images", "shards"}
        else:
            info = write_task_dataset(out, task, **ARGS, overwrite=True)
            assert info["task"] == task and folders(out) == {"images"}
        assert set(info["files"]) | {"info.json"} == set(files(out))
    assert files(out) == fresh


def test_a_run_that_stopped_early_is_refused(tmp_path, monkeypatch):
    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(synth_tasks, "captions", crash)     # after the first image is written
    with pytest.raises(KeyboardInterrupt):
        write_task_dataset(tmp_path, "retrieval", **ARGS)
    monkeypatch.undo()
    assert (tmp_path / "images" / "000000.jpg").exists() and not (tmp_path / "info.json").exists()
    with pytest.raises(ValueError, match="delete it by hand"):
        write_task_dataset(tmp_path, "retrieval", **ARGS, overwrite=True)
    assert (tmp_path / "images" / "000000.jpg").exists()


@pytest.mark.parametrize("bad,message", [(dict(task="caption"), "--task must be one of"), (dict(n=0), "--n"),
                                         (dict(image_size=4), "--image-size"), (dict(seed=-1), "--seed")])
def test_bad_settings(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        write_task_dataset(tmp_path, **{"task": "vqa", **ARGS, **bad})
    assert not any(tmp_path.iterdir())


def test_cli_task(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["data", "synth", "--task", "vqa", "--out", str(out), "--n", "20", "--image-size", "32", "--seed", "3"]
    assert main(args) == 0
    assert "wrote the synthetic vqa set (train: 18 images, 90 questions; test: 2 images, 10 questions)" in \
        capsys.readouterr().out
    written = files(out)
    assert json.loads(written["info.json"])["task"] == "vqa"
    write_task_dataset(tmp_path / "api", "vqa", **ARGS)
    assert files(tmp_path / "api") == written
    assert main(args) == 2 and "not empty" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0 and files(out) == written
    for extra in (["--noise", "0.1"], ["--shard-size", "5"]):
        assert main(args + ["--overwrite"] + extra) == 2
        assert f"{extra[0]} apply to the pretraining set only" in capsys.readouterr().err
    assert files(out) == written
    with pytest.raises(SystemExit):
        main(["data", "synth", "--task", "caption", "--out", str(tmp_path / "x"), "--n", "5"])
