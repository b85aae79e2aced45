"""The whole pipeline on the embedded tiny model: segments, lengths, seeds, faces, cancel, MP4."""

from __future__ import annotations

import base64
import io
import math
import threading
from pathlib import Path

import av
import numpy as np
import PIL.Image
import pytest
import soundfile as sf
import torch
from media_files import write_multichannel, write_speech
from PIL import Image

from hallo3_worker.conditioning.decode import decode_audio
from hallo3_worker.errors import ErrorCode, InputError
from hallo3_worker.interface import Cancelled, GenerationRequest, ResumeStateError
from hallo3_worker.settings import Settings
from hallo3_worker.tiny import build_tiny_pipeline
from hallo3_worker.worker.service import Worker

ASSETS = Path(__file__).resolve().parent / "assets"


@pytest.fixture(scope="module")
def pipeline():
    return build_tiny_pipeline()


@pytest.fixture(scope="module")
def speech_2_5s(tmp_path_factory) -> Path:
    """Exactly 2.5 s of speech at 16 kHz (the 2.33 s asset followed by its own beginning)."""
    return write_speech(tmp_path_factory.mktemp("audio") / "speech_2_5s.wav", 2.5)


@pytest.fixture(scope="module")
def speech_1s(tmp_path_factory) -> Path:
    """The first second of the speech asset: one segment."""
    return write_speech(tmp_path_factory.mktemp("audio") / "speech_1s.wav", 1.0)


def _request(image: Path, audio: Path, work_dir: Path, **kw) -> GenerationRequest:
    return GenerationRequest(
        image_path=image, audio_path=audio, prompt="A person is talking.", seed=kw.pop("seed", 1),
        steps=kw.pop("steps", 2), work_dir=work_dir, **kw,
    )


class CallCounter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args) -> None:
        self.calls += 1


def test_segments_frames_and_reference_reuse(pipeline, speech_2_5s: Path, tmp_path: Path) -> None:
    denoiser, reference = CallCounter(), CallCounter()
    hooks = [
        pipeline.components.transformer.register_forward_hook(denoiser),
        pipeline.components.reference_net.register_forward_hook(reference),
    ]
    try:
        request = _request(ASSETS / "face.jpg", speech_2_5s, tmp_path, steps=3)
        job = pipeline.prepare(request)
        handed_on: list[tuple[int, int, np.ndarray]] = []  # (segment, transformer calls so far, frames)
        result = pipeline.generate(job, on_frames=lambda done: handed_on.append((done.segment, denoiser.calls, done.frames)))
    finally:
        for hook in hooks:
            hook.remove()

    frames = math.ceil(2.5 * 25)  # 63
    segments = math.ceil(frames / 47)  # 2 (upstream would run 3: it pads 63 frames to 98 first)
    assert job.num_frames == frames
    # Each segment's frames are handed on as soon as it is decoded, before the next segment denoises.
    assert [(i, calls, f.shape) for i, calls, f in handed_on] == [(0, 3, (47, 480, 480, 3)), (1, 6, (16, 480, 480, 3))]
    assert result.frames.shape[0] == 0  # handed on, not kept
    video = np.concatenate([f for _, _, f in handed_on])
    assert video.shape == (frames, 480, 480, 3)  # square input -> 480x480 output
    assert video.dtype == np.uint8 and result.fps == 25
    assert denoiser.calls == segments * 3  # one batched CFG forward per step per segment
    assert reference.calls == 1  # the reference network runs once per job
    # Vocal separation writes only into the job's folder.
    assert {p.name for p in tmp_path.iterdir()} == {"separator_input.wav", "vocals.wav"}


def test_same_seed_same_frames_other_seed_differs(pipeline, speech_1s: Path, tmp_path: Path) -> None:
    def frames(seed: int, **kwargs) -> np.ndarray:
        request = _request(ASSETS / "face.jpg", speech_1s, tmp_path, seed=seed, separate_vocals=False)
        return pipeline.generate(pipeline.prepare(request), **kwargs).frames

    first = frames(5)
    handed_on: list[np.ndarray] = []
    frames(5, on_frames=lambda done: handed_on.append(done.frames))
    assert np.array_equal(first, np.concatenate(handed_on))  # the same frames, kept or handed on
    assert not np.array_equal(first, frames(6))


