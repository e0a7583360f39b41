"""``blip-fast data synth --task``: downstream sets of synthetic scenes, in the original BLIP's annotation formats.

The scenes of :mod:`blip_fast.data.synthetic`, set as the fine-tuning and evaluation tasks BLIP is
measured on, each in the shape of the file the original's ``data/*_dataset.py`` reads, so that a
model can be fine-tuned and scored on them with no download. Image paths are relative to ``DIR``
(the image root of every task); ``scenes.json`` records each image's scene, the ground truth every
caption, answer and label is derived from.

retrieval (COCO / Flickr30k Karpathy splits, ``coco_karpathy_dataset``; ``n`` images, 80/10/10%)::

    DIR/images/KEY.jpg
    DIR/train.json                [{"image": "images/KEY.jpg", "caption": str, "image_id": "KEY"}], 5 per image
    DIR/val.json, DIR/test.json   [{"image": "images/KEY.jpg", "caption": [5 str]}]

  The five captions of an image are five different true wordings of its scene
  (:func:`~blip_fast.data.synthetic.captions`).

vqa (VQA v2 as ``vqa_dataset`` reads it; ``n`` images, 90% train, 10% test; 5 questions per image)::

    DIR/vqa_train.json            [{"question_id": int, "question": str, "answer": [10 str], "image": path,
                                    "dataset": "vqa"}]
    DIR/vqa_test.json             [{"question_id": int, "question": str, "image": path, "dataset": "vqa"}]
    DIR/vqa_test_answers.json     the test entries with their "answer": [10 str], for scoring
    DIR/answer_list.json          [str]: every answer the questions can have (the candidates ranked at test time)

  ``question_id`` is ``1000 * image index + question index``, as VQA v2 numbers them. Ten "humans"
  answer each question: all give the true answer, except on some questions where one to three give
  another answer of the same kind, so that VQA accuracy's ``min(#humans / 3, 1)`` credits a minority
  answer in part. Test entries keep ``"dataset"``: the original reads it on every split.

nlvr (NLVR2 as ``nlvr_dataset`` reads it; ``n`` pairs, 80/10/10%, the original's file names)::

    DIR/images/KEY-img0.jpg, DIR/images/KEY-img1.jpg
    DIR/nlvr_train.json, DIR/nlvr_dev.json, DIR/nlvr_test.json
                                  [{"images": [path0, path1], "sentence": str, "label": "True" | "False"}]

  Half the statements of each split are true (one more when the split is odd). Sentences say
  "left" and "right" of the two images only, never of a place in one: the original trains on the
  pair swapped half the time, with "left" and "right" swapped in the sentence.

video (MSRVTT's test split as ``data/video_dataset.py`` reads it; ``n`` videos, all test)::

    DIR/videos/videoI.mp4         12 to 24 frames at 10 fps, VP9 in MP4 (4:2:0, so ``--image-size`` is even)
    DIR/msrvtt_test.jsonl         one {"clip_name": "videoI", "caption": str} a line; --video-root DIR/videos
    DIR/videos.json               {video path: {"frames": int, "motion": str}}

  A video is one drawn scene sliding as a whole, :data:`MOTION_SPAN` of its side over the video, in one of four
  directions; its caption is a true wording of the scene followed by ``moving <direction>``.

Both ``DIR/scenes.json`` (``{image or video path: [{"color", "shape", "size", "place"}]}``) and
``DIR/info.json`` (the task, settings, counts per split and every file written) are written by
every task, the manifest last: the folder rules of :mod:`blip_fast.data.synth` apply unchanged (a
new or empty folder; ``overwrite`` deletes only the files a previous run's manifest lists).
Everything is a function of ``task`` and ``seed``; the random streams are named by the task, so a
task set never repeats the images of the pretraining set written with the same seed.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import asdict
from pathlib import Path

from PIL import Image

from .synth import prepare_output, split_sizes, write_manifest
from .synthetic import COLORS, PLACES, SHAPES, SIZES, SceneObject, captions, draw, random_scene

TASKS = ("retrieval", "vqa", "nlvr", "video")
FRACTIONS = {"retrieval": (0.8, 0.1, 0.1), "vqa": (0.9, 0.0, 0.1), "nlvr": (0.8, 0.1, 0.1), "video": (0.0, 0.0, 1.0)}
QUALITY = 90
CAPTIONS_PER_IMAGE = 5          # as COCO and Flickr30k
QUESTIONS_PER_IMAGE = 5         # VQA v2 has 5.4 on average
ANSWERS_PER_QUESTION = 10       # as VQA v2
DISSENTERS = (0, 0, 0, 0, 0, 0, 1, 1, 2, 3)     # humans of ten who give another answer, drawn once per question

# the short answer to "where is ...?" for each place
PLACE_ANSWERS = {"on the left": "left", "on the right": "right", "at the top": "top", "at the bottom": "bottom",
                 "in the middle": "middle"}
# the answers of each kind of question: the disagreeing humans' choices, and together the answer list
ANSWERS = {"number": ("0", "1", "2", "3"), "yes/no": ("yes", "no"), "color": tuple(COLORS), "shape": SHAPES,
           "place": tuple(PLACE_ANSWERS[place] for place in PLACES), "size": tuple(SIZES)}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
VIDEO_FRAMES = (12, 24)         # frames per video, drawn uniformly: varied lengths exercise the frame sampling
VIDEO_FPS = 10
MOTION_SPAN = 0.12              # how far a scene slides over a whole video, as a fraction of its side
MOTIONS = {"to the left": (-1, 0), "to the right": (1, 0), "up": (0, -1), "down": (0, 1)}


def write_task_dataset(out: str | Path, task: str, n: int, image_size: int = 128, seed: int = 0,
                       overwrite: bool = False) -> dict:
    """Write the ``task`` set of ``n`` images (nlvr: ``n`` pairs, video: ``n`` videos) to ``out`` (layouts in the
    module docstring); returns ``info.json``'s content."""
    if task not in TASKS:
        raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    if image_size < 8:
        raise ValueError(f"--image-size must be at least 8, got {image_size}")
    if task == "video" and image_size % 2:
        raise ValueError(f"--image-size must be even for --task video (4:2:0 video), got {image_size}")
    if seed < 0:
        raise ValueError(f"--seed must be non-negative, got {seed}")
    sizes = split_sizes(n, FRACTIONS[task])
    out = Path(out)
    prepare_output(out, overwrite, run_folders=("videos",) if task == "video" else ("images",))
    folder = _TaskFolder(out, task, seed, image_size)
    info = {"task": task, "n": n, "seed": seed, "image_size": image_size, "quality": QUALITY,
            "splits": _WRITERS[task](folder, sizes)}
    folder.write_json("scenes.json", folder.scenes)
    return write_manifest(out, info, folder.written)


