"""Audio conditioning: decoding, 16 kHz chains, wav2vec2 features, windows and segment chunks.

Golden files (tests/goldens/audio, see its README) come from upstream Hallo3's own code.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import av
import librosa
import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file

from hallo3_worker.conditioning import audio as A
from hallo3_worker.conditioning import decode as D
from hallo3_worker.conditioning import separation as S
from hallo3_worker.conditioning import tiny_assets
from hallo3_worker.errors import ErrorCode, InputError

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "goldens" / "audio"
SPEECH_WAV = GOLDEN / "speech_2p3s_16k.wav"
TINY_W2V = GOLDEN / "tiny_wav2vec2"
FEATURE_REL_TOL = 1e-4  # max |ours - upstream| / max |upstream|
SDPA_EAGER_ABS_TOL = 1e-5  # observed ~6e-7 on the tiny model


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN / "upstream_audio.safetensors"))


@pytest.fixture(scope="module")
def golden_meta() -> dict:
    return json.loads((GOLDEN / "upstream_meta.json").read_text())


@pytest.fixture(scope="module")
def speech_16k() -> np.ndarray:
    return A.mix_to_16k(D.decode_audio(SPEECH_WAV))


@pytest.fixture(scope="module")
def encoder() -> A.Wav2VecEncoder:
    return A.Wav2VecEncoder.from_pretrained(TINY_W2V, device="cpu", dtype=torch.float32, attn_implementation="sdpa")


@pytest.fixture(scope="module")
def features(encoder: A.Wav2VecEncoder, speech_16k: np.ndarray) -> A.AudioFeatures:
    return encoder.encode(speech_16k)


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


# ------------------------------------------------------------------------ frames and padding


def test_frame_counts_and_padding_rule() -> None:
    assert A.frame_count(36_800) == 58  # 2.3 s
    assert A.padded_frame_count(58) == 98
    assert A.frame_count(80_000) == 125 and A.padded_frame_count(125) == 147  # 5.00 s
    assert A.padded_frame_count(49) == 49 and A.padded_frame_count(98) == 98
    assert A.frame_count(641) == 2 and A.frame_count(640) == 1

    values = np.ones(36_800, np.float32)
    padded, frames = A.pad_waveform(values, 58)
    assert frames == 98 and padded.shape == (62_400,)
    assert padded.dtype == np.float32
    np.testing.assert_array_equal(padded[:36_800], values)
    assert not padded[36_800:].any()

    exact = np.ones(49 * 640, np.float32)
    same, frames = A.pad_waveform(exact, 49)
    assert frames == 49 and same is exact

    five_s, frames = A.pad_waveform(np.ones(80_000, np.float32), 125)
    assert frames == 147 and five_s.shape == (94_080,)

    # upstream counts segments over the padded length; the real length needs one fewer here
    assert A.num_segments(147) == 4 and A.num_segments(125) == 3
    assert A.num_segments(98) == 3 and A.num_segments(58) == 2
    assert A.num_segments(47) == 1 and A.num_segments(48) == 2


def test_normalised_padded_input_matches_upstream(
    encoder: A.Wav2VecEncoder, speech_16k: np.ndarray, golden: dict, golden_meta: dict
) -> None:
    assert speech_16k.shape == (golden_meta["num_samples_wav"],) == (36_800,)
    padded, frames, padded_frames = encoder.prepare_input(speech_16k)
    assert (frames, padded_frames) == (golden_meta["audio_length"], golden_meta["padded_length"]) == (58, 98)
    expected = golden["input_values"][0].numpy()
    assert padded.shape == expected.shape == (62_400,)
    np.testing.assert_allclose(padded, expected, rtol=0, atol=1e-6)
    # zero mean, unit variance over the real samples; zeros after them
    assert abs(float(padded[:36_800].mean())) < 1e-4 and float(padded[:36_800].std()) == pytest.approx(1.0, abs=1e-3)
    assert not padded[36_800:].any()


# ------------------------------------------------------------------------------------ wav2vec2


def test_features_match_upstream_golden(features: A.AudioFeatures, golden: dict) -> None:
    expected = golden["features"]
    assert features.features.shape == expected.shape == (98, 2, 32)
    assert features.features.dtype == torch.float32 and features.features.device.type == "cpu"
    scale = expected.abs().max().item()
    err = (features.features - expected).abs().max().item()
    assert err <= FEATURE_REL_TOL * scale, f"max abs err {err:.3g} vs scale {scale:.3g}"
    assert features.windowed.shape == golden["windowed"].shape == (98, 5, 2, 32)
    assert (features.windowed - golden["windowed"]).abs().max().item() <= FEATURE_REL_TOL * scale
    assert features.audio_length == 58 and features.padded_length == 98
    assert features.num_segments == 2 and features.upstream_num_segments == 3


def test_sdpa_and_eager_give_the_same_features(
    encoder: A.Wav2VecEncoder, features: A.AudioFeatures, speech_16k: np.ndarray
) -> None:
    eager = A.Wav2VecEncoder.from_pretrained(TINY_W2V, device="cpu", dtype=torch.float32, attn_implementation="eager")
    assert eager.model.config._attn_implementation == "eager"
    assert encoder.model.config._attn_implementation == "sdpa"
    diff = (eager.encode(speech_16k).features - features.features).abs().max().item()
    assert diff <= SDPA_EAGER_ABS_TOL


def test_attn_implementation_must_be_explicit_and_known() -> None:
    with pytest.raises(ValueError, match="attn_implementation"):
        A.Wav2VecEncoder.from_pretrained(TINY_W2V, device="cpu", attn_implementation="flash_attention_2")


def test_padding_before_wav2vec_changes_the_features(
    encoder: A.Wav2VecEncoder, speech_16k: np.ndarray, features: A.AudioFeatures
) -> None:
    """Attention is global, so the zero padding affects the real frames too (why the rule is kept)."""
    unpadded = torch.from_numpy(encoder.normalize(speech_16k)).unsqueeze(0)
    alone = encoder.hidden_states(unpadded, 58)
    assert alone.shape == (58, 2, 32)
    assert (alone - features.features[:58]).abs().max().item() > 1e-3


def test_interpolation_is_linear_align_corners(encoder: A.Wav2VecEncoder) -> None:
    """Hook the CNN output and check the projection input is its align_corners=True interpolation."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        encoder.model.feature_extractor.register_forward_hook(lambda m, i, o: seen.__setitem__("cnn", o)),
        encoder.model.feature_projection.register_forward_pre_hook(lambda m, i: seen.__setitem__("proj_in", i[0])),
    ]
    try:
        encoder.hidden_states(torch.randn(1, 16_000, generator=torch.Generator().manual_seed(0)), 25)
    finally:
        for hook in hooks:
            hook.remove()
    cnn = seen["cnn"]  # (1, 16, 49) at ~50 Hz
    assert cnn.shape[-1] == 49
    expected = torch.nn.functional.interpolate(cnn, size=25, mode="linear", align_corners=True).transpose(1, 2)
    torch.testing.assert_close(seen["proj_in"], expected, rtol=0, atol=0)
    # align_corners=True keeps both end points
    torch.testing.assert_close(seen["proj_in"][0, 0], cnn[0, :, 0], rtol=0, atol=0)
    torch.testing.assert_close(seen["proj_in"][0, -1], cnn[0, :, -1], rtol=0, atol=0)