def test_a_job_resumes_after_any_segment_with_the_frames_of_an_uninterrupted_run(pipeline, tmp_path: Path) -> None:
    speech, rate = sf.read(ASSETS / "speech.wav", dtype="float32")
    audio = tmp_path / "speech_4s.wav"
    sf.write(audio, np.tile(speech, 2)[: 4 * rate], rate)  # 100 frames: 3 segments
    job = pipeline.prepare(_request(ASSETS / "face.jpg", audio, tmp_path, seed=11, separate_vocals=False))
    whole: list = []
    pipeline.generate(job, on_frames=whole.append)
    assert [done.segment for done in whole] == [0, 1, 2] and all(done.resume_state for done in whole)
    for after in whole:  # after the last one nothing is left to generate (a job that failed in delivery)
        rest: list = []
        pipeline.generate(job, on_frames=rest.append, resume=after.resume_state)
        assert [done.segment for done in rest] == list(range(after.segment + 1, 3))
        for resumed, original in zip(rest, whole[after.segment + 1 :]):
            assert np.array_equal(resumed.frames, original.frames) and resumed.resume_state == original.resume_state
    other_canvas = io.BytesIO()
    torch.save({"next_segment": 1, "motion": torch.zeros(1, 3, 2, 8, 8), "noise": torch.zeros(8, dtype=torch.uint8)},
               other_canvas)
    for bad in (b"not a state", other_canvas.getvalue()):  # unreadable; from another model's canvas
        with pytest.raises(ResumeStateError):
            pipeline.generate(job, resume=bad)


def test_image_without_a_face_is_rejected_before_generation(pipeline, tmp_path: Path) -> None:
    gradient = np.tile(np.linspace(0, 255, 512, dtype=np.uint8)[None, :, None], (512, 1, 3))
    image = tmp_path / "no_face.png"
    Image.fromarray(gradient).save(image)
    with pytest.raises(InputError) as err:
        pipeline.prepare(_request(image, ASSETS / "speech.wav", tmp_path))
    assert err.value.code is ErrorCode.NO_FACE


def test_cancel_stops_generation(pipeline, tmp_path: Path) -> None:
    job = pipeline.prepare(_request(ASSETS / "face.jpg", ASSETS / "speech.wav", tmp_path, separate_vocals=False))
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        pipeline.generate(job, cancel=cancel)


def test_worker_job_on_the_tiny_model_gives_a_muxed_mp4(pipeline, speech_2_5s: Path, tmp_path: Path) -> None:
    worker = Worker(Settings(work_dir=tmp_path / "work"), pipeline)
    job = {
        "id": "tiny-e2e",
        "input": {
            "image": base64.b64encode((ASSETS / "face.jpg").read_bytes()).decode(),
            "audio": base64.b64encode(speech_2_5s.read_bytes()).decode(),
            "seed": 3,
            "steps": 2,
        },
    }
    result = worker.run(job)
    assert "error" not in result, result
    assert worker.run(job)["video"] == result["video"]  # the same job gives the same bytes
    assert (result["frames"], result["width"], result["height"], result["fps"]) == (63, 480, 480, 25)
    with av.open(io.BytesIO(base64.b64decode(result["video"]))) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        assert video.codec_context.name == "h264" and audio.codec_context.name == "aac"
        decoded = sum(1 for _ in container.decode(video=0))
        audio_s = float(audio.duration * audio.time_base)
    assert decoded == 63
    assert abs(audio_s - 2.5) <= 1 / 25
    assert list((tmp_path / "work").iterdir()) == []  # the job folder is gone