class _TaskFolder:
    """The files of one run: images drawn from scenes and JSON files, each recorded for the manifest."""

    def __init__(self, out: Path, task: str, seed: int, image_size: int):
        self.out, self.task, self.seed, self.image_size = out, task, seed, image_size
        self.draw_rng = self.rng("draw")
        self.scenes: dict[str, list[dict]] = {}
        self.written: list[str] = []

    def rng(self, purpose: str) -> random.Random:
        """The random stream for one purpose (scenes, drawing, texts...), named by the task: a string seed is
        hashed the same way in every process."""
        return random.Random(f"blip-fast synth {self.task} {purpose} {self.seed}")

    def image(self, name: str, scene: list[SceneObject]) -> str:
        buffer = io.BytesIO()
        draw(scene, self.image_size, self.draw_rng).save(buffer, "JPEG", quality=QUALITY)
        path = f"images/{name}.jpg"
        (self.out / path).write_bytes(buffer.getvalue())
        self.written.append(path)
        self.scenes[path] = [asdict(obj) for obj in scene]
        return path

    def video(self, name: str, scene: list[SceneObject], frames: int, motion: str) -> str:
        """The scene drawn once, then slid by up to :data:`MOTION_SPAN` of the side towards ``motion``."""
        from .video import write_video

        still = draw(scene, self.image_size, self.draw_rng)
        background = still.getpixel((0, 0))  # no shape reaches a corner (places lie 0.25 to 0.75 across)
        dx, dy = MOTIONS[motion]
        span = MOTION_SPAN * self.image_size
        pictures = []
        for t in range(frames):
            shift = span * t / (frames - 1)
            picture = Image.new("RGB", still.size, background)
            picture.paste(still, (round(dx * shift), round(dy * shift)))
            pictures.append(picture)
        path = f"videos/{name}.mp4"
        write_video(self.out / path, pictures, fps=VIDEO_FPS)
        self.written.append(path)
        self.scenes[path] = [asdict(obj) for obj in scene]
        return path

    def write_json(self, name: str, content) -> None:
        (self.out / name).write_text(json.dumps(content, indent=0) + "\n")
        self.written.append(name)


