"""Videos of a zero-shot video-text retrieval split, read as the original ``data/video_dataset.py`` reads MSRVTT.

**Annotations** (``msrvtt_test.jsonl``): one JSON object a line, ``{"clip_name": "video7010", "caption": str}``,
one caption per video; the video is ``video_root/clip_name + ".mp4"``. Blank lines are skipped (the original's
``json.loads`` fails on them); any other line that is not such an object is an error naming the file and line.

**Frames** (the original's ``frm_sampling_strategy='uniform'``): ``np.arange(0, vlen, vlen / num_frm, dtype=int)``
over the ``vlen`` frames of a video. NumPy computes an integer ``arange`` from its first two values, ``0`` and
``int(vlen / num_frm)``, and then steps by their difference, so the indices are ``i * (vlen // num_frm)``: not
spread over the whole video but over its first ``num_frm * (vlen // num_frm)`` frames (15 frames, 8 sampled: the
first 8). :func:`sample_frame_indices` gives exactly those whenever NumPy returns ``num_frm`` of them. Where it
returns one more (``vlen / num_frm`` rounded so that ``vlen`` divided by it exceeds ``num_frm``, e.g. 17 frames,
7 sampled; never for 8, a power of two, which divides exactly), the first ``num_frm`` are kept: the original would
give that video one frame more and fail to batch it with the others. A video shorter than ``num_frm`` frames gets
the original's step 0 -- its first frame ``num_frm`` times -- replaced by every frame in order, each repeated
evenly (``floor(i * vlen / num_frm)``).

A video's frames are counted and ordered as decord counts and orders them: every packet of the video stream is one
frame, and frame ``i`` is the one with the ``i``-th smallest presentation time (decord's ``IndexKeyframes``).

**Pixels**: each sampled frame is converted to RGB and resized straight to ``size x size`` (no crop, the aspect
ratio not kept) by libswscale with bilinear filtering -- decord's ``scale=W:H`` filter graph, whose default flags
are bilinear in the FFmpeg 4 that decord's wheels ship -- then scaled to [0, 1] and normalised with CLIP's mean
and std (the original's ``ImageNorm``, which divides by 255 only when the video's brightest value is above 1: a
video of levels 0 and 1 only is normalised from 0-255 values there, from [0, 1] here, as every other video).

Two decoders give these tensors:

* ``cpu``: PyAV (FFmpeg's libavcodec and libswscale, the ``av`` package). The packets are read once; a sampled
  frame is decoded from the last keyframe before it when that is past where decoding stands (as decord seeks),
  else by decoding on; only the sampled frames are converted and resized.
* ``dali``: NVIDIA DALI's ``fn.decoders.video`` on the bytes of each file with the sampled indices
  (``frames=``), ``fn.resize`` (linear, antialiased as swscale's bilinear filter widens when it shrinks) and
  ``fn.crop_mirror_normalize``. ``mixed`` (NVDEC) decodes H.264, HEVC, AV1, MPEG-4, VP8, VP9 and MJPEG; DALI's
  CPU backend only VP8, VP9 and MJPEG, with the same libavcodec PyAV uses, so ``auto`` picks DALI only for a model
  on a GPU. PyAV still counts the frames (DALI has no operator that reports a frame count).

A video that cannot be read is an error naming the file: an evaluation set is fixed, and a skipped video would
change its numbers.
"""

from __future__ import annotations

import bisect
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .transforms import MEAN, STD

try:
    import av

    HAS_PYAV = True
except ImportError:  # the video extra: only video retrieval needs it
    HAS_PYAV = False

log = logging.getLogger("blip_fast.data")

DECODERS = ("auto", "dali", "cpu")
VIDEO_FORMAT = ".mp4"
DALI_CPU_CODECS = ("vp8", "vp9", "mjpeg")
"""What DALI's CPU video decoder reads (its operator documentation); ``mixed`` (NVDEC) reads these and more."""


class VideoError(ValueError):
    """A video or annotation file that cannot be used; the message names the file."""


class DaliDecodeError(VideoError):
    """DALI failed on videos that PyAV reads: DALI's limits (an NVDEC without the codec...), not the files'."""