def _run_worker(pipeline, tmp_path: Path, audio: Path, **fields) -> dict:
    worker = Worker(Settings(work_dir=tmp_path / "work", min_duration_s=0.5), pipeline)
    job = {"id": "tiny-media", "input": {"image": base64.b64encode((ASSETS / "face.jpg").read_bytes()).decode(),
                                         "audio": base64.b64encode(audio.read_bytes()).decode(), "steps": 2, **fields}}
    return worker.run(job)


AUDIO_FORMATS = {  # file name -> how write_multichannel writes it (0.8 s of speech)
    "3ch.wav": dict(channels=3),
    "4ch.wav": dict(channels=4),
    "6ch.wav": dict(channels=6),
    "8ch.wav": dict(channels=8),
    "pcm24.wav": dict(channels=2, subtype="PCM_24", rate=44_100),
    "float32.wav": dict(channels=1, subtype="FLOAT", rate=22_050),
    "51.flac": dict(channels=6, layout="5.1(side)", codec="flac", rate=48_000),
    "51.opus": dict(channels=6, layout="5.1", codec="libopus", rate=48_000),
}


@pytest.mark.parametrize("name", list(AUDIO_FORMATS))
def test_audio_formats_and_channel_counts_go_through_the_whole_pipeline(pipeline, tmp_path: Path, name: str) -> None:
    """Vocal separation (audio-separator with a stand-in model), wav2vec2 and the mux see at most two channels."""
    audio = write_multichannel(tmp_path / name, seconds=0.8, **AUDIO_FORMATS[name])
    result = _run_worker(pipeline, tmp_path, audio)
    assert "error" not in result, result
    duration = decode_audio(audio).duration_s
    assert result["frames"] == math.ceil(duration * 25) and result["has_audio"]
    with av.open(io.BytesIO(base64.b64decode(result["video"]))) as container:
        assert sum(1 for _ in container.decode(video=0)) == result["frames"]
        stream = container.streams.audio[0]
        assert stream.codec_context.channels == (1 if AUDIO_FORMATS[name]["channels"] == 1 else 2)
        assert abs(float(stream.duration * stream.time_base) - duration) <= 1 / 25 + 0.03  # AAC priming
    if AUDIO_FORMATS[name]["channels"] > 2:
        assert any("mixed down to stereo" in warning for warning in result["warnings"])