def _splits(sizes: dict[str, int], names: tuple[str, ...]):
    """(split, indices): contiguous ranges of the scene indices, in the order train, val, test."""
    first = 0
    for split in ("train", "val", "test"):
        if split in names:
            yield split, range(first, first + sizes[split])
        first += sizes[split]


def _keys(sizes: dict[str, int]) -> list[str]:
    n = sum(sizes.values())
    width = max(6, len(str(n - 1)))
    return [f"{i:0{width}d}" for i in range(n)]


# --- retrieval ---------------------------------------------------------------------------------------------------

def _write_retrieval(folder: _TaskFolder, sizes: dict[str, int]) -> dict:
    scene_rng, text_rng = folder.rng("scenes"), folder.rng("captions")
    keys = _keys(sizes)
    splits = {}
    for split, indices in _splits(sizes, ("train", "val", "test")):
        entries = []
        for i in indices:
            scene = random_scene(scene_rng)
            image = folder.image(keys[i], scene)
            texts = captions(scene, CAPTIONS_PER_IMAGE, text_rng)
            if split == "train":        # the Karpathy training shape: one entry per caption
                entries += [{"image": image, "caption": text, "image_id": keys[i]} for text in texts]
            else:
                entries.append({"image": image, "caption": texts})
        folder.write_json(f"{split}.json", entries)
        splits[split] = {"images": len(indices), "captions": len(indices) * CAPTIONS_PER_IMAGE, "json": f"{split}.json"}
    return splits


# --- vqa ---------------------------------------------------------------------------------------------------------

def _question_pool(scene: list[SceneObject]) -> dict[str, list[tuple[str, str, str]]]:
    """Every question about ``scene`` with one right answer, by kind: (question, answer, answer kind). An object a
    question names by shape, or by colour and shape, is the only one of its kind in the scene."""
    shapes = [obj.shape for obj in scene]
    named = [(obj.color, obj.shape) for obj in scene]
    unique_shape = [obj for obj in scene if shapes.count(obj.shape) == 1]
    unique = [obj for obj in scene if named.count((obj.color, obj.shape)) == 1]
    present = [(f"is there a {shape}?", shape in shapes) for shape in SHAPES]
    present += [(f"is there a {color} {shape}?", (color, shape) in named) for color in COLORS for shape in SHAPES]
    return {
        "count": [("how many shapes are there?", str(len(scene)), "number")],
        "count shape": [(f"how many {shape}s are there?", str(shapes.count(shape)), "number") for shape in SHAPES],
        # yes and no as kinds of their own, so that each is asked about as often
        "is there: yes": [(question, "yes", "yes/no") for question, true in present if true],
        "is there: no": [(question, "no", "yes/no") for question, true in present if not true],
        "color of shape": [(f"what color is the {obj.shape}?", obj.color, "color") for obj in unique_shape],
        "shape at place": [(f"what shape is {obj.place}?", obj.shape, "shape") for obj in scene],
        "color at place": [(f"what color is the shape {obj.place}?", obj.color, "color") for obj in scene],
        "place": [(f"where is the {obj.color} {obj.shape}?", PLACE_ANSWERS[obj.place], "place") for obj in unique],
        "size": [(f"is the {obj.color} {obj.shape} big or small?", obj.size, "size") for obj in unique],
    }


