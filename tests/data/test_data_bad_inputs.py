"""Every kind of bad input, end to end through the loader: handled, counted by reason, logged once, never mislabeled."""

import io
import json
import logging

import numpy as np
import pytest
from data_helpers import encode, photo_like, write_json
from PIL import Image

from blip_fast.data.annotations import CaptionAnnotations
from blip_fast.data.loader import ResumableLoader
from blip_fast.data.shards import ShardWriter, TarShards
from blip_fast.data.stream import SampleStream


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def image_bytes() -> dict:
    """Encoded images by kind; each is a different photo-like picture."""
    photo = {k: photo_like(40, 30, seed=k) for k in range(10)}
    baseline = encode(photo[0], "JPEG", quality=90)
    return {
        "good": baseline,
        "good2": encode(photo[1], "JPEG", quality=90),
        "corrupt": b"this is not an image",
        "truncated": baseline[: len(baseline) // 2],
        "recoverable": encode(photo[2], "JPEG", quality=90)[:-2],       # only FF D9 missing
        "rgba_png": encode(photo[3].convert("RGBA"), "PNG"),
        "gray": encode(photo[4].convert("L"), "JPEG"),
        "cmyk": encode(photo[5].convert("CMYK"), "JPEG"),
        "palette_png": encode(photo[6].convert("P"), "PNG", transparency=3),
        "good3": encode(photo[7], "JPEG", quality=90),
    }


def expected_pixels(data: bytes) -> np.ndarray:
    return pixels(data if data.endswith(b"\xff\xd9") or not data.startswith(b"\xff\xd8") else data + b"\xff\xd9")


# (image kind or None for a missing file, caption) -> what happens
CASES = [
    ("good", "photo zero", None),
    (None, "a missing file", "missing_image"),
    ("corrupt", "not an image", "corrupt_image"),
    ("truncated", "cut in half", "corrupt_image"),
    ("recoverable", "only the end marker is missing", None),
    ("rgba_png", "a png with alpha", None),
    ("gray", "a grayscale jpeg", None),
    ("cmyk", "a cmyk jpeg", None),
    ("palette_png", "a palette png", None),
    ("good2", "", "no_caption"),
    ("good2", 42, "no_caption"),
    ("good2", ["", "the one good caption", None], None),
    ("good2", [None, "  "], "no_caption"),
    ("good2", "...", "no_caption"),
    ("good3", "photo three", None),
]
EXPECTED_SKIPS = {"missing_image": 1, "corrupt_image": 2, "no_caption": 4}
EXPECTED_FIXED = {"jpeg_end_marker_missing": 1, "converted_RGBA_to_RGB": 1, "converted_L_to_RGB": 1,
                  "converted_CMYK_to_RGB": 1, "converted_P_to_RGB": 1, "caption_entries_dropped": 2}


def check_loader(loader, expected: dict, caplog):
    """``expected``: key -> (caption, encoded image) of every sample that must come out."""
    with caplog.at_level(logging.WARNING, logger="blip_fast.data"):
        samples = [sample for batch in loader for sample in batch]
    assert sorted(s.key for s in samples) == sorted(expected)
    for sample in samples:
        caption, data = expected[sample.key]
        assert sample.caption == caption, sample.key
        assert sample.image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(sample.image), expected_pixels(data), err_msg=sample.key)
    for reason in loader.stats.skipped:
        assert caplog.text.count(f"skipping samples ({reason})") == 1, reason
    return loader.stats


@pytest.mark.parametrize("workers", [0, 2])
def test_json_list_bad_inputs(tmp_path, caplog, workers):
    images = image_bytes()
    entries, expected = [], {}
    for index, (kind, caption, outcome) in enumerate(CASES):
        name = f"img{index}.png" if kind and "png" in kind else f"img{index}.jpg"
        if kind is not None:
            (tmp_path / name).write_bytes(images[kind])
        entries.append({"image": name, "caption": caption})
        if outcome is None:
            expected[str(index)] = ([c for c in caption if isinstance(c, str) and c.strip()]
                                    if isinstance(caption, list) else caption, images[kind])
    entries += ["not an object", {"caption": "no image field"}, {"image": 7, "caption": "image is a number"}]
    source = CaptionAnnotations(write_json(tmp_path / "train.json", entries), tmp_path)
    stats = check_loader(ResumableLoader(SampleStream(source, seed=1), 3, num_workers=workers), expected, caplog)
    assert stats.skipped == {**EXPECTED_SKIPS, "bad_record": 3}
    assert stats.fixed == EXPECTED_FIXED
    assert stats.samples == len(expected) and stats.samples + stats.total_skipped == len(entries)


@pytest.mark.parametrize("workers", [0, 2])
def test_tar_shard_bad_inputs(tmp_path, caplog, workers):
    images = image_bytes()
    expected = {}
    with ShardWriter(tmp_path, "bad", 6) as writer:
        for index, (kind, caption, outcome) in enumerate(CASES):
            key = f"{index:04d}"
            files = {}
            if kind is not None:
                files["png" if "png" in kind else "jpg"] = images[kind]
            if isinstance(caption, str):
                files["txt"] = caption.encode()
            else:
                files["json"] = json.dumps({"caption": caption}).encode()
            writer.write(key, files)
            if outcome is None:
                expected[key] = ([c for c in caption if isinstance(c, str) and c.strip()]
                                 if isinstance(caption, list) else caption, images[kind])
        writer.write("broken_json", {"jpg": images["good"], "json": b"{not json"})
        writer.write("latin1", {"jpg": images["good"], "txt": "caf\xe9".encode("latin-1")})
    with ShardWriter(tmp_path, "cut", 6) as cut_writer:
        cut_writer.write("lost0", {"jpg": images["good"], "txt": b"lost with its shard"})
        cut_writer.write("lost1", {"jpg": images["good"], "txt": b"lost with its shard"})
    cut = cut_writer.paths[0]
    cut.write_bytes(cut.read_bytes()[:1500])              # this shard breaks off inside its first sample
    loader = ResumableLoader(SampleStream(TarShards(str(tmp_path)), seed=3, shuffle_buffer=4), 2,
                             num_workers=workers)
    stats = check_loader(loader, expected, caplog)
    skips = dict(EXPECTED_SKIPS, bad_record=1, bad_shard=1)
    skips["no_caption"] += 1                              # the Latin-1 .txt
    assert stats.skipped == skips
    assert stats.fixed == EXPECTED_FIXED
    assert "cut-00000.tar" in stats.first["bad_shard"]


