"""Audio conditioning: decoding, 16 kHz chains, wav2vec2 features, windows and segment chunks.

Golden files (tests/goldens/audio, see its README) come from upstream Hallo3's own code.
"""

from __future__ import annotations

import logging
from pathlib import Path

import av
import librosa
import numpy as np
import pytest
import soundfile as sf

from hallo3_worker.conditioning import audio as A
from hallo3_worker.conditioning import decode as D
from hallo3_worker.conditioning import separation as S
from hallo3_worker.conditioning import tiny_assets
from hallo3_worker.errors import ErrorCode, InputError

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "goldens" / "audio"
SPEECH_WAV = GOLDEN / "speech_2p3s_16k.wav"



def _tone(seconds: float, rate: int, channels: int = 1, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    mono = amplitude * np.sin(2 * np.pi * 220.0 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3.0 * t))
    return np.stack([mono * (1.0 - 0.3 * c) for c in range(channels)], axis=1).astype(np.float32)


# ------------------------------------------------------------------------------------ decoding


def test_decode_wav_keeps_rate_channels_and_duration(tmp_path: Path) -> None:
    path = tmp_path / "stereo.wav"
    sf.write(path, _tone(1.25, 22_050, channels=2), 22_050, subtype="PCM_16")
    decoded = D.decode_audio(path)
    assert decoded.sample_rate == 22_050
    assert decoded.channels == 2
    assert decoded.num_samples == int(1.25 * 22_050)
    assert decoded.duration_s == pytest.approx(int(1.25 * 22_050) / 22_050)
    assert decoded.samples.dtype == np.float32
    # PCM16 decodes to x / 32768 exactly, as libsndfile (and so librosa) reads it
    reread, _ = sf.read(path, dtype="float32", always_2d=True)
    np.testing.assert_array_equal(decoded.samples, reread.T)