# ---------------------------------------------------------------------------------------------
# Annotations
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VideoEntry:
    clip_name: str
    caption: str
    path: Path


class VideoAnnotations:
    """The entries of an MSRVTT-format JSON-lines file, in file order; videos under ``video_root``."""

    def __init__(self, path: str | Path, video_root: str | Path, video_format: str = VIDEO_FORMAT):
        self.path, self.video_root = Path(path), Path(video_root)
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise VideoError(f"annotations not found: {self.path}") from None
        except (OSError, UnicodeDecodeError) as error:
            raise VideoError(f"annotations {self.path} cannot be read: {error}") from None
        self.entries = [self._entry(number, line, video_format)
                        for number, line in enumerate(lines, start=1) if line.strip()]
        if not self.entries:
            raise VideoError(f"annotations {self.path} hold no entries")

    def _entry(self, number: int, line: str, video_format: str) -> VideoEntry:
        where = f"annotations {self.path}, line {number}"
        try:
            item = json.loads(line)
        except ValueError as error:
            raise VideoError(f"{where}: not JSON ({error})") from None
        if not isinstance(item, dict):
            raise VideoError(f"{where}: expected an object {{\"clip_name\", \"caption\"}}, got "
                             f"{type(item).__name__}")
        for key in ("clip_name", "caption"):
            if key not in item:
                raise VideoError(f"{where}: no \"{key}\"")
            if not isinstance(item[key], str) or not item[key].strip():
                raise VideoError(f"{where}: \"{key}\" must be a non-empty string, got {item[key]!r}")
        return VideoEntry(item["clip_name"], item["caption"], self.video_root / (item["clip_name"] + video_format))

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> VideoEntry:
        return self.entries[index]


# ---------------------------------------------------------------------------------------------
# Frame sampling
# ---------------------------------------------------------------------------------------------

def sample_frame_indices(video_frames: int, num_frames: int) -> list[int]:
    """The ``num_frames`` frame indices of a ``video_frames``-frame video (module docstring: the original's
    ``'uniform'`` sampling, its extra index dropped, short videos spread over every frame)."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"frames must be a positive integer, got {num_frames!r}")
    if video_frames < 1:
        raise ValueError(f"a video needs at least one frame to sample from, got {video_frames}")
    if video_frames < num_frames:
        return [i * video_frames // num_frames for i in range(num_frames)]
    step = video_frames // num_frames
    return [i * step for i in range(num_frames)]


# ---------------------------------------------------------------------------------------------
# PyAV: frame index and decoding
# ---------------------------------------------------------------------------------------------

def _require_pyav() -> None:
    if not HAS_PYAV:
        raise VideoError("reading videos needs PyAV: pip install av (or the video extra: pip install blip-fast[video])")


@dataclass
class VideoIndex:
    """A video's packets (decode order) and what decord's index records of them."""

    path: Path
    codec: str
    packets: list
    """``av.Packet`` of the video stream, decode order, empty ones dropped; one per frame."""
    order: list[int] | None
    """Packet of each frame in presentation order (by pts); ``None`` when a packet has no pts."""

    @property
    def frames(self) -> int:
        return len(self.packets)


def _open(path: Path):
    _require_pyav()
    if not path.is_file():
        raise VideoError(f"video not found: {path}")
    try:
        return av.open(str(path))
    except av.FFmpegError as error:
        raise VideoError(f"video {path} cannot be read: {_first_line(error)}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _dali_reason(error: BaseException) -> str:
    """The line of a DALI error that says what went wrong (it follows the operator's traceback, after
    "encountered:"), else the first line that is not DALI's "Critical error in pipeline:" heading."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if "encountered:" in lines and lines.index("encountered:") + 1 < len(lines):
        return lines[lines.index("encountered:") + 1]
    return next((line for line in lines if not line.startswith("Critical error")), type(error).__name__)


def index_video(path: str | Path) -> VideoIndex:
    """Read every packet of ``path``'s first video stream (no decoding): its frame count and order."""
    path = Path(path)
    container = _open(path)
    try:
        return _index(container, path)
    finally:
        container.close()


