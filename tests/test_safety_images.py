"""One image decoder for training and inference: the same pixels, the same pixel cap, clear errors for paths that
are not image files (never a traceback, a printed warning or a wait)."""

import io
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from timeouts import release_fifo, within

from blip_fast.checkpoint import save_salesforce
from blip_fast.cli import main
from blip_fast.config import tiny_config
from blip_fast.data import decode
from blip_fast.data.decode import MAX_IMAGE_PIXELS, decode_image, identify_image, read_image_file
from blip_fast.data.sample import BadSample, DataStats
from blip_fast.images import ImageError, load_image
from blip_fast.models import build_model


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 grey PNG whose header (IHDR, CRC fixed) claims ``width`` x ``height``: a few dozen bytes."""
    data = encode(Image.new("L", (1, 1)), "PNG")
    ihdr = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
    return data[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[33:]


def photo(width: int = 40, height: int = 30) -> Image.Image:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([128 + 100 * np.sin(x / (3 + c) + y / 5) for c in range(3)], -1) + rng.normal(0, 10, (height,
                                                                                                          width, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def training_reason(data: bytes) -> str:
    with pytest.raises(BadSample) as info:
        decode_image(data)
    return info.value.reason


@pytest.fixture
def no_warnings():
    """Any warning is an error (PIL's DecompressionBombWarning printed in the middle of a progress bar was one)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


@pytest.mark.parametrize("size", [(30000, 30000), (10000, 10000)], ids=["over_pil_error", "between_pil_limits"])
def test_a_decompression_bomb_is_refused_by_both_paths(tmp_path, no_warnings, size):
    data = png_claiming(*size)
    assert len(data) < 100 and size[0] * size[1] > MAX_IMAGE_PIXELS
    assert training_reason(data) == "image_too_large"
    with pytest.raises(BadSample) as info:
        identify_image(data)                     # the header check of the GPU pipeline
    assert info.value.reason == "image_too_large"
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    # our check names the size; past twice PIL's limit, PIL refuses to open it first and says so in pixels
    with pytest.raises(ImageError, match=f"bomb.png is too large: .*({size[0]} x {size[1]}|{size[0] * size[1]}) pix"):
        load_image(path)


def test_the_cap_is_ours_not_pils_global(tmp_path, monkeypatch, no_warnings):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)        # a library that turns PIL's check off
    assert training_reason(png_claiming(10000, 10000)) == "image_too_large"
    monkeypatch.setattr(decode, "MAX_IMAGE_PIXELS", 40 * 30 - 1)
    data = encode(photo(), "PNG")
    assert training_reason(data) == "image_too_large"
    (tmp_path / "a.png").write_bytes(data)
    with pytest.raises(ImageError, match="40 x 30 pixels"):
        load_image(tmp_path / "a.png")
    monkeypatch.setattr(decode, "MAX_IMAGE_PIXELS", 40 * 30)
    assert load_image(tmp_path / "a.png").size == (40, 30)


def test_a_jpeg_missing_only_its_end_marker_loads_as_in_training(tmp_path):
    data = encode(photo(), "JPEG", quality=90)
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    (tmp_path / "cut.jpg").write_bytes(data[:-2])
    stats = DataStats()
    np.testing.assert_array_equal(np.asarray(decode_image(data[:-2], stats)), full)
    assert stats.fixed == {decode.JPEG_END_MISSING: 1}
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "cut.jpg")), full)


def test_a_sixteen_bit_png_gives_the_same_pixels_in_both_paths(tmp_path):
    values = (np.arange(40 * 30).reshape(30, 40) * 50).astype(np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    (tmp_path / "deep.png").write_bytes(data)
    expected = np.repeat(np.rint(values / 65535 * 255).astype(np.uint8)[..., None], 3, axis=2)
    np.testing.assert_array_equal(np.asarray(decode_image(data)), expected)
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "deep.png")), expected)


def test_a_fifo_is_refused_without_waiting(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    for read in (load_image, read_image_file):
        with pytest.raises((ImageError, BadSample), match=f"{fifo} is not a regular file"):
            within(5, lambda r=read: r(str(fifo)), release_fifo(fifo))


def test_a_device_is_refused():
    with pytest.raises(ImageError, match="/dev/null is not a regular file"):
        load_image("/dev/null")


def test_a_directory_is_a_directory_not_missing(tmp_path):
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="image not found"):
        load_image(tmp_path / "missing.jpg")


@pytest.mark.parametrize("url", ["https://x/y.jpg", "http://example.com/a%20b.png", "file:///tmp/a.jpg"])
def test_a_url_says_to_download_it_first(url):
    with pytest.raises(ImageError) as info:
        load_image(url)
    assert str(info.value) == f"{url}: blip-fast reads local files only; download the image first"


@pytest.fixture(scope="module")
def caption_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "caption.pth"
    torch.manual_seed(0)
    save_salesforce(build_model("caption", tiny_config()), path)
    return path


def test_the_cli_prints_one_error_line(tmp_path, caption_checkpoint, capsys, no_warnings):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming(30000, 30000))
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    for image, message in ((bomb, "bomb.png is too large"), (tmp_path, "is a directory"),
                           ("https://x/y.jpg", "https://x/y.jpg: blip-fast reads local files only"),
                           (fifo, "is not a regular file")):
        assert main(["caption", str(image), "-c", str(caption_checkpoint), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err