def test_encoder_rejects_bad_waveforms(encoder: A.Wav2VecEncoder) -> None:
    with pytest.raises(ValueError):
        encoder.prepare_input(np.zeros((2, 100), np.float32))
    with pytest.raises(ValueError):
        encoder.prepare_input(np.zeros(0, np.float32))


def test_no_package_code_sets_output_attentions() -> None:
    package = REPO / "src" / "hallo3_worker"
    offenders = [
        f"{path.relative_to(REPO)}:{lineno}"
        for path in sorted(package.rglob("*.py"))
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"output_attentions", line)
    ]
    assert offenders == []


# ----------------------------------------------------------------------- windows and segments


def test_window_clamps_at_both_ends(golden: dict) -> None:
    seq = torch.arange(4.0).reshape(4, 1)
    win = A.window_features(seq)
    assert win.shape == (4, 5, 1)
    assert win[..., 0].tolist() == [[0, 0, 0, 1, 2], [0, 0, 1, 2, 3], [0, 1, 2, 3, 3], [1, 2, 3, 3, 3]]
    single = A.window_features(torch.ones(1, 3))
    assert single.shape == (1, 5, 3)
    # upstream's process_audio_emb on the golden features
    assert torch.equal(A.window_features(golden["features"]), golden["windowed"])
    with pytest.raises(ValueError):
        A.window_features(torch.zeros(0, 2))