def test_audio_without_a_channel_layout_fails_before_generation(pipeline, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(pipeline, "generate", lambda *a, **k: pytest.fail("generation started"))
    result = _run_worker(pipeline, tmp_path, write_multichannel(tmp_path / "9ch.wav", 9, seconds=0.8))
    assert result["error_code"] == ErrorCode.AUDIO_LAYOUT_UNSUPPORTED.value and "9 channels" in result["error"]


def test_each_input_is_decoded_once_per_job(pipeline, tmp_path: Path, monkeypatch) -> None:
    audio = write_multichannel(tmp_path / "speech.wav", 1, seconds=0.8)
    opened: list[str] = []

    def counting(opener):
        def wrapper(*args, **kwargs):
            source = args[1] if opener is soundfile_init else args[0]
            opened.append(Path(str(source)).name if isinstance(source, (str, Path)) else "<stream>")
            return opener(*args, **kwargs)
        return wrapper

    soundfile_init = sf.SoundFile.__init__  # librosa and audio-separator read through it
    monkeypatch.setattr(sf.SoundFile, "__init__", counting(soundfile_init))
    monkeypatch.setattr(av, "open", counting(av.open))
    monkeypatch.setattr(PIL.Image, "open", counting(PIL.Image.open))
    result = _run_worker(pipeline, tmp_path, audio)
    assert "error" not in result, result
    assert opened.count("image.bin") == 1 and opened.count("audio.bin") == 1, opened
    # the other files opened are the job's own: the separator's input copy and its vocals, the encoded segments
    others = {name for name in opened if name not in ("image.bin", "audio.bin")
              and "vocals.wav" not in name and "segment_" not in name}
    assert others <= {"separator_input.wav", "output.mp4"}, opened


def test_offloaded_networks_visit_the_compute_device_only_while_they_run() -> None:
    import torch
    from torch import nn

    from hallo3_worker.pipeline import Hallo3Pipeline, Placement

    class Tied(nn.Module):  # T5-style tied embedding plus a buffer
        def __init__(self) -> None:
            super().__init__()
            self.shared = nn.Embedding(10, 4)
            self.encoder = nn.Module()
            self.encoder.embed_tokens = self.shared
            self.norm = nn.LayerNorm(4)
            self.register_buffer("scale", torch.ones(4))

    net = Tied()
    resting = {name: t for name, t in [*net.named_parameters(remove_duplicate=False), *net.named_buffers()]}
    values = {name: t.clone() for name, t in resting.items()}
    # "meta" stands in for the accelerator: the visit must move every tensor there and back.
    visiting = Hallo3Pipeline(components=None, placement=Placement(device=torch.device("meta")))
    with visiting._visiting(net):
        on_device = [*net.named_parameters(remove_duplicate=False), *net.named_buffers()]
        assert {t.device.type for _, t in on_device} == {"meta"}
        assert net.encoder.embed_tokens.weight is net.shared.weight  # the tie holds: one copy
    after = dict([*net.named_parameters(remove_duplicate=False), *net.named_buffers()])
    assert all(after[name] is tensor for name, tensor in resting.items())  # the resting objects, not copies
    assert all(torch.equal(after[name], values[name]) for name in values)

    with pytest.raises(RuntimeError), visiting._visiting(net):
        raise RuntimeError("failure inside")
    assert all(t.device.type == "cpu" for t in net.parameters())  # back even when the network fails

    resident = Hallo3Pipeline(components=None, placement=Placement(device=torch.device("meta"), offload=False))
    with resident._visiting(net):
        assert all(t.device.type == "cpu" for t in net.parameters())  # not offloaded: left alone


def test_full_offload_keeps_the_transformer_away_from_the_vae_decode(speech_2_5s: Path, tmp_path: Path, monkeypatch) -> None:
    """With offload_transformer the transformer visits the device around each segment's sampling only."""
    import contextlib

    import torch

    from hallo3_worker.pipeline import Hallo3Pipeline, Placement

    placement = Placement(offload_transformer=True, feed_forward_chunk=8)
    full = build_tiny_pipeline(placement=placement)
    plain = build_tiny_pipeline()
    events: list[str] = []
    visiting = Hallo3Pipeline._visiting

    @contextlib.contextmanager
    def recording(self, module, offloaded=None, skip=()):
        name = type(module).__name__
        events.append(f"visit {name}" if (offloaded if offloaded is not None else self.placement.offload) else f"resident {name}")
        with visiting(self, module, offloaded, skip):
            yield
        events.append(f"leave {name}")

    monkeypatch.setattr(Hallo3Pipeline, "_visiting", recording)
    decode = full.components.vae.decode
    monkeypatch.setattr(full.components.vae, "decode", lambda latents: events.append("decode") or decode(latents))
    request = _request(ASSETS / "face.jpg", speech_2_5s, tmp_path, steps=2)
    result = full.generate(full.prepare(request))

    segment = ["visit Hallo3Transformer", "leave Hallo3Transformer", "decode"]
    assert events == ["visit T5EncoderModel", "leave T5EncoderModel", "visit ReferenceNet", "leave ReferenceNet", *segment, *segment]
    # The frames of the default placement, up to float rounding of the sliced MLPs' products.
    expected = plain.generate(plain.prepare(request))
    difference = np.abs(result.frames.astype(int) - expected.frames.astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3
    assert all(ff.chunk_tokens == 8 for ff in full.components.transformer.modules() if hasattr(ff, "chunk_tokens"))
    assert torch.equal(
        full.components.transformer.blocks[0].attn.to_qkv.weight, plain.components.transformer.blocks[0].attn.to_qkv.weight
    )
