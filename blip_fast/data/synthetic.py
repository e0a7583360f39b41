"""Procedurally drawn scenes with captions that describe them.

Each scene holds one to three objects, each a colour, a shape, a size and a position, drawn on a
plain background; the caption names them (``"a big red circle on the left and a small blue
square at the top"``). A model has to see colours, shapes and places to match captions to
images, which makes the set a quick, honest check that a tiny model learns -- in seconds, with no
download. :func:`caption` is the one fixed wording (the pretraining set's); :func:`describe` and
:func:`captions` word the same scene in other true ways (object order, synonyms, a lead-in), as
the five captions per image of COCO and Flickr30k do. :func:`mentioned_objects` reads the objects back out of
any text, which is how a generated caption is checked against the scene it was drawn from
(:func:`objects_named`).

:func:`photo_like_jpeg` draws the other kind of synthetic image: photo-like JPEGs (shading, edges,
grain) for decoder and transform comparisons and the data benchmark, where flat scenes would hide
resampling differences.
"""

from __future__ import annotations

import io
import random
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
          "purple": (150, 60, 190), "white": (245, 245, 245)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.16, "big": 0.3}
PLACES = {"on the left": (0.25, 0.5), "on the right": (0.75, 0.5), "at the top": (0.5, 0.25),
          "at the bottom": (0.5, 0.75), "in the middle": (0.5, 0.5)}
BACKGROUNDS = ((30, 30, 30), (90, 90, 90), (200, 190, 170))

# other true wordings of a size and a place (the first is the one caption() uses), and lead-ins
SIZE_WORDS = {"small": ("small", "little"), "big": ("big", "large")}
PLACE_WORDS = {"on the left": ("on the left", "at the left side", "on the left side"),
               "on the right": ("on the right", "at the right side", "on the right side"),
               "at the top": ("at the top", "near the top", "in the upper part"),
               "at the bottom": ("at the bottom", "near the bottom", "in the lower part"),
               "in the middle": ("in the middle", "in the center", "at the center")}
LEADS = ("", "a picture of ", "there is ", "an image of ", "a drawing of ")


@dataclass
class SceneObject:
    color: str
    shape: str
    size: str
    place: str

    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape} {self.place}"


def random_scene(rng: random.Random, max_objects: int = 3) -> list[SceneObject]:
    places = rng.sample(list(PLACES), rng.randint(1, max_objects))
    return [SceneObject(rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(list(SIZES)), place)
            for place in places]


def caption(scene: list[SceneObject]) -> str:
    return " and ".join(obj.phrase() for obj in scene)


def describe(scene: list[SceneObject], rng: random.Random) -> str:
    """One true wording of ``scene``, drawn from ``rng``: its objects in any order, each size and place in any of
    its words, after any lead-in (``"there is a large red circle in the center and a little blue square ..."``)."""
    objects = rng.sample(scene, len(scene))
    phrases = [f"a {rng.choice(SIZE_WORDS[obj.size])} {obj.color} {obj.shape} {rng.choice(PLACE_WORDS[obj.place])}"
               for obj in objects]
    return rng.choice(LEADS) + " and ".join(phrases)


def captions(scene: list[SceneObject], n: int, rng: random.Random) -> list[str]:
    """``n`` different true wordings of ``scene`` (:func:`describe`). Any scene has at least 2 x 3 x 5 = 30 (one
    object: size words x place words x lead-ins), so up to 30 are always found."""
    found: list[str] = []
    for _ in range(1000 * n):
        text = describe(scene, rng)
        if text not in found:
            found.append(text)
            if len(found) == n:
                return found
    raise ValueError(f"found only {len(found)} different wordings of a scene, {n} asked for")


_SIZE_OF = {word: size for size, words in SIZE_WORDS.items() for word in words}
_PLACE_OF = {words: place for place, wordings in PLACE_WORDS.items() for words in wordings}
# an object is "[size] colour shape [place]": the colour and shape are what any mention must name
_MENTION = re.compile(r"(?:\b({sizes}) )?\b({colors}) ({shapes})\b(?: ({places})\b)?".format(
    sizes="|".join(_SIZE_OF), colors="|".join(COLORS), shapes="|".join(SHAPES),
    places="|".join(sorted(_PLACE_OF, key=len, reverse=True))))


def mentioned_objects(text: str) -> list[tuple[str | None, str, str, str | None]]:
    """The objects ``text`` names, as (size, colour, shape, place) in the words of :class:`SceneObject` (``None``
    where the text leaves the size or the place out), in the order they are named. Any wording :func:`describe`
    writes reads back to its scene; a generated caption reads to whatever it names, right or wrong."""
    return [(_SIZE_OF.get(size), color, shape, _PLACE_OF.get(place))
            for size, color, shape, place in _MENTION.findall(text.lower())]


@dataclass(frozen=True)
class ObjectsNamed:
    """How well a text names a scene, counted over objects (a multiset: two red circles are two)."""
    named: int           # objects the text names
    present: int         # objects in the scene
    colour_shape: int    # named objects whose colour and shape match one of the scene's, each used once
    exact: int           # named objects whose size, colour, shape and place all match one of the scene's


def objects_named(text: str, scene: list[SceneObject]) -> ObjectsNamed:
    """Compare the objects ``text`` names (:func:`mentioned_objects`) with ``scene``. Precision is ``colour_shape /
    named`` and recall ``colour_shape / present`` (likewise with ``exact``)."""
    mentions = mentioned_objects(text)
    truth = Counter((obj.color, obj.shape) for obj in scene)
    said = Counter((color, shape) for _, color, shape, _ in mentions)
    full_truth = Counter((obj.size, obj.color, obj.shape, obj.place) for obj in scene)
    full_said = Counter(mention for mention in mentions if None not in mention)
    return ObjectsNamed(named=len(mentions), present=len(scene), colour_shape=sum((truth & said).values()),
                        exact=sum((full_truth & full_said).values()))


def draw(scene: list[SceneObject], size: int, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (size, size), rng.choice(BACKGROUNDS))
    pen = ImageDraw.Draw(image)
    for obj in scene:
        cx, cy = (c * size for c in PLACES[obj.place])
        r = SIZES[obj.size] * size / 2 * rng.uniform(0.85, 1.15)
        cx, cy = cx + rng.uniform(-0.04, 0.04) * size, cy + rng.uniform(-0.04, 0.04) * size
        fill = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLORS[obj.color])
        if obj.shape == "circle":
            pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif obj.shape == "square":
            pen.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


def sample(rng: random.Random, size: int) -> tuple[Image.Image, str]:
    """One (image, caption) pair."""
    scene = random_scene(rng)
    return draw(scene, size, rng), caption(scene)


def photo_like_jpeg(seed: int, width: int = 640, height: int = 480, quality: int = 90, subsampling: int = 2,
                    mode: str = "RGB") -> bytes:
    """A photo-like JPEG (about 100 kB at 640x480): smooth colour field, a dozen shapes, blur and grain --
    never flat, never all zero. ``subsampling`` 2 is 4:2:0 (PIL's default), 0 is 4:4:4; ``mode`` "L" for grey."""
    rng = np.random.default_rng(seed)
    field = rng.integers(0, 256, (height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
    image = Image.fromarray(field).resize((width, height), Image.BICUBIC)
    pen = ImageDraw.Draw(image)
    for _ in range(12):
        x, y, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(8, 100)
        pen.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(1.0))).astype(np.int16)
    pixels = (pixels + rng.normal(0, 8, pixels.shape)).clip(0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(out, "JPEG", quality=quality, subsampling=subsampling)
    return out.getvalue()