def test_segment_chunks_match_upstream_exactly(golden: dict, golden_meta: dict) -> None:
    windowed, expected = golden["windowed"], golden["segment_chunks"]
    assert expected.shape[0] == golden_meta["times"] == A.num_segments(windowed.shape[0]) == 3
    for t in range(expected.shape[0]):
        chunk = A.segment_audio_chunk(windowed, t)
        assert chunk.shape == (49, 5, 2, 32) and chunk.dtype == torch.float32
        assert torch.equal(chunk.to(torch.bfloat16), expected[t]), f"segment {t}"


def test_segment_chunk_rules() -> None:
    frames = torch.arange(1.0, 99.0).reshape(98, 1)  # frame i holds i + 1 (no zero rows)
    first = A.segment_audio_chunk(frames, 0)
    assert first[:2, 0].tolist() == [0, 0]  # zero prefix for segment 0
    assert first[2:, 0].tolist() == list(range(1, 48))  # frames 0..46
    second = A.segment_audio_chunk(frames, 1)
    assert second[:, 0].tolist() == list(range(46, 95))  # frames 45..93: prefix = last 2 rows of segment 0
    last = A.segment_audio_chunk(frames, 2)
    assert last[:6, 0].tolist() == [93, 94, 95, 96, 97, 98]  # frames 92..97
    assert (last[6:, 0] == 98).all()  # last row repeated to 49 rows
    with pytest.raises(ValueError):
        A.segment_audio_chunk(frames, 3)
    with pytest.raises(ValueError):
        A.segment_audio_chunk(frames, -1)
    # input is not modified
    assert frames[0, 0] == 1


def test_real_length_segments_cover_the_output(features: A.AudioFeatures) -> None:
    """ceil(58/47) = 2 segments give 2*47 = 94 >= 58 output frames from the padded features."""
    chunks = [A.segment_audio_chunk(features.windowed, t) for t in range(features.num_segments)]
    assert len(chunks) == 2 and features.num_segments * A.NEW_FRAMES_PER_SEGMENT >= features.audio_length


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


# --------------------------------------------------------------------------------- tiny assets


def test_tiny_wav2vec2_builder_is_deterministic_and_loads(tmp_path: Path) -> None:
    a = tiny_assets.build_tiny_wav2vec2(tmp_path / "a", seed=3)
    b = tiny_assets.build_tiny_wav2vec2(tmp_path / "b", seed=3)
    wa, wb = load_numpy(str(a / "model.safetensors")), load_numpy(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)
    enc = A.Wav2VecEncoder.from_pretrained(a, device="cpu", dtype=torch.float32)
    assert (enc.num_layers, enc.hidden_size) == (2, 32)
    speech = 0.1 * np.random.default_rng(0).standard_normal(16_000).astype(np.float32)  # 1 s -> 25 frames
    out = enc.encode(speech)
    assert out.audio_length == 25 and out.padded_length == 49
    assert out.features.shape == (49, 2, 32) and out.windowed.shape == (49, 5, 2, 32)
    assert torch.isfinite(out.features).all()


def test_ctc_checkpoint_loads_like_the_real_wav2vec2_base_960h(tmp_path: Path) -> None:
    """wav2vec2-base-960h is a Wav2Vec2ForCTC checkpoint ("wav2vec2." key prefix); it must load the same."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    base = A.Wav2VecEncoder.from_pretrained(TINY_W2V, device="cpu", dtype=torch.float32)
    ctc = Wav2Vec2ForCTC(Wav2Vec2Config.from_pretrained(TINY_W2V, vocab_size=8))
    ctc.wav2vec2.load_state_dict(base.model.state_dict())
    ctc.save_pretrained(tmp_path, safe_serialization=True)
    Wav2Vec2FeatureExtractor.from_pretrained(TINY_W2V).save_pretrained(tmp_path)
    loaded = A.Wav2VecEncoder.from_pretrained(tmp_path, device="cpu", dtype=torch.float32)
    speech = 0.1 * np.random.default_rng(1).standard_normal(8_000).astype(np.float32)
    assert torch.equal(loaded.encode(speech).features, base.encode(speech).features)
