"""Test media written at test time: speech in many channel counts, sample formats and containers."""

from __future__ import annotations

from pathlib import Path

import av
import librosa
import numpy as np
import soundfile as sf

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def speech_clip(seconds: float, rate: int) -> np.ndarray:
    """The speech asset repeated to ``seconds`` and resampled to ``rate``: float32 (n,)."""
    speech, speech_rate = sf.read(ASSETS / "speech.wav", dtype="float32")
    speech = np.tile(speech, int(np.ceil(seconds * speech_rate / speech.size)))[: int(seconds * speech_rate)]
    if rate == speech_rate:
        return speech
    return librosa.resample(speech, orig_sr=speech_rate, target_sr=rate).astype(np.float32)


def write_speech(path: Path, seconds: float) -> Path:
    """The first ``seconds`` of the speech asset (repeated as needed), at its own rate, as a WAV at ``path``."""
    rate = sf.info(ASSETS / "speech.wav").samplerate
    sf.write(path, speech_clip(seconds, rate), rate)
    return path


def write_multichannel(path: Path, channels: int, seconds: float = 0.6, rate: int = 16_000, *, layout: str | None = None,
                       codec: str | None = None, subtype: str = "PCM_16") -> Path:
    """Speech in every channel at falling gains: a WAV/FLAC through libsndfile (no channel layout stored
    for WAV), or through PyAV with an explicit ``layout`` and ``codec`` (FLAC, Opus)."""
    speech = speech_clip(seconds, rate)
    samples = np.stack([speech * (1 - 0.08 * c) for c in range(channels)])  # (C, n)
    if codec is None:
        sf.write(path, samples.T, rate, subtype=subtype)
        return path
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate, layout=layout)
        for start in range(0, samples.shape[1], 960):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, start : start + 960].T).reshape(1, -1),
                                               format="flt", layout=layout)
            frame.sample_rate, frame.pts = rate, start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path