def test_a_bad_image_never_shifts_captions(tmp_path):
    """Alternate good and corrupt images: each caption that comes out is its own image's."""
    with ShardWriter(tmp_path, "alt", 100) as writer:
        truth = {}
        for k in range(12):
            data = encode(photo_like(24, 24, seed=100 + k), "JPEG") if k % 2 == 0 else b"\xff\xd8broken"
            writer.write(f"k{k:02d}", {"jpg": data, "txt": f"picture {k}".encode()})
            truth[f"picture {k}"] = data
    stream = SampleStream(TarShards(str(tmp_path)), seed=0, shuffle_buffer=5)
    samples = list(stream)
    assert sorted(s.caption for s in samples) == sorted(f"picture {k}" for k in range(0, 12, 2))
    for sample in samples:
        np.testing.assert_array_equal(np.asarray(sample.image), pixels(truth[sample.caption]))
    assert stream.stats.skipped == {"corrupt_image": 6}


def test_bytes_mode_checks_headers_only(tmp_path):
    images = image_bytes()
    entries = []
    for index, kind in enumerate(["good", "corrupt", "truncated", None]):
        if kind:
            (tmp_path / f"{index}.jpg").write_bytes(images[kind])
        entries.append({"image": f"{index}.jpg", "caption": f"caption {index}"})
    stream = SampleStream(CaptionAnnotations(write_json(tmp_path / "a.json", entries), tmp_path), shuffle=False,
                          decode="bytes")
    samples = list(stream)
    assert [s.key for s in samples] == ["0", "2"] and samples[1].image_bytes == images["truncated"]
    assert samples[0].image is None
    assert stream.stats.skipped == {"corrupt_image": 1, "missing_image": 1}


def test_ids_paths_and_captions_that_are_bad_records(tmp_path, caplog):
    """image_id must be a string or an int: a list or dict is no key, and True or 1.0 would be image 1's key (their
    captions then ITC positives of image 1's); a path with a NUL byte is a missing image; a caption of punctuation
    alone has no words. Each is skipped and counted."""
    good = encode(photo_like(24, 24, seed=7), "JPEG")
    (tmp_path / "a.jpg").write_bytes(good)
    entries = [{"image": "a.jpg", "caption": "one", "image_id": 1},
               {"image": "a.jpg", "caption": "two", "image_id": "1"},
               *({"image": "a.jpg", "caption": "bad id", "image_id": bad} for bad in ([1], {"id": 1}, True, 1.0)),
               {"image": "a\x00.jpg", "caption": "a NUL in the path"},
               {"image": "a.jpg", "caption": "!!! ... ???"}]
    source = CaptionAnnotations(write_json(tmp_path / "ids.json", entries), tmp_path)
    expected = {"0": ("one", good), "1": ("two", good)}
    stats = check_loader(ResumableLoader(SampleStream(source, seed=0), 2, num_workers=0), expected, caplog)
    assert stats.skipped == {"bad_record": 4, "missing_image": 1, "no_caption": 1}
    assert source.img_ids == {1: 0, "1": 1}


def test_a_corrupt_xz_shard_is_a_bad_shard(tmp_path):
    import lzma

    with ShardWriter(tmp_path, "good", 10) as writer:
        for k in range(3):
            writer.write(f"k{k}", {"jpg": encode(photo_like(24, 24, seed=k), "JPEG"), "txt": f"picture {k}".encode()})
    packed = bytearray(lzma.compress(writer.paths[0].read_bytes()))
    packed[200] ^= 0xFF
    (tmp_path / "flipped-00000.tar").write_bytes(bytes(packed))  # compression is told by its magic bytes
    stream = SampleStream(TarShards(str(tmp_path)), seed=0, shuffle=False)
    assert sorted(s.caption for s in stream) == ["picture 0", "picture 1", "picture 2"]
    assert stream.stats.skipped == {"bad_shard": 1} and "LZMAError" in stream.stats.first["bad_shard"]


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_deep_grey_images_are_scaled_to_8_bits(mode):
    """16-bit and float images (PIL's convert clamps them: a 16-bit image comes out nearly white, a float one in
    [0, 1] black) keep their gradient: 256 levels from black to white."""
    from blip_fast.data.decode import decode_image

    ramp = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    image = (Image.fromarray((ramp * 65535).astype(np.uint16)) if mode == "I;16"
             else Image.fromarray((ramp * 65535).astype(np.int32), "I") if mode == "I"
             else Image.fromarray(ramp.astype(np.float32), "F"))
    decoded = np.asarray(decode_image(encode(image, "PNG" if mode == "I;16" else "TIFF")))
    assert decoded.min() == 0 and decoded.max() == 255 and len(np.unique(decoded)) == 256
    assert np.abs(decoded[..., 0].astype(float) - ramp * 255).max() <= 1
