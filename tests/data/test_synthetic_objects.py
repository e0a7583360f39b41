"""Reading objects back out of a caption (``mentioned_objects``) and scoring a caption against its scene
(``objects_named``): how CapFilt's synthetic captions are checked against the drawn scenes."""

import random

from blip_fast.data.synthetic import SceneObject, caption, describe, mentioned_objects, objects_named, random_scene


def as_tuples(scene):
    return [(obj.size, obj.color, obj.shape, obj.place) for obj in scene]


def test_every_wording_reads_back_to_its_scene():
    rng = random.Random(0)
    for _ in range(500):
        scene = random_scene(rng)
        assert mentioned_objects(caption(scene)) == as_tuples(scene)
        text = describe(scene, rng)
        assert sorted(mentioned_objects(text)) == sorted(as_tuples(scene)), text
        assert objects_named(text, scene) == objects_named(caption(scene), scene)
        named = objects_named(text, scene)
        assert named.named == named.present == named.colour_shape == named.exact == len(scene)


def test_partial_and_wrong_mentions():
    scene = [SceneObject("red", "circle", "big", "on the left"), SceneObject("red", "circle", "small", "at the top")]
    # size or place left out: the colour and shape count, the exact object does not
    assert mentioned_objects("A Picture Of a red circle and a large red circle near the top") == [
        (None, "red", "circle", None), ("big", "red", "circle", "at the top")]
    named = objects_named("a picture of a red circle and a large red circle near the top", scene)
    assert (named.named, named.present, named.colour_shape, named.exact) == (2, 2, 2, 0)
    # a multiset: three red circles named, two drawn
    named = objects_named("a red circle and a red circle and a red circle", scene)
    assert (named.named, named.colour_shape) == (3, 2)
    # wrong colour, wrong shape, words that are no object
    named = objects_named("a blue circle and a red square and the red sky", scene)
    assert (named.named, named.colour_shape, named.exact) == (2, 0, 0)
    assert objects_named("", scene).named == 0
    # a word that merely contains a colour is no colour ("redo", "bluered")
    assert mentioned_objects("redo circle bluered square") == []
