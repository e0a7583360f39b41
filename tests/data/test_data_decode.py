"""Image decoding (modes, truncation, corruption) and the caption / question / answer checks."""

import io

import numpy as np
import pytest
from data_helpers import encode, photo_like
from PIL import Image

from blip_fast.data.decode import (
    ANSWERS_DROPPED,
    CAPTIONS_DROPPED,
    JPEG_END_MISSING,
    check_answers,
    check_caption,
    check_question,
    decode_image,
    identify_image,
    read_image_file,
)
from blip_fast.data.jpeg import jpeg_scan_complete
from blip_fast.data.sample import BadSample, DataStats


def reason(call) -> str:
    with pytest.raises(BadSample) as info:
        call()
    return info.value.reason


def original_decode(data: bytes) -> np.ndarray:
    """What the original BLIP does: Image.open(...).convert('RGB')."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


PHOTO = photo_like(96, 72, seed=1)


@pytest.mark.parametrize("mode,fmt,options", [
    ("RGB", "JPEG", {}), ("L", "JPEG", {}), ("CMYK", "JPEG", {}), ("RGB", "PNG", {}), ("L", "PNG", {}),
    ("LA", "PNG", {}), ("RGBA", "PNG", {}), ("P", "PNG", {"transparency": 5}), ("P", "GIF", {}), ("1", "PNG", {}),
    ("RGBA", "WEBP", {}), ("RGB", "BMP", {}),
])
def test_every_mode_becomes_the_originals_rgb(mode, fmt, options):
    data = encode(PHOTO.convert(mode), fmt, **options)
    stats = DataStats()
    image = decode_image(data, stats)
    assert image.mode == "RGB" and image.size == PHOTO.size
    np.testing.assert_array_equal(np.asarray(image), original_decode(data))
    decoded_mode = Image.open(io.BytesIO(data)).mode
    assert stats.fixed == ({} if decoded_mode == "RGB" else {f"converted_{decoded_mode}_to_RGB": 1})


def test_sixteen_bit_grayscale_png():
    """Scaled to 8 bits, not clamped as the original's ``convert('RGB')`` clamps it (to a nearly white image)."""
    values = (np.arange(40 * 30).reshape(30, 40) * 50).astype(np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    expected = np.rint(values / 65535 * 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(decode_image(data)), np.repeat(expected[..., None], 3, axis=2))


JPEG_KINDS = {
    "baseline": dict(quality=90),
    "optimized_huffman": dict(quality=75, optimize=True),
    "no_subsampling": dict(quality=85, subsampling=0),
    "restart_markers": dict(quality=80, restart_marker_blocks=3),
}


@pytest.mark.parametrize("kind", sorted(JPEG_KINDS))
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_truncated_jpeg_recovered_only_when_just_the_end_marker_is_missing(kind, mode):
    data = encode(PHOTO.convert(mode), "JPEG", **JPEG_KINDS[kind])
    full = original_decode(data)
    assert jpeg_scan_complete(data)
    recovered, rejected = [], 0
    cuts = list(range(1, 40)) + list(range(40, len(data) - 2, 97))
    for cut in cuts:
        stats = DataStats()
        try:
            image = decode_image(data[:-cut], stats)
        except BadSample as error:
            assert error.reason == "corrupt_image"
            rejected += 1
            continue
        # a recovered image is exactly the complete file's image, and it is counted
        np.testing.assert_array_equal(np.asarray(image), full, err_msg=f"cut {cut}")
        assert stats.fixed[JPEG_END_MISSING] == 1
        recovered.append(cut)
    assert recovered == [1, 2]          # only the end marker (FF D9, or its D9) missing
    assert rejected == len(cuts) - 2


def test_progressive_jpeg_cut_anywhere_is_corrupt():
    data = encode(PHOTO, "JPEG", progressive=True)
    assert not jpeg_scan_complete(data)
    for cut in (1, 2, 3, 50, len(data) // 2):
        assert reason(lambda c=cut: decode_image(data[:-c])) == "corrupt_image"


def test_lone_ff_left_by_a_cut_inside_the_end_marker():
    data = encode(PHOTO, "JPEG", quality=90)
    assert data.endswith(b"\xff\xd9")
    np.testing.assert_array_equal(np.asarray(decode_image(data[:-1])), original_decode(data))


@pytest.mark.parametrize("data", [b"", b"not an image at all", b"\xff\xd8\xff\xe0garbage", None])
def test_bytes_that_are_not_an_image_are_corrupt(data):
    assert reason(lambda: decode_image(data)) == "corrupt_image"
    assert reason(lambda: identify_image(data)) == "corrupt_image"


def test_truncated_png_is_corrupt():
    data = encode(PHOTO, "PNG")
    assert reason(lambda: decode_image(data[: len(data) // 2])) == "corrupt_image"


def test_corrupt_header_with_valid_tail_is_corrupt():
    data = bytearray(encode(PHOTO, "JPEG"))
    data[2:40] = b"\x00" * 38
    assert reason(lambda: decode_image(bytes(data))) == "corrupt_image"


def test_decompression_bomb_is_too_large(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    data = encode(PHOTO, "PNG")
    assert reason(lambda: decode_image(data)) == "image_too_large"


def test_identify_reads_only_the_header():
    data = encode(PHOTO, "JPEG")
    assert identify_image(data) == "JPEG"
    assert identify_image(data[: len(data) // 2]) == "JPEG"      # a cut file passes: decoding is the GPU's job


def test_missing_file(tmp_path):
    assert reason(lambda: read_image_file(tmp_path / "nope.jpg")) == "missing_image"
    assert reason(lambda: read_image_file(tmp_path)) == "missing_image"      # a directory
    (tmp_path / "a.jpg").write_bytes(b"abc")
    assert read_image_file(tmp_path / "a.jpg") == b"abc"


@pytest.mark.parametrize("caption", ["", "   ", "...", "!!! ~~", None, 3, 4.5, {"text": "a dog"}, [], ["", None, 7]])
def test_unusable_captions_are_skipped(caption):
    assert reason(lambda: check_caption(caption)) == "no_caption"


def test_caption_lists_drop_only_the_bad_entries():
    stats = DataStats()
    assert check_caption(["a dog", "", None, "A cat.", 3, "..."], stats) == ["a dog", "A cat."]
    assert stats.fixed == {CAPTIONS_DROPPED: 4}
    assert check_caption("A Dog!", stats) == "A Dog!"          # kept raw: cleaning is the transform's job
    assert check_caption(("x y",), stats) == ["x y"]


def test_questions_and_answers():
    assert check_question("What is it?") == "What is it?"
    for bad in ("", "...", "  ", None, 5):
        assert reason(lambda b=bad: check_question(b)) == "no_question"
    stats = DataStats()
    assert check_answers(["yes", "", None, "no", " "], stats) == ["yes", "no"]
    assert stats.fixed == {ANSWERS_DROPPED: 3}
    assert check_answers("two") == ["two"]
    for bad in ([], [""], None, 3):
        assert reason(lambda b=bad: check_answers(b)) == "no_answer"


def test_stats_add_and_round_trip():
    a, b = DataStats(), DataStats()
    a.samples, b.samples = 3, 4
    a.skip(BadSample("corrupt_image", "x.jpg"))
    b.skip(BadSample("corrupt_image", "y.jpg"))
    b.skip(BadSample("no_caption", "z"))
    b.fix("converted_L_to_RGB")
    total = a + b
    assert total.samples == 7 and total.skipped == {"corrupt_image": 2, "no_caption": 1}
    assert total.first == {"corrupt_image": "x.jpg", "no_caption": "z"} and total.total_skipped == 3
    assert type(total).from_dict(total.to_dict()) == total
    assert total.summary() == "7 samples; skipped 3 (corrupt_image 2, no_caption 1); fixed converted_L_to_RGB 1"
    with pytest.raises(ValueError):
        BadSample("not_a_reason", "x")