def _index(container, path: Path) -> VideoIndex:
    try:
        if not container.streams.video:
            raise VideoError(f"video {path} has no video stream")
        stream = container.streams.video[0]
        codec = stream.codec_context.name
        packets = [packet for packet in container.demux(stream) if packet.size > 0]
    except av.FFmpegError as error:
        raise VideoError(f"video {path} cannot be read: {_first_line(error)}") from None
    if not packets:
        raise VideoError(f"video {path} has no frames")
    order = None
    if all(packet.pts is not None for packet in packets):
        order = sorted(range(len(packets)), key=lambda i: packets[i].pts)
    return VideoIndex(path, codec, packets, order)


def _pixels(frame, size: int) -> np.ndarray:
    # one sws_scale call converts to RGB and resizes, as decord's scale filter does
    return frame.reformat(width=size, height=size, format="rgb24", interpolation="BILINEAR").to_ndarray()


def _decode_by_pts(index: VideoIndex, indices: list[int], size: int, codec) -> dict[int, np.ndarray]:
    """The frames at presentation positions ``indices``, decoding from the nearest keyframe where that skips
    packets; keyed by position."""
    packets, order = index.packets, index.order
    wanted = {packets[order[i]].pts: i for i in indices}
    keyframes = [i for i, packet in enumerate(packets) if packet.is_keyframe]
    keyframe_pts = [packets[i].pts for i in keyframes]
    seekable = bool(keyframes) and keyframe_pts == sorted(keyframe_pts)
    got: dict[int, np.ndarray] = {}
    position, drained = 0, False
    for pts in sorted(wanted):
        if wanted[pts] in got:
            continue
        if seekable:
            # the last keyframe shown at or before the frame: frames decoded after it never reference earlier ones
            key = bisect.bisect_right(keyframe_pts, pts) - 1
            start = keyframes[key] if key >= 0 else 0
            if start > position:
                # every frame wanted before this one is in `got`, so nothing the decoder still holds is lost
                codec.flush_buffers()
                position, drained = start, False
        while wanted[pts] not in got:
            if position < len(packets):
                frames = codec.decode(packets[position])
                position += 1
            elif not drained:
                frames, drained = codec.decode(None), True
            else:
                raise VideoError(f"video {index.path}: frame {wanted[pts]} of {index.frames} was never decoded")
            for frame in frames:
                if frame.pts in wanted and wanted[frame.pts] not in got:
                    got[wanted[frame.pts]] = _pixels(frame, size)
    return got


def _decode_in_order(index: VideoIndex, indices: list[int], size: int, codec) -> dict[int, np.ndarray]:
    """Without timestamps: every frame decoded, the ``i``-th the decoder returns taken as frame ``i``."""
    wanted, got, position = set(indices), {}, 0
    for packet in [*index.packets, None]:
        for frame in codec.decode(packet):
            if position in wanted:
                got[position] = _pixels(frame, size)
            position += 1
        if len(got) == len(wanted):
            break
    missing = sorted(wanted - set(got))
    if missing:
        raise VideoError(f"video {index.path}: frame {missing[0]} of {index.frames} was never decoded")
    return got


def normalize_frames(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (F, H, W, 3) RGB -> float32 (F, 3, H, W): scaled to [0, 1], normalised with CLIP's mean and std."""
    frames = pixels.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1)
    return frames.sub_(mean).div_(std)


def read_video_pyav(path: str | Path, num_frames: int, size: int) -> torch.Tensor:
    """The ``num_frames`` sampled frames of a video, (F, 3, size, size) float32, normalised (module docstring)."""
    path = Path(path)
    container = _open(path)
    try:
        index = _index(container, path)
        indices = sample_frame_indices(index.frames, num_frames)
        decode = _decode_by_pts if index.order is not None else _decode_in_order
        got = decode(index, indices, size, container.streams.video[0].codec_context)
    except av.FFmpegError as error:
        raise VideoError(f"video {path} cannot be decoded: {_first_line(error)}") from None
    finally:
        container.close()
    return normalize_frames(torch.from_numpy(np.stack([got[i] for i in indices])))


# ---------------------------------------------------------------------------------------------
# DALI
# ---------------------------------------------------------------------------------------------