def test_decode_aac_in_m4a_without_ffmpeg_binary(tmp_path: Path) -> None:
    """A format libsndfile cannot read: AAC in MP4, written and read back with PyAV only."""
    path = tmp_path / "speech.m4a"
    speech, rate = sf.read(SPEECH_WAV, dtype="float32")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(speech[None, :], format="flt", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    decoded = D.decode_audio(path)
    assert decoded.codec == "aac"
    assert decoded.sample_rate == rate
    assert decoded.duration_s == pytest.approx(2.3, abs=0.1)


@pytest.mark.parametrize(
    "payload",
    [b"", b"this is not audio at all\n" * 20, bytes(range(256)) * 64],
    ids=["empty", "text", "noise-bytes"],
)
def test_undecodable_audio_is_an_input_error(tmp_path: Path, payload: bytes) -> None:
    path = tmp_path / "bad.wav"
    path.write_bytes(payload)
    with pytest.raises(InputError) as info:
        D.decode_audio(path)
    assert info.value.code is ErrorCode.AUDIO_UNDECODABLE


def test_file_without_audio_stream_is_undecodable() -> None:
    with pytest.raises(InputError) as info:
        D.decode_audio(REPO / "tests" / "assets" / "face.jpg")
    assert info.value.code is ErrorCode.AUDIO_UNDECODABLE


def test_missing_file_is_undecodable(tmp_path: Path) -> None:
    with pytest.raises(InputError) as info:
        D.decode_audio(tmp_path / "nope.wav")
    assert info.value.code is ErrorCode.AUDIO_UNDECODABLE


@pytest.mark.parametrize("amplitude", [0.0, 10 ** (-80 / 20)], ids=["digital-silence", "minus-80-dBFS"])
def test_silent_audio_is_rejected(tmp_path: Path, amplitude: float) -> None:
    path = tmp_path / "quiet.wav"
    sf.write(path, np.full(16_000, amplitude, np.float32), 16_000, subtype="FLOAT")
    with pytest.raises(InputError) as info:
        D.decode_audio(path, silence_dbfs=-60.0)
    assert info.value.code is ErrorCode.AUDIO_SILENT
    # the check can be switched off (used for separated vocals, checked after quantisation)
    assert D.decode_audio(path, silence_dbfs=None).num_samples == 16_000


# ---------------------------------------------------------------------------- 16 kHz chains


def test_vocals_resample_matches_ffmpeg_cli_bit_exactly() -> None:
    """PyAV/libswresample chain vs upstream's `ffmpeg -ar 16000` + librosa.load (goldens)."""
    pcm, rate = sf.read(GOLDEN / "resample_in_44k1_stereo.wav", dtype="int16", always_2d=True)
    debian = np.load(GOLDEN / "resample_out_debian_ffmpeg_librosa.npy")  # ffmpeg 5.1.9
    newer = np.load(GOLDEN / "resample_out_imageio_ffmpeg_librosa.npy")  # ffmpeg 9.0.2

    ours = A.pcm16_to_mono_float(A.resample_pcm16(pcm.T.copy(), rate, 16_000))
    assert ours.dtype == np.float32 and ours.shape == debian.shape == (8000,)
    np.testing.assert_array_equal(ours, debian)

    ours_newer = A.pcm16_to_mono_float(A.resample_pcm16(pcm.T.copy(), rate, 16_000, internal_sample_fmt=None))
    np.testing.assert_array_equal(ours_newer, newer)

    # the two FFmpeg generations differ by at most 2 LSB per channel (mean of two channels)
    assert 0 < np.abs(debian - newer).max() <= 2 / 32768


def test_quantize_pcm16_truncates_like_the_separator_writer() -> None:
    x = np.array([[0.5, -0.5, 1.0, -1.0, 2.0, 0.99999, 1e-5]], np.float32)
    np.testing.assert_array_equal(A.quantize_pcm16(x), [[16383, -16383, 32767, -32767, 32767, 32766, 0]])


def test_vocals_to_16k_is_quantise_resample_average() -> None:
    vocals = A.DecodedAudio(samples=_tone(0.4, 44_100, channels=2).T.copy(), sample_rate=44_100, codec="pcm_f32le")
    speech = A.vocals_to_16k(vocals)
    expected = A.pcm16_to_mono_float(A.resample_pcm16(A.quantize_pcm16(vocals.samples), 44_100))
    np.testing.assert_array_equal(speech, expected)
    assert speech.shape == (int(0.4 * 16_000),)
    # channels are resampled independently: the mono path gives the stereo path's left channel
    pcm = A.quantize_pcm16(vocals.samples)
    np.testing.assert_array_equal(A.resample_pcm16(pcm[:1], 44_100), A.resample_pcm16(pcm, 44_100)[:1])


def test_mix_to_16k_matches_librosa_load(tmp_path: Path) -> None:
    """Without separation upstream reads the file with librosa.load(sr=16000)."""
    path = tmp_path / "mix.wav"
    sf.write(path, _tone(0.7, 44_100, channels=2), 44_100, subtype="PCM_16")
    expected, rate = librosa.load(path, sr=16_000)
    np.testing.assert_array_equal(A.mix_to_16k(D.decode_audio(path)), expected)
    assert rate == 16_000
    same_rate, _ = librosa.load(SPEECH_WAV, sr=16_000)
    np.testing.assert_array_equal(A.mix_to_16k(D.decode_audio(SPEECH_WAV)), same_rate)


# ---------------------------------------------------------------------------------- separation


def test_vocal_separation_through_audio_separator_with_stand_in_model(tmp_path: Path) -> None:
    """Plumbing only: real audio-separator loading and MDX running code, stand-in ONNX weights."""
    model_dir = tiny_assets.build_fake_vocal_separator(tmp_path / "models")
    before = sorted(p.name for p in model_dir.iterdir())
    separator = S.VocalSeparator(model_dir, torch_device="cpu")
    assert separator.providers[-1] == "CPUExecutionProvider"
    audio = D.decode_audio(SPEECH_WAV)

    vocals_path = separator.separate(audio, tmp_path / "job-1")
    assert vocals_path == tmp_path / "job-1" / "vocals.wav"
    assert sorted(p.name for p in (tmp_path / "job-1").iterdir()) == ["separator_input.wav", "vocals.wav"]
    vocals = D.decode_audio(vocals_path)
    assert vocals.sample_rate == 44_100 and vocals.channels == 2
    assert vocals.duration_s == pytest.approx(audio.duration_s, abs=1e-3)
    mix_44k = librosa.resample(audio.mono(), orig_sr=16_000, target_sr=44_100, res_type="soxr_hq")
    n = min(mix_44k.size, vocals.num_samples)
    assert np.corrcoef(mix_44k[:n], vocals.samples[0, :n])[0, 1] > 0.99  # the stand-in scales the spectrogram

    speech = A.speech_to_16k(audio, job_dir=tmp_path / "job-2", separator=separator)
    assert speech.dtype == np.float32 and speech.ndim == 1
    assert abs(speech.size - vocals.duration_s * 16_000) <= 1
    np.testing.assert_array_equal(speech, A.vocals_to_16k(D.decode_audio(tmp_path / "job-2" / "vocals.wav")))
    assert sorted(p.name for p in model_dir.iterdir()) == before  # nothing written to the model folder


def test_separator_chatter_stays_out_of_the_log_unless_debug(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                                             caplog: pytest.LogCaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """audio-separator's log lines, tqdm bars and warnings appear only when the worker logs at DEBUG."""
    model_dir = tiny_assets.build_fake_vocal_separator(tmp_path / "models")
    audio = D.decode_audio(SPEECH_WAV)
    package = logging.getLogger("hallo3_worker")
    monkeypatch.setattr(package, "propagate", True)  # to caplog's handler, whatever configured it before
    monkeypatch.setattr(package, "level", package.level)  # restored afterwards
    caplog.set_level(logging.DEBUG)

    package.setLevel(logging.INFO)  # HALLO3_LOG_LEVEL's default
    S.VocalSeparator(model_dir, torch_device="cpu").separate(audio, tmp_path / "quiet")
    err = capfd.readouterr().err
    assert "it/s" not in err and "%|" not in err and "soundfile" not in err and "Warning" not in err, err
    assert not [r for r in caplog.records if r.name.startswith("audio_separator") or r.levelno >= logging.WARNING]
    assert not [r for r in caplog.records if r.levelno > logging.DEBUG and "Warning" in r.getMessage()]
    caplog.clear()

    package.setLevel(logging.DEBUG)  # HALLO3_LOG_LEVEL=DEBUG shows it all again
    S.VocalSeparator(model_dir, torch_device="cpu").separate(audio, tmp_path / "debug")
    assert "100%" in capfd.readouterr().err  # the bars
    messages = [r.getMessage() for r in caplog.records]
    assert "Using soundfile for writing." in messages
    warned = [r.getMessage() for r in caplog.records if r.name == S.logger.name and r.levelno == logging.DEBUG]
    assert any("RuntimeWarning: invalid value encountered in divide" in m for m in warned), warned


def test_separator_refuses_an_incomplete_model_folder(tmp_path: Path) -> None:
    model_dir = tiny_assets.build_fake_vocal_separator(tmp_path / "models")
    (model_dir / "mdx_model_data.json").unlink()
    separator = S.VocalSeparator(model_dir)
    with pytest.raises(S.SeparationError, match=r"mdx_model_data\.json"):
        separator.load()
    with pytest.raises(S.SeparationError, match=r"Kim_Vocal_2\.onnx"):
        S.check_model_dir(tmp_path / "empty")


def test_onnx_providers_follow_onnxruntime(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: both)
    assert S.onnx_providers() == both
    assert S.onnx_providers(use_cuda=False) == ["CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert S.onnx_providers() == ["CPUExecutionProvider"]


def test_speech_to_16k_rejects_separation_without_vocals(tmp_path: Path) -> None:
    class NoVocals:
        def separate(self, audio: A.DecodedAudio, job_dir: Path) -> Path:
            job_dir.mkdir(parents=True, exist_ok=True)
            path = job_dir / "vocals.wav"
            sf.write(path, np.full((4410, 2), 1e-6, np.float32), 44_100, subtype="FLOAT")  # quantises to 0
            return path

    with pytest.raises(InputError) as info:
        A.speech_to_16k(D.decode_audio(SPEECH_WAV), job_dir=tmp_path / "job", separator=NoVocals())
    assert info.value.code is ErrorCode.AUDIO_SILENT


def test_the_golden_speech_decodes_as_the_stdlib_reads_it() -> None:
    """The golden tests read the goldens' speech with the standard library; the worker's decode agrees."""
    from golden_recipes import read_pcm16_wav

    speech, rate = read_pcm16_wav(SPEECH_WAV)
    np.testing.assert_array_equal(A.mix_to_16k(D.decode_audio(SPEECH_WAV)), speech)
    assert rate == A.SAMPLE_RATE
