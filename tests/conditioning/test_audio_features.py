"""wav2vec2 features, windows and segment chunks against upstream's goldens (tests/goldens/audio).

Nothing here decodes or resamples media (tests/conditioning/test_audio.py does): the goldens' 16 kHz
speech is read with the standard library, so these tests also run on a stack without PyAV,
librosa or soundfile (the lent GPU machines'; scripts/device_rehearsal.sh).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import golden_recipes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file

from hallo3_worker.conditioning import audio as A
from hallo3_worker.conditioning import tiny_assets

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
    speech, rate = golden_recipes.read_pcm16_wav(SPEECH_WAV)
    assert rate == A.SAMPLE_RATE
    return speech


@pytest.fixture(scope="module")
def encoder() -> A.Wav2VecEncoder:
    return A.Wav2VecEncoder.from_pretrained(TINY_W2V, device="cpu", dtype=torch.float32, attn_implementation="sdpa")


@pytest.fixture(scope="module")
def features(encoder: A.Wav2VecEncoder, speech_16k: np.ndarray) -> A.AudioFeatures:
    return encoder.encode(speech_16k)


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