def _questions(scene: list[SceneObject], rng: random.Random) -> list[tuple[str, str, str]]:
    """:data:`QUESTIONS_PER_IMAGE` different questions: a kind drawn evenly from those with a question for this
    scene, then one of its questions."""
    pool = {kind: questions for kind, questions in _question_pool(scene).items() if questions}
    chosen: list[tuple[str, str, str]] = []
    while len(chosen) < QUESTIONS_PER_IMAGE:    # any scene has more than 20 questions: "is there" alone asks 21
        question = rng.choice(pool[rng.choice(list(pool))])
        if question not in chosen:
            chosen.append(question)
    return chosen


def _human_answers(answer: str, kind: str, rng: random.Random) -> list[str]:
    """Ten humans' answers: the right one, but for a few dissenters who give another answer of the same kind."""
    dissenters = rng.choice(DISSENTERS)
    others = [other for other in ANSWERS[kind] if other != answer]
    answers = [answer] * (ANSWERS_PER_QUESTION - dissenters) + [rng.choice(others) for _ in range(dissenters)]
    rng.shuffle(answers)
    return answers


def _write_vqa(folder: _TaskFolder, sizes: dict[str, int]) -> dict:
    scene_rng, question_rng, answer_rng = folder.rng("scenes"), folder.rng("questions"), folder.rng("answers")
    keys = _keys(sizes)
    splits = {}
    for split, indices in _splits(sizes, ("train", "test")):
        entries = []
        for i in indices:
            scene = random_scene(scene_rng)
            image = folder.image(keys[i], scene)
            for j, (question, answer, kind) in enumerate(_questions(scene, question_rng)):
                entries.append({"question_id": 1000 * i + j, "question": question,
                                "answer": _human_answers(answer, kind, answer_rng), "image": image, "dataset": "vqa"})
        if split == "train":
            folder.write_json("vqa_train.json", entries)
        else:
            folder.write_json("vqa_test.json", [{k: v for k, v in e.items() if k != "answer"} for e in entries])
            folder.write_json("vqa_test_answers.json", entries)
        splits[split] = {"images": len(indices), "questions": len(entries), "json": f"vqa_{split}.json"}
    splits["test"]["answers"] = "vqa_test_answers.json"
    folder.write_json("answer_list.json", [answer for answers in ANSWERS.values() for answer in answers])
    return splits


# --- nlvr --------------------------------------------------------------------------------------------------------

def _thing(scenes: tuple[list[SceneObject], list[SceneObject]], rng: random.Random):
    """An object to make a statement about, and which objects it names: ``"a big red circle"``, ``"a triangle"``,
    ``"a green shape"``... Half the time it is one of the pair's objects, so that statements are often true."""
    if rng.random() < 0.5:
        like = rng.choice(rng.choice(scenes))
    else:
        like = SceneObject(rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(list(SIZES)), "")
    named = rng.choice((("color", "shape"), ("shape",), ("color",), ("size", "shape"), ("size", "color", "shape")))
    words = [getattr(like, feature) for feature in named] + ([] if "shape" in named else ["shape"])
    return "a " + " ".join(words), lambda obj: all(getattr(obj, f) == getattr(like, f) for f in named)


