"""Videos for zero-shot video retrieval (blip_fast.data.video): the original's frame sampling against NumPy's own
``arange``, decoding only the sampled frames (keyframe seeks, B-frame reordering) against decoding every frame,
frames of known colour through PyAV and DALI, MSRVTT annotations, one-line errors for bad files, and the synthetic
video set (blip_fast.data.synth_tasks, task ``video``)."""

import json
import re

import numpy as np
import pytest
import torch

from blip_fast.cli import main
from blip_fast.data import video as video_module
from blip_fast.data.synth_tasks import MOTIONS, VIDEO_FRAMES, write_task_dataset
from blip_fast.data.transforms import MEAN, STD
from blip_fast.data.video import (
    VideoAnnotations,
    VideoError,
    VideoFrames,
    index_video,
    read_video_pyav,
    sample_frame_indices,
    write_video,
)

av = pytest.importorskip("av")

# PyAV's codecs: H.264 reorders frames (B-frames) and seeks from keyframes; VP9 and MJPEG are what DALI's CPU
# decoder reads too
CODECS = {"h264": ("libx264", {"g": "6", "bf": "2"}), "vp9": ("libvpx-vp9", {}), "mjpeg": ("mjpeg", {})}
# a flat frame's level after 4:2:0 encoding, RGB -> YUV -> RGB and resizing, in levels of 255
LEVELS = 3


def red_ramp(count: int, height: int = 32, width: int = 48) -> list[np.ndarray]:
    """Frame i: red 10 + 11 i everywhere (which frame it is), green and blue patterns moving (so that H.264 uses
    B-frames and motion)."""
    yy, xx = np.mgrid[0:height, 0:width]
    frames = []
    for i in range(count):
        frame = np.zeros((height, width, 3), np.uint8)
        frame[..., 0] = 10 + 11 * i
        frame[..., 1] = ((xx + 3 * i) * 5) % 256
        frame[..., 2] = (yy * 7 + xx * 3 + i * 9) % 200
        frames.append(frame)
    return frames


def levels(frames: torch.Tensor) -> torch.Tensor:
    """Normalised (F, 3, H, W) back to 0-255 levels."""
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (frames * std + mean) * 255


# --- sampling ----------------------------------------------------------------------------------------------------

def test_sampling_is_numpys_arange_wherever_it_gives_num_frames():
    extra = 0
    for num_frames in [*range(1, 17), 24, 31, 32]:
        for frames in range(num_frames, 3001):
            original = np.arange(0, frames, frames / num_frames, dtype=int).tolist()  # data/video_dataset.py
            ours = sample_frame_indices(frames, num_frames)
            if len(original) == num_frames:
                assert ours == original, (frames, num_frames)
            else:  # NumPy's length rounding adds one index: the first num_frames are kept
                assert len(original) == num_frames + 1 and ours == original[:num_frames], (frames, num_frames)
                extra += 1
    assert extra > 1000  # the branch is exercised (17 frames, 7 sampled: 8 indices)
    assert len(np.arange(0, 17, 17 / 7, dtype=int)) == 8


def test_eight_frames_never_get_an_extra_index_and_step_by_whole_frames():
    for frames in range(8, 20001):
        original = np.arange(0, frames, frames / 8, dtype=int)
        assert len(original) == 8
    # the integer step leaves the end of a video out: 15 frames give the first 8
    assert sample_frame_indices(15, 8) == list(range(8))
    assert sample_frame_indices(300, 8) == [0, 37, 74, 111, 148, 185, 222, 259]


@pytest.mark.parametrize("frames", range(1, 8))
def test_a_video_shorter_than_the_sample_uses_every_frame_evenly(frames):
    ours = sample_frame_indices(frames, 8)
    assert np.arange(0, frames, frames / 8, dtype=int).tolist() == [0] * 8  # the original: frame 0, eight times
    assert len(ours) == 8 and ours == sorted(ours) and set(ours) == set(range(frames))
    counts = np.bincount(ours)
    assert counts.max() - counts.min() <= 1


