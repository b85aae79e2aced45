"""The H.264 + AAC result: each segment encoded as soon as it exists, then joined with the audio.

:func:`encode_segment` encodes one segment's frames as its own closed group of pictures (a
video-only MP4 that plays on its own); :func:`mux_segments` joins the segments' packets, without a
second encode, with the job's ORIGINAL audio (as decoded once by
:mod:`hallo3_worker.conditioning.decode`) into one MP4 (H.264 yuv420p + AAC, ``+faststart``),
cutting the audio to the video's length.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from hallo3_worker.conditioning.decode import swr_convert
from hallo3_worker.interface import DecodedAudio

logger = logging.getLogger(__name__)

_AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000)


def audio_bit_rate(channels: int) -> int:
    """The AAC target bitrate of the result's audio: mono 128 kbit/s, stereo 192 kbit/s."""
    return 128_000 if channels == 1 else 192_000


@dataclasses.dataclass(frozen=True)
class EncodedVideo:
    path: Path
    width: int
    height: int
    fps: int
    frames: int
    duration_s: float  # frames / fps
    has_audio: bool
    size_bytes: int


# ----------------------------------------------------------------------------------------- encode


def _even(frames: np.ndarray) -> np.ndarray:
    """Crop (N, H, W, 3) frames to even H and W, which yuv420p needs."""
    height, width = frames.shape[1] & ~1, frames.shape[2] & ~1
    return frames[:, :height, :width]


def audio_for_mux(audio: DecodedAudio, max_seconds: float) -> tuple[np.ndarray, int, str]:
    """The job's decoded audio prepared for AAC, cut to ``max_seconds``.

    Returns (planar float32 samples of shape (channels, n), sample rate, layout name). The rate is
    kept when AAC supports it, else the audio is resampled to 48 kHz by libswresample.
    """
    layout = "mono" if audio.channels == 1 else "stereo"
    samples, rate = audio.samples, audio.sample_rate
    if rate not in _AAC_RATES:
        samples, rate = swr_convert(samples, rate, layout, out_layout=layout, out_rate=48000), 48000
    budget = int(round(max_seconds * rate))  # samples allowed into the output
    return np.ascontiguousarray(samples[:, :budget], dtype=np.float32), rate, layout


class _AudioTrack:
    """Feeds planar samples to an AAC stream in 1024-sample frames, up to a given time."""

    FRAME = 1024  # AAC frame size in samples

    def __init__(self, container: av.container.OutputContainer, samples: np.ndarray, rate: int, layout: str) -> None:
        self.container = container
        self.samples = samples  # (channels, n) float32
        self.rate = rate
        self.layout = layout
        self.stream = container.add_stream("aac", rate=rate, layout=layout)
        self.stream.bit_rate = audio_bit_rate(1 if layout == "mono" else 2)
        self.position = 0  # samples already encoded

    def feed_until(self, seconds: float) -> None:
        end = self.samples.shape[1] if math.isinf(seconds) else min(self.samples.shape[1], round(seconds * self.rate))
        while self.position < end:
            stop = min(self.position + self.FRAME, self.samples.shape[1])
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(self.samples[:, self.position : stop]), format="fltp", layout=self.layout
            )
            frame.sample_rate = self.rate
            frame.pts = self.position
            frame.time_base = Fraction(1, self.rate)
            for packet in self.stream.encode(frame):
                self.container.mux(packet)
            self.position = stop

    def finish(self) -> None:
        self.feed_until(math.inf)
        for packet in self.stream.encode(None):
            self.container.mux(packet)


#: libx264 settings. ``mbtree=0``: x264's macroblock-tree rate control reads memory it never wrote,
#: so its output followed whatever earlier work left on the heap (identical in a fresh process,
#: different after a job); without it a seed gives the same bytes every time.
_X264_OPTIONS = {"mbtree": "0"}


def encode_segment(frames: np.ndarray, fps: int, out_path: Path, *, first_frame: int = 0, crf: int = 18,
                   preset: str = "medium", maxrate_bps: int | None = None, bufsize_bits: int | None = None) -> Path:
    """Encode one segment's RGB uint8 frames (N, H, W, 3) as its own closed group of pictures.

    ``out_path`` is a video-only MP4 that plays on its own; no encoder state crosses segments, so a
    segment encodes to the same bytes whenever it is encoded. ``first_frame`` is its place in the clip.
    ``maxrate_bps`` and ``bufsize_bits`` cap the bitrate with x264's VBV on top of the CRF (both or neither).
    """
    frames = _even(frames)
    options = {"crf": str(crf), "preset": preset, **_X264_OPTIONS}
    if maxrate_bps is not None:
        if bufsize_bits is None:
            raise ValueError("a VBV maxrate needs a bufsize")
        # x264's VBV with several threads (sliced or frame) gives different bytes from run to run; one
        # thread keeps a seed's file identical (a 47-frame segment encodes in about a second).
        options.update(maxrate=str(int(maxrate_bps)), bufsize=str(int(bufsize_bits)), threads="1")
    with av.open(str(out_path), "w", format="mp4") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        video.options = options
        for index, picture in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(picture), format="rgb24")
            frame.pts = first_frame + index
            for packet in video.encode(frame):
                container.mux(packet)
        for packet in video.encode(None):
            container.mux(packet)
    return out_path


def mux_segments(segments: list[Path], fps: int, audio: DecodedAudio | None, out_path: Path) -> EncodedVideo:
    """Join encoded segments (no second encode) and the job's audio, cut to the video's length, into ``out_path``.

    The segments are opened one at a time, so a long clip's hundreds of segments need no more memory
    or file handles than one.
    """
    total = 0
    for path in segments:
        with av.open(str(path)) as source:
            total += source.streams.video[0].frames
    count = 0
    with av.open(str(out_path), "w", format="mp4", options={"movflags": "+faststart"}) as container:
        with av.open(str(segments[0])) as first:
            template = first.streams.video[0]
            video = container.add_stream_from_template(template)
            width, height = template.codec_context.width, template.codec_context.height
        track = _AudioTrack(container, *audio_for_mux(audio, total / fps)) if audio is not None else None
        for path in segments:
            with av.open(str(path)) as source:
                for packet in source.demux(source.streams.video[0]):
                    if packet.dts is None:  # the demuxer's empty end-of-stream packet
                        continue
                    packet.stream = video
                    container.mux(packet)
                    count += 1
            if track is not None:  # keep audio and video interleaved in time
                track.feed_until(count / fps)
        if track is not None:
            track.finish()
    return EncodedVideo(out_path, width, height, fps, count, count / fps, track is not None, out_path.stat().st_size)