def _statement(left: list[SceneObject], right: list[SceneObject], rng: random.Random) -> tuple[str, bool]:
    """A statement about the pair and whether it is true."""
    sides = {"left": left, "right": right}
    kind = rng.choice(("contains", "contains", "both", "neither", "more", "same", "total", "exactly"))
    if kind in ("contains", "both", "neither"):
        thing, matches = _thing((left, right), rng)
        has = [any(map(matches, scene)) for scene in (left, right)]
        if kind == "both":
            return f"both images contain {thing}", all(has)
        if kind == "neither":
            return f"neither image contains {thing}", not any(has)
        side = rng.choice(list(sides))
        return f"the {side} image contains {thing}", has[side == "right"]
    if kind == "more":
        side, other = rng.sample(list(sides), 2)
        return f"the {side} image has more shapes than the {other} image", len(sides[side]) > len(sides[other])
    if kind == "same":
        return "both images have the same number of shapes", len(left) == len(right)
    if kind == "total":
        count = rng.randint(2, 6)
        return f"there are {NUMBER_WORDS[count]} shapes in total", len(left) + len(right) == count
    side, count = rng.choice(list(sides)), rng.randint(1, 3)
    noun = "shape" if count == 1 else "shapes"
    return f"the {side} image contains exactly {NUMBER_WORDS[count]} {noun}", len(sides[side]) == count


def _statement_with_label(left, right, label: bool, rng: random.Random) -> str:
    """A statement that is ``label``: statements are drawn until one is (a true one comes within a few draws: one
    of the pair's own objects, named, is in it)."""
    for _ in range(10_000):
        sentence, truth = _statement(left, right, rng)
        if truth == label:
            return sentence
    raise RuntimeError(f"no {label} statement found about a pair of scenes")


def _write_nlvr(folder: _TaskFolder, sizes: dict[str, int]) -> dict:
    scene_rng, label_rng, text_rng = folder.rng("scenes"), folder.rng("labels"), folder.rng("statements")
    keys = _keys(sizes)
    splits = {}
    for split, indices in _splits(sizes, ("train", "val", "test")):
        labels = [i % 2 == 0 for i in range(len(indices))]      # balanced, then in random order
        label_rng.shuffle(labels)
        entries = []
        for i, label in zip(indices, labels, strict=True):
            left, right = random_scene(scene_rng), random_scene(scene_rng)
            images = [folder.image(f"{keys[i]}-img0", left), folder.image(f"{keys[i]}-img1", right)]
            entries.append({"images": images, "sentence": _statement_with_label(left, right, label, text_rng),
                            "label": str(label)})
        name = f"nlvr_{'dev' if split == 'val' else split}.json"
        folder.write_json(name, entries)
        splits[split] = {"pairs": len(indices), "true": sum(labels), "json": name}
    return splits


# --- video --------------------------------------------------------------------------------------------------------

def _write_video(folder: _TaskFolder, sizes: dict[str, int]) -> dict:
    scene_rng, motion_rng, text_rng = folder.rng("scenes"), folder.rng("motion"), folder.rng("captions")
    lines, videos = [], {}
    for _, indices in _splits(sizes, ("test",)):
        for i in indices:
            scene = random_scene(scene_rng)
            frames, motion = motion_rng.randint(*VIDEO_FRAMES), motion_rng.choice(list(MOTIONS))
            clip_name = f"video{i}"      # MSRVTT's names: video7010 is videos/video7010.mp4
            path = folder.video(clip_name, scene, frames, motion)
            videos[path] = {"frames": frames, "motion": motion}
            caption = f"{captions(scene, 1, text_rng)[0]} moving {motion}"
            lines.append(json.dumps({"clip_name": clip_name, "caption": caption}))
    (folder.out / "msrvtt_test.jsonl").write_text("".join(line + "\n" for line in lines))
    folder.written.append("msrvtt_test.jsonl")
    folder.write_json("videos.json", videos)
    return {"test": {"videos": len(lines), "captions": len(lines), "jsonl": "msrvtt_test.jsonl",
                     "video_root": "videos"}}


_WRITERS = {"retrieval": _write_retrieval, "vqa": _write_vqa, "nlvr": _write_nlvr, "video": _write_video}