@pytest.mark.parametrize(("frames", "num_frames"), [(0, 8), (-3, 8), (10, 0), (10, True), (10, 2.0)])
def test_sampling_refuses_impossible_requests(frames, num_frames):
    with pytest.raises(ValueError):
        sample_frame_indices(frames, num_frames)


# --- decoding ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ramps(tmp_path_factory):
    """A 20-frame red ramp in each codec."""
    root = tmp_path_factory.mktemp("ramps")
    paths = {}
    for name, (codec, options) in CODECS.items():
        paths[name] = root / f"{name}.mp4"
        write_video(paths[name], red_ramp(20), codec=codec, options=options)
    return paths


def test_the_h264_ramp_reorders_and_has_keyframes_to_seek_to(ramps):
    index = index_video(ramps["h264"])
    pts = [packet.pts for packet in index.packets]
    assert index.frames == 20 and pts != sorted(pts)  # B-frames: decode order is not presentation order
    assert sum(packet.is_keyframe for packet in index.packets) >= 3


def decode_every_frame(path, size: int) -> list[np.ndarray]:
    """Plain PyAV: every frame in presentation order, converted as the reader converts."""
    with av.open(str(path)) as container:
        return [frame.reformat(width=size, height=size, format="rgb24", interpolation="BILINEAR").to_ndarray()
                for frame in container.decode(video=0)]


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("num_frames", [1, 3, 8, 20, 25])
def test_decoding_the_sampled_frames_equals_decoding_every_frame(ramps, codec, num_frames):
    every = decode_every_frame(ramps[codec], 24)
    got = read_video_pyav(ramps[codec], num_frames, 24)
    assert got.shape == (num_frames, 3, 24, 24) and got.dtype == torch.float32
    indices = sample_frame_indices(20, num_frames)
    expected = video_module.normalize_frames(torch.from_numpy(np.stack([every[i] for i in indices])))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("codec", CODECS)
def test_frames_of_known_colour(ramps, codec):
    got = levels(read_video_pyav(ramps[codec], 8, 16))  # 48 x 32 resized straight to 16 x 16
    indices = sample_frame_indices(20, 8)
    assert indices == [0, 2, 4, 6, 8, 10, 12, 14]
    red = got[:, 0]
    expected = torch.tensor([10.0 + 11 * i for i in indices]).view(8, 1, 1).expand_as(red)
    # the red level says which frame it is; frames 2 apart differ by 22 levels
    torch.testing.assert_close(red.mean(dim=(1, 2)), expected[:, 0, 0], rtol=0, atol=LEVELS)