def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _video_graph(size: int, device: str):
    from nvidia.dali import fn, types

    encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
    frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
    video = fn.decoders.video(encoded, frames=frames, device="mixed" if device == "gpu" else "cpu")  # (F, H, W, 3)
    video = fn.resize(video, size=(size, size), mode="stretch", interp_type=types.INTERP_LINEAR, antialias=True)
    return fn.crop_mirror_normalize(video, dtype=types.FLOAT, output_layout="FCHW",
                                    mean=[255.0 * m for m in MEAN], std=[255.0 * s for s in STD])


class DaliVideoDecoder:
    """Batches of videos through one DALI pipeline: (n, F, 3, size, size) float32, on the GPU for ``gpu``.

    Not thread-safe: one caller at a time (:class:`~blip_fast.evaluation.video_retrieval.VideoSource` decodes one
    chunk ahead on one thread).
    """

    def __init__(self, size: int, num_frames: int, device: str = "cpu", batch_size: int = 64,
                 num_threads: int = 4, device_id: int | None = None):
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be cpu or gpu, got {device!r}")
        from nvidia.dali import pipeline_def

        self.size, self.num_frames, self.device, self.batch_size = size, num_frames, device, batch_size
        if device == "gpu" and device_id is None:
            device_id = torch.cuda.current_device()
        self.device_id = device_id
        # synchronous: each batch is fed, then run; the caller overlaps batches with the model
        self.pipe = pipeline_def(_video_graph)(size, device, batch_size=batch_size, num_threads=num_threads,
                                               device_id=device_id if device == "gpu" else None,
                                               prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
        self.pipe.build()

    def check_codec(self, index: VideoIndex) -> None:
        if self.device == "cpu" and index.codec not in DALI_CPU_CODECS:
            raise VideoError(f"video {index.path} is {index.codec}: DALI's CPU decoder reads only "
                             f"{', '.join(DALI_CPU_CODECS)} (use the cpu decoder, PyAV, or a GPU)")

    def __call__(self, paths: list[Path]) -> torch.Tensor:
        if not paths:
            return torch.zeros(0, self.num_frames, 3, self.size, self.size)
        out = []
        for start in range(0, len(paths), self.batch_size):
            out.append(self._batch(paths[start:start + self.batch_size]))
        return torch.cat(out)

    def _batch(self, paths: list[Path]) -> torch.Tensor:
        indices = []
        for path in paths:
            index = index_video(path)
            self.check_codec(index)
            indices.append(np.asarray(sample_frame_indices(index.frames, self.num_frames), dtype=np.int32))
        encoded = [np.fromfile(path, dtype=np.uint8) for path in paths]
        try:
            self.pipe.feed_input("encoded", encoded)
            self.pipe.feed_input("frames", indices)
            (videos,) = self.pipe.run()
        except RuntimeError as error:
            # DALI names no file: find the one PyAV cannot decode either, else report the batch (the pipeline is
            # invalid after an error either way: the caller stops, or auto goes on with PyAV)
            for path in paths:
                read_video_pyav(path, self.num_frames, self.size)
            names = ", ".join(str(path) for path in paths)
            raise DaliDecodeError(f"DALI could not decode the videos {names}: {_dali_reason(error)}") from None
        return self._to_torch(videos)

    def _to_torch(self, videos) -> torch.Tensor:
        if self.device == "cpu":
            return torch.from_numpy(videos.as_array())  # as_array copies out of DALI's buffer
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = videos.as_tensor()
        tensor = torch.empty(dense.shape(), dtype=torch.float32, device=torch.device("cuda", self.device_id))
        # copy on torch's current stream, ordered after DALI's work on its own stream
        feed_ndarray(dense, tensor, cuda_stream=torch.cuda.current_stream(tensor.device))
        return tensor


# ---------------------------------------------------------------------------------------------
# Choosing a decoder
# ---------------------------------------------------------------------------------------------

class VideoFrames:
    """Reads the sampled, normalised frames of video files: (n, F, 3, size, size) float32.

    ``decoder``: ``cpu`` (PyAV), ``dali`` (DALI on ``device``: ``gpu`` -> ``mixed``, else its CPU backend) or
    ``auto`` (DALI when installed and ``device`` is a CUDA device, else PyAV; when DALI's pipeline cannot be built,
    or fails on videos PyAV reads, PyAV takes over with a warning). :attr:`backend` says which was picked. PyAV
    reads ``workers`` videos at once (libavcodec and libswscale run without the GIL); DALI runs ``workers`` threads
    of its own.
    """

    def __init__(self, size: int, num_frames: int = 8, decoder: str = "auto", device: str | torch.device = "cpu",
                 batch_size: int = 64, workers: int = 4):
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"image size must be a positive integer, got {size!r}")
        sample_frame_indices(num_frames, num_frames)  # checks num_frames
        _require_pyav()  # both count frames with it
        self.size, self.num_frames = size, num_frames
        device = torch.device(device)
        dali_device = "gpu" if device.type == "cuda" else "cpu"
        self.dali: DaliVideoDecoder | None = None
        self.lock = threading.Lock()
        if decoder == "dali" or (decoder == "auto" and dali_device == "gpu" and dali_available()):
            if not dali_available():
                raise VideoError("--decoder dali needs NVIDIA DALI (pip install nvidia-dali-cuda130)")
            try:
                self.dali = DaliVideoDecoder(size, num_frames, dali_device, batch_size, max(1, workers),
                                             device.index if dali_device == "gpu" else None)
            except RuntimeError as error:
                if decoder == "dali":
                    raise VideoError(f"DALI's video pipeline cannot be built: {_dali_reason(error)}") from None
                log.warning("video decoding: DALI's pipeline cannot be built (%s); using PyAV", _dali_reason(error))
        self.decoder, self.workers = decoder, max(1, workers)
        self.backend = f"dali-{dali_device}" if self.dali is not None else "pyav"
        self.pool = ThreadPoolExecutor(self.workers) if self.dali is None else None
        log.info("video decoding: %s", self.backend)

    def read(self, path: str | Path) -> torch.Tensor:
        """One video (F, 3, S, S), on the CPU (PyAV) or where DALI runs."""
        return self.read_many([Path(path)])[0]

    def read_many(self, paths: list[Path]) -> torch.Tensor:
        if self.dali is not None:
            with self.lock:
                try:
                    return self.dali([Path(path) for path in paths])
                except DaliDecodeError as error:
                    if self.decoder == "dali":
                        raise
                    # auto: PyAV reads what DALI could not, for this batch and every later one
                    log.warning("video decoding: %s; using PyAV from now on", error)
                    self.dali, self.pool = None, ThreadPoolExecutor(self.workers)
                    self.backend = f"{self.backend}, then pyav"
        if not paths:
            return torch.zeros(0, self.num_frames, 3, self.size, self.size)
        return torch.stack(list(self.pool.map(read_video_pyav, paths, [self.num_frames] * len(paths),
                                              [self.size] * len(paths))))