def test_a_flat_colour_is_normalised_as_the_original(tmp_path):
    colour = (200, 30, 120)
    write_video(tmp_path / "flat.mp4", [np.full((16, 16, 3), colour, np.uint8) for _ in range(9)])
    got = read_video_pyav(tmp_path / "flat.mp4", 4, 8)
    expected = (torch.tensor(colour, dtype=torch.float32) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert got.shape == (4, 3, 8, 8)
    torch.testing.assert_close(got, expected.view(1, 3, 1, 1).expand_as(got), rtol=0, atol=LEVELS / 255 / min(STD))


# --- DALI --------------------------------------------------------------------------------------------------------

dali = pytest.mark.skipif(not video_module.dali_available(), reason="NVIDIA DALI is not installed")


@dali
@pytest.mark.parametrize("codec", ["vp9", "mjpeg"])
def test_dali_cpu_reads_the_same_frames(ramps, codec):
    reader = VideoFrames(24, 8, decoder="dali", batch_size=2, workers=2)
    assert reader.backend == "dali-cpu"
    got = reader.read_many([ramps[codec], ramps[codec], ramps[codec]])  # two DALI batches, the second of one
    pyav = read_video_pyav(ramps[codec], 8, 24)
    assert got.shape == (3, 8, 3, 24, 24) and got.dtype == torch.float32
    for video in got:  # the same frames: the red level says which
        torch.testing.assert_close(levels(video)[:, 0].mean(dim=(1, 2)), levels(pyav)[:, 0].mean(dim=(1, 2)),
                                   rtol=0, atol=LEVELS)


@dali
def test_dali_cpu_pixels_are_pyavs_but_at_colour_edges(tmp_path, video_set):
    colour = (200, 30, 120)
    write_video(tmp_path / "flat.mp4", [np.full((16, 16, 3), colour, np.uint8) for _ in range(9)])
    reader = VideoFrames(8, 4, decoder="dali")
    torch.testing.assert_close(levels(reader.read(tmp_path / "flat.mp4")),
                               levels(read_video_pyav(tmp_path / "flat.mp4", 4, 8)), rtol=0, atol=LEVELS)
    # drawn scenes at their own size (no resizing): DALI converts 4:2:0 to RGB with its own chroma upsampling,
    # libswscale with another, which differ along the shapes' edges only
    out, _ = video_set
    reader = VideoFrames(32, 8, decoder="dali")
    for path in sorted((out / "videos").glob("*.mp4")):
        difference = (levels(reader.read(path)) - levels(read_video_pyav(path, 8, 32))).abs()
        assert difference.mean() < 4 and (difference > 10).float().mean() < 0.1, path.name


@dali
def test_dali_cpu_names_what_it_cannot_read(ramps, tmp_path):
    reader = VideoFrames(16, 4, decoder="dali")
    with pytest.raises(VideoError, match=r"h264\.mp4 is h264: DALI's CPU decoder reads only vp8, vp9, mjpeg"):
        reader.read_many([ramps["vp9"], ramps["h264"]])
    broken = tmp_path / "broken.mp4"
    data = ramps["vp9"].read_bytes()
    # the index (moov, written last) stays, so the packets are read; the frame data (mdat) is zeroed: decoding fails
    start, end = data.index(b"mdat") + 4, data.index(b"moov") - 4
    broken.write_bytes(data[:start] + bytes(end - start) + data[end:])
    with pytest.raises(VideoError) as error:
        reader.read_many([ramps["vp9"], broken])
    assert "broken.mp4" in str(error.value) and "\n" not in str(error.value)


@dali
def test_auto_falls_back_to_pyav_when_dali_fails_on_readable_videos(ramps, monkeypatch, caplog):
    for decoder in ("dali", "auto"):
        reader = VideoFrames(16, 4, decoder="dali")
        reader.decoder = decoder  # auto picks DALI only for a GPU: the same reader, as auto would hold it there

        def refuse():
            raise RuntimeError("Critical error in pipeline:\nError in CPU operator `decoders.video`,\n\n"
                               "encountered:\n\nno decoder for this stream\nC++ context: [video_decoder_base.h]")

        monkeypatch.setattr(reader.dali.pipe, "run", refuse)
        if decoder == "dali":
            with pytest.raises(VideoError, match=r"could not decode the videos .*vp9\.mp4: no decoder for this stream"):
                reader.read_many([ramps["vp9"]])
            continue
        got = reader.read_many([ramps["vp9"], ramps["mjpeg"]])
        assert reader.backend == "dali-cpu, then pyav" and reader.dali is None
        torch.testing.assert_close(got[0], read_video_pyav(ramps["vp9"], 4, 16), rtol=0, atol=0)
        assert "using PyAV from now on" in caplog.text


def test_auto_is_pyav_for_a_model_on_the_cpu():
    assert VideoFrames(16, 8, decoder="auto", device="cpu").backend == "pyav"
    assert VideoFrames(16, 8, decoder="cpu").backend == "pyav"
    with pytest.raises(ValueError, match="decoder must be one of auto, dali, cpu"):
        VideoFrames(16, 8, decoder="gpu")


@pytest.mark.gpu
@dali
def test_dali_on_the_gpu_decodes_h264_as_pyav(ramps):
    reader = VideoFrames(24, 8, decoder="auto", device="cuda")
    assert reader.backend == "dali-gpu"
    got = reader.read_many([ramps["h264"], ramps["vp9"]])
    assert got.device.type == "cuda" and got.shape == (2, 8, 3, 24, 24)
    for video, codec in zip(got.cpu(), ("h264", "vp9"), strict=True):
        pyav = read_video_pyav(ramps[codec], 8, 24)
        torch.testing.assert_close(levels(video)[:, 0].mean(dim=(1, 2)), levels(pyav)[:, 0].mean(dim=(1, 2)),
                                   rtol=0, atol=LEVELS)
        assert (levels(video) - levels(pyav)).abs().mean() < 4


# --- bad files ---------------------------------------------------------------------------------------------------

def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_bad_videos_are_one_line_errors_naming_the_file(ramps, tmp_path):
    with pytest.raises(VideoError, match=r"video not found: .*missing\.mp4"):
        read_video_pyav(tmp_path / "missing.mp4", 8, 16)
    cases = {"empty.mp4": b"", "text.mp4": b"not a video at all\n" * 50,
             "cut.mp4": ramps["h264"].read_bytes()[:400]}  # an MP4 whose index (moov, at the end) is gone
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(VideoError) as error:
            read_video_pyav(tmp_path / name, 8, 16)
        assert name in one_line(error)
    (tmp_path / "folder.mp4").mkdir()
    with pytest.raises(VideoError, match="video not found"):
        index_video(tmp_path / "folder.mp4")


def test_a_file_without_video_is_refused(tmp_path):
    path = tmp_path / "sound.mp4"
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    with pytest.raises(VideoError, match=r"sound\.mp4 has no video stream"):
        read_video_pyav(path, 8, 16)


def test_the_cli_reports_a_missing_video_in_one_line(tmp_path, capsys):
    (tmp_path / "ann.jsonl").write_text('{"clip_name": "video1", "caption": "a cat"}\n')
    status = main(["eval", "video", "-c", str(tmp_path / "no.pth"), "--annotations", str(tmp_path / "ann.jsonl"),
                   "--video-root", str(tmp_path)])
    assert status == 2  # the checkpoint is missing: still one line
    assert capsys.readouterr().err.count("\n") == 1


# --- annotations -------------------------------------------------------------------------------------------------

def test_annotations_are_read_as_msrvtt(tmp_path):
    lines = ['{"clip_name": "video7010", "caption": "a man is talking"}', "",
             '{"clip_name": "video7011", "caption": "Cars race.", "extra": 1}', "  "]
    (tmp_path / "msrvtt_test.jsonl").write_text("\n".join(lines) + "\n")
    annotations = VideoAnnotations(tmp_path / "msrvtt_test.jsonl", tmp_path / "videos")
    assert len(annotations) == 2
    assert [e.clip_name for e in annotations.entries] == ["video7010", "video7011"]
    assert annotations[1].caption == "Cars race." and annotations[1].path == tmp_path / "videos" / "video7011.mp4"


@pytest.mark.parametrize(("content", "message"), [
    ('{"clip_name": "v1", "caption": "a"}\n{"clip_name": "v2", "caption": "b"\n', r"line 2: not JSON"),
    ('["v1", "a caption"]\n', r"line 1: expected an object"),
    ('{"caption": "a caption"}\n', r'line 1: no "clip_name"'),
    ('{"clip_name": "v1"}\n', r'line 1: no "caption"'),
    ('{"clip_name": "v1", "caption": 3}\n', r'line 1: "caption" must be a non-empty string, got 3'),
    ('{"clip_name": "", "caption": "a"}\n', r'line 1: "clip_name" must be a non-empty string'),
    ("\n\n", r"hold no entries"),
])
def test_bad_annotations_name_the_file_and_line(tmp_path, content, message):
    path = tmp_path / "ann.jsonl"
    path.write_text(content)
    with pytest.raises(VideoError, match=message) as error:
        VideoAnnotations(path, tmp_path)
    assert "ann.jsonl" in one_line(error)


def test_missing_or_unreadable_annotations(tmp_path):
    with pytest.raises(VideoError, match="annotations not found"):
        VideoAnnotations(tmp_path / "nope.jsonl", tmp_path)
    (tmp_path / "binary.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(VideoError, match="cannot be read"):
        VideoAnnotations(tmp_path / "binary.jsonl", tmp_path)


# --- the synthetic video set -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def video_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("video") / "set"
    return out, write_task_dataset(out, "video", n=6, image_size=32, seed=1)


def test_the_synthetic_set_is_msrvtt_shaped(video_set):
    out, info = video_set
    assert info["task"] == "video" and info["splits"] == {
        "test": {"videos": 6, "captions": 6, "jsonl": "msrvtt_test.jsonl", "video_root": "videos"}}
    lines = (out / "msrvtt_test.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    assert [set(e) for e in entries] == [{"clip_name", "caption"}] * 6
    annotations = VideoAnnotations(out / "msrvtt_test.jsonl", out / "videos")
    scenes, videos = (json.loads((out / name).read_text()) for name in ("scenes.json", "videos.json"))
    for entry in annotations.entries:
        key = f"videos/{entry.clip_name}.mp4"
        assert entry.path == out / key and key in info["files"]
        record = videos[key]
        assert index_video(entry.path).frames == record["frames"]
        assert VIDEO_FRAMES[0] <= record["frames"] <= VIDEO_FRAMES[1] and record["motion"] in MOTIONS
        assert entry.caption.endswith(f" moving {record['motion']}")
        # every object of the scene is named by its colour and shape
        for obj in scenes[key]:
            assert re.search(rf"\b{obj['color']} {obj['shape']}\b", entry.caption)
    assert set(info["files"]) == {*videos, "msrvtt_test.jsonl", "scenes.json", "videos.json"}


def test_the_synthetic_scene_moves_the_way_its_caption_says(video_set):
    out, _ = video_set
    videos = json.loads((out / "videos.json").read_text())
    for key, record in videos.items():
        frames = levels(read_video_pyav(out / key, record["frames"], 32)).mean(dim=1)  # (F, H, W) grey
        background = frames[0, 0, 0]
        # where the scene's content is (away from the background), first and last frame
        mask = (frames - background).abs() > 20
        ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
        first, last = ((float((xs * m).sum() / m.sum()), float((ys * m).sum() / m.sum())) for m in (mask[0], mask[-1]))
        dx, dy = MOTIONS[record["motion"]]
        moved = (last[0] - first[0]) * dx + (last[1] - first[1]) * dy
        assert moved > 1.5, (key, record, first, last)  # 12% of 32 px is about 4 px


def test_the_synthetic_set_is_a_function_of_its_seed(video_set, tmp_path):
    out, _ = video_set
    again = tmp_path / "again"
    write_task_dataset(again, "video", n=6, image_size=32, seed=1)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again).as_posix() for p in again.rglob("*") if p.is_file())
    assert all((out / name).read_bytes() == (again / name).read_bytes() for name in files)
    with pytest.raises(ValueError, match="must be even for --task video"):
        write_task_dataset(tmp_path / "odd", "video", n=2, image_size=33)


def test_overwrite_swaps_a_video_set_and_an_image_set(tmp_path):
    out = tmp_path / "data"
    write_task_dataset(out, "retrieval", n=4, image_size=16)
    write_task_dataset(out, "video", n=2, image_size=16, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["info.json", "msrvtt_test.jsonl", "scenes.json", "videos",
                                                     "videos.json"]
    write_task_dataset(out, "retrieval", n=4, image_size=16, overwrite=True)
    assert not (out / "videos").exists() and (out / "images").is_dir()


def test_data_synth_writes_the_video_set(tmp_path, capsys):
    assert main(["data", "synth", "--task", "video", "--out", str(tmp_path / "v"), "--n", "2",
                 "--image-size", "16"]) == 0
    assert "test: 2 videos, 2 captions" in capsys.readouterr().out
    assert len((tmp_path / "v" / "msrvtt_test.jsonl").read_text().splitlines()) == 2