# ---------------------------------------------------------------------------------------------
# Writing (the synthetic video set, tests)
# ---------------------------------------------------------------------------------------------

def write_video(path: str | Path, frames, fps: int = 10, codec: str = "libvpx-vp9",
                options: dict[str, str] | None = None) -> None:
    """Encode RGB frames (uint8 (H, W, 3) arrays or PIL images, even sides) as an .mp4 at ``fps``, 4:2:0.

    VP9, the default, is one of the codecs DALI's CPU decoder also reads; ``libx264`` (H.264, what MSRVTT holds)
    and ``mjpeg`` are in PyAV's wheels too. ``options`` go to the encoder (libx264: ``{"g": "4", "bf": "2"}`` for a
    keyframe every 4 frames and B-frames). The file is bit-exact: the same frames write the same bytes.
    """
    _require_pyav()
    frames = [np.asarray(frame, dtype=np.uint8) for frame in frames]
    if not frames or any(frame.ndim != 3 or frame.shape[2] != 3 for frame in frames):
        raise ValueError("write_video needs at least one RGB frame (H, W, 3)")
    height, width = frames[0].shape[:2]
    if height % 2 or width % 2 or any(frame.shape != frames[0].shape for frame in frames):
        raise ValueError(f"video frames must share one size with even sides (4:2:0), got {height}x{width}")
    # bitexact: no encoder version or creation time in the file
    with av.open(str(path), "w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(codec, rate=fps, options=options or {})
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
