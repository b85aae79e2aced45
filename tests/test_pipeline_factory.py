"""hallo3_worker.pipeline_factory, the weights branch of runtime.load_pipeline and the start-up fitness
checks, on a tiny weights folder in the real layout. CPU only."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import tiny_weights as tw
import torch

from hallo3_worker import fitness, pipeline_factory
from hallo3_worker import weights as hw
from hallo3_worker.conditioning.audio import Wav2VecEncoder
from hallo3_worker.conditioning.separation import VocalSeparator
from hallo3_worker.conditioning.text import T5TextEncoder
from hallo3_worker.interface import GenerationRequest
from hallo3_worker.models.cpu_speedups import use_onednn_conv3d
from hallo3_worker.models.layers import fuse_projections
from hallo3_worker.models.vae import Hallo3VAE
from hallo3_worker.pipeline import Hallo3Components, Hallo3Pipeline, Placement
from hallo3_worker.settings import Settings, load_settings
from hallo3_worker.tiny import TINY_CANVAS, TinyFaceAnalyzer
from hallo3_worker.worker import runtime

REPO_ROOT = Path(__file__).resolve().parents[1]
ASSETS = REPO_ROOT / "tests" / "assets"

CPU = torch.device("cpu")
PLACEMENT = Placement(device=CPU, dtype=torch.float32, offload_device=CPU, offload=True)
FACE_FILES = [rel for rel in hw.AUX_REQUIRED_FILES if rel.startswith(hw.FACE_ANALYSIS_DIR + "/")]


def _explicit(root: Path) -> hw.WeightsLocation:
    """Locate ``root`` only (no cached-models, volume or image folders)."""
    return hw.locate_weights(root, hf_cache_dir=None, volume_dir=None, image_dir=None)


def _settings(tmp_path: Path, weights_dir: Path | None, **kw) -> Settings:
    return Settings(work_dir=tmp_path / "work", weights_dir=weights_dir, device="cpu", dtype="float32", **kw)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory):
    """The tiny model's networks, written as a converted weights folder (no face-analysis files)."""
    return tw.make_tiny_pipeline_weights(tmp_path_factory.mktemp("weights") / "hallo3")


@pytest.fixture
def complete_copy(weights, tmp_path: Path) -> Path:
    """A private copy of the folder with placeholder face-analysis files: complete for the size checks."""
    root = tmp_path / "hallo3"
    shutil.copytree(weights.root, root)
    for rel in FACE_FILES:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"stand-in face model\n")
    return root


@pytest.fixture(scope="module")
def speech_1s(tmp_path_factory: pytest.TempPathFactory) -> Path:
    speech, rate = sf.read(ASSETS / "speech.wav", dtype="float32")
    path = tmp_path_factory.mktemp("audio") / "speech_1s.wav"
    sf.write(path, speech[:rate], rate)
    return path


def _generate(pipeline: Hallo3Pipeline, audio: Path, work_dir: Path) -> np.ndarray:
    work_dir.mkdir(parents=True, exist_ok=True)
    request = GenerationRequest(
        image_path=ASSETS / "face.jpg", audio_path=audio, prompt="A person is talking.", seed=7, steps=2,
        separate_vocals=False, work_dir=work_dir,
    )
    return pipeline.generate(pipeline.prepare(request)).frames


# ------------------------------------------------------------------------------------ the factory


@pytest.mark.slow
def test_folder_pipeline_equals_the_directly_assembled_one(weights, speech_1s: Path, tmp_path: Path) -> None:
    built = pipeline_factory.build_pipeline_from_weights(
        _explicit(weights.root), PLACEMENT, face_analyzer=TinyFaceAnalyzer(), canvas=TINY_CANVAS
    )
    assert built.is_tiny is False and built.canvas == TINY_CANVAS
    assert {"verify", "transformer", "reference_net", "vae", "text_encoder", "audio_encoder",
            "vocal_separator", "total"} <= set(built.load_timings)
    assert "face_analyzer" not in built.load_timings  # injected, not loaded
    separator = built.components.separator
    assert isinstance(separator, VocalSeparator) and separator.loaded
    assert separator.model_dir == weights.root / hw.AUDIO_SEPARATOR_DIR

    # Every network tensor is the one written, in the right network (the pipeline fuses the
    # attention projections after loading, so the written networks are fused the same way).
    fuse_projections(weights.transformer)
    fuse_projections(weights.reference_net)
    for loaded, source in ((built.components.transformer, weights.transformer),
                           (built.components.reference_net, weights.reference_net),
                           (built.components.vae.vae, weights.vae)):
        expected = source.state_dict()
        got = loaded.state_dict()
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected)

    vae = Hallo3VAE(weights.vae, weights.vae_config.scaling_factor)
    use_onednn_conv3d(vae.vae)  # as the factory (and tiny.py) do on the CPU
    direct = Hallo3Pipeline(
        Hallo3Components(
            transformer=weights.transformer,
            reference_net=weights.reference_net,
            vae=vae,
            text_encoder=T5TextEncoder.from_pretrained(weights.root / hw.T5_DIR, device=CPU, dtype=torch.float32),
            audio_encoder=Wav2VecEncoder.from_pretrained(weights.root / hw.WAV2VEC_DIR, device=CPU),
            face_analyzer=TinyFaceAnalyzer(),
        ),
        PLACEMENT,
        canvas=TINY_CANVAS,
    )
    expected = _generate(direct, speech_1s, tmp_path / "direct")
    frames = _generate(built, speech_1s, tmp_path / "built")
    assert frames.shape == expected.shape and frames.shape[0] == 25 and frames.dtype == np.uint8
    assert frames.std() > 1.0  # real pictures, not a constant
    assert np.array_equal(frames, expected)


def test_canvas_must_fit_the_networks(weights) -> None:
    with pytest.raises(hw.WeightsError, match=r"built for 8x12 latents \(64x96 pixels\), not for the 480x720 canvas"):
        pipeline_factory.build_pipeline_from_weights(_explicit(weights.root), PLACEMENT, face_analyzer=TinyFaceAnalyzer())


def test_face_files_are_required_only_when_loaded(weights) -> None:
    location = _explicit(weights.root)
    assert not any(rel.startswith(hw.FACE_ANALYSIS_DIR) for rel in pipeline_factory.aux_files(location, face=False))
    assert set(FACE_FILES) <= set(pipeline_factory.aux_files(location))
    assert pipeline_factory.check_aux_files(location, face=False) > 0
    with pytest.raises(hw.WeightsError, match="scrfd_10g_bnkps.onnx: file is missing"):
        pipeline_factory.check_aux_files(location)


# ------------------------------------------------------------------------ runtime.load_pipeline


def test_load_pipeline_serves_the_weights_folder(complete_copy: Path, tmp_path: Path, monkeypatch) -> None:
    """Settings -> locate -> placement -> factory; only the canvas and face analyser are the tiny model's."""
    seen = {}
    original = pipeline_factory.build_pipeline_from_weights

    def tiny_canvas(location, placement, **kw):
        seen.update(location=location, placement=placement, limits=kw["limits"])
        return original(location, placement, canvas=TINY_CANVAS, face_analyzer=TinyFaceAnalyzer(), **kw)

    monkeypatch.setattr(pipeline_factory, "build_pipeline_from_weights", tiny_canvas)
    pipeline = runtime.load_pipeline(_settings(tmp_path, complete_copy, max_duration_s=12.0))
    assert isinstance(pipeline, Hallo3Pipeline) and not pipeline.is_tiny
    assert seen["location"].root == complete_copy and seen["location"].source == "explicit"
    # HALLO3_OFFLOAD=auto on the CPU: nothing to offload to
    assert seen["placement"] == dataclasses.replace(PLACEMENT, offload=False)
    assert seen["limits"].max_duration_s == 12.0


@pytest.mark.parametrize(
    "rel",
    [
        f"{hw.CONVERTED_DIRNAME}/transformer.safetensors",
        f"{hw.CONVERTED_DIRNAME}/reference_net.safetensors",
        f"{hw.CONVERTED_DIRNAME}/vae.safetensors",
        f"{hw.T5_DIR}/spiece.model",
        f"{hw.WAV2VEC_DIR}/model.safetensors",
        f"{hw.AUDIO_SEPARATOR_DIR}/Kim_Vocal_2.onnx",
        f"{hw.AUDIO_SEPARATOR_DIR}/mdx_model_data.json",
        f"{hw.FACE_ANALYSIS_DIR}/glintr100.onnx",
    ],
)
def test_a_missing_file_stops_load_pipeline_naming_it(complete_copy: Path, tmp_path: Path, rel: str) -> None:
    (complete_copy / rel).unlink()
    with pytest.raises(hw.WeightsError, match="file is missing") as caught:
        runtime.load_pipeline(_settings(tmp_path, complete_copy))
    assert caught.value.path == complete_copy / rel
    assert str(complete_copy / rel) in str(caught.value)


def test_a_truncated_network_stops_load_pipeline(complete_copy: Path, tmp_path: Path) -> None:
    path = complete_copy / hw.CONVERTED_DIRNAME / "vae.safetensors"
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 16)
    with pytest.raises(hw.WeightsError, match=r"vae\.safetensors: truncated"):
        runtime.load_pipeline(_settings(tmp_path, complete_copy))


def test_unusable_weights_folders_are_named(tmp_path: Path) -> None:
    with pytest.raises(hw.WeightsError, match="does not exist"):
        runtime.load_pipeline(_settings(tmp_path, tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(hw.WeightsError, match="holds no Hallo3 weights"):
        runtime.load_pipeline(_settings(tmp_path, tmp_path / "empty"))


def test_auto_searches_the_standard_places(tmp_path: Path) -> None:
    standard = [hw.DEFAULT_VOLUME_WEIGHTS_DIR, hw.DEFAULT_IMAGE_WEIGHTS_DIR, hw.DEFAULT_HF_CACHE_DIR]
    if any(path.exists() for path in standard):
        pytest.skip("this machine has a standard weights folder")
    settings = load_settings({"HALLO3_WEIGHTS_DIR": "auto", "HALLO3_WORK_DIR": str(tmp_path), "HALLO3_DEVICE": "cpu"})
    with pytest.raises(hw.WeightsError, match="no Hallo3 weights found; searched: .*/runpod-volume/hallo3"):
        runtime.load_pipeline(settings)


# ------------------------------------------------------------------------------- fitness checks


def test_fitness_checks_only_on_the_platform_with_weights(tmp_path: Path, complete_copy: Path) -> None:
    assert runtime.startup_fitness_checks(_settings(tmp_path, complete_copy)) == []  # local run
    assert runtime.startup_fitness_checks(_settings(tmp_path, None, on_platform=True)) == []  # tiny model
    assert runtime.check_fitness_before_loading(_settings(tmp_path, None, on_platform=True)) == []

    on_platform = _settings(tmp_path, complete_copy, on_platform=True)
    names = [check.__name__ for check in runtime.startup_fitness_checks(on_platform, CPU)]
    assert names == ["hallo3_weights_present", "hallo3_video_encoders"]  # no GPU memory to check on the CPU
    names = [check.__name__ for check in runtime.startup_fitness_checks(on_platform, torch.device("cuda", 0))]
    assert names == ["hallo3_weights_present", "hallo3_gpu_memory", "hallo3_video_encoders"]

    messages = runtime.check_fitness_before_loading(on_platform)
    assert messages[0].startswith("weights OK (explicit)") and messages[1].startswith("video encoders OK")

    # HALLO3_DEVICE=auto that found no accelerator: the GPU is required, the check says so.
    auto = dataclasses.replace(on_platform, device="auto")
    checks = runtime.startup_fitness_checks(auto, CPU)
    assert [check.__name__ for check in checks][1] == "hallo3_gpu_memory"
    if not torch.cuda.is_available():
        with pytest.raises(fitness.FitnessError, match="no usable CUDA device"):
            checks[1]()


def test_offload_policy(tmp_path: Path) -> None:
    cuda = torch.device("cuda", 0)
    needs = {policy: fitness.estimate_gpu_bytes(policy) for policy in fitness.OFFLOAD_POLICIES}

    def card(free: int):
        return lambda index: (free, 80 * fitness.GIB, "Test GPU")

    auto = _settings(tmp_path, None, offload="auto")
    assert runtime.resolve_offload(auto, cuda, memory_info=card(needs["off"])) == "off"  # room for everything
    assert runtime.resolve_offload(auto, cuda, memory_info=card(needs["off"] - 1)) == "partial"
    assert runtime.resolve_offload(auto, cuda, memory_info=card(needs["partial"] - 1)) == "full"
    assert runtime.resolve_offload(auto, cuda, memory_info=card(needs["full"] - 1)) == "full"  # the least there is
    assert runtime.resolve_offload(auto, cuda, memory_info=lambda index: None) == "full"
    assert runtime.resolve_offload(auto, CPU) == "off"  # nothing to offload to
    for policy in fitness.OFFLOAD_POLICIES:
        assert runtime.resolve_offload(_settings(tmp_path, None, offload=policy), cuda, memory_info=card(0)) == policy

    off, partial, full = (runtime.placement_for(cuda, torch.bfloat16, p) for p in fitness.OFFLOAD_POLICIES)
    assert (off.offload, off.offload_transformer, off.feed_forward_chunk) == (False, False, None)
    assert (partial.offload, partial.offload_transformer, partial.feed_forward_chunk) == (True, False, None)
    assert (full.offload, full.offload_transformer) == (True, True) and full.feed_forward_chunk == 4096


def test_gpu_fitness_follows_the_offload_policy(tmp_path: Path, complete_copy: Path, monkeypatch) -> None:
    asked: list[int] = []

    def check(required_bytes: int, **kw) -> str:
        asked.append(required_bytes)
        return "ok"

    monkeypatch.setattr(fitness, "check_gpu_memory", check)
    cuda = torch.device("cuda", 0)
    for policy in ("auto", "off", "partial", "full"):
        settings = _settings(tmp_path, complete_copy, on_platform=True, offload=policy)
        checks = {c.__name__: c for c in runtime.startup_fitness_checks(settings, cuda)}
        checks["hallo3_gpu_memory"]()
    location = hw.locate_weights(complete_copy)
    off, partial, full = (fitness.estimate_gpu_bytes(p, location=location) for p in fitness.OFFLOAD_POLICIES)
    assert asked == [full, off, partial, full]  # auto must at least fit the smallest policy


def test_failed_fitness_exits_with_the_reason(tmp_path: Path, complete_copy: Path, caplog) -> None:
    (complete_copy / hw.WAV2VEC_DIR / "config.json").unlink()
    with caplog.at_level(logging.ERROR, logger="hallo3_worker"), pytest.raises(SystemExit) as caught:
        runtime.check_fitness_before_loading(_settings(tmp_path, complete_copy, on_platform=True))
    message = str(caught.value.code)
    assert message.startswith("Hallo3 worker is not fit to serve jobs: Hallo3 weights are not usable")
    assert str(complete_copy / hw.WAV2VEC_DIR / "config.json") in message
    assert "fitness check failed" in caplog.text


def test_handler_main_checks_fitness_before_loading_the_model(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    sys.modules.pop("handler", None)
    import handler
    import runpod

    (tmp_path / "empty").mkdir()
    for name, value in {"RUNPOD_WEBHOOK_POST_OUTPUT": "https://api.runpod.ai/v2/x/job-done", "HALLO3_DEVICE": "cpu",
                        "HALLO3_WEIGHTS_DIR": str(tmp_path / "empty"), "HALLO3_WORK_DIR": str(tmp_path / "work")}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(runtime, "configure_logging", lambda settings: None)  # leave the test's logging alone

    def must_not_run(*args, **kwargs):
        raise AssertionError("the model was loaded or the job loop started despite failed fitness checks")

    monkeypatch.setattr(handler, "create_worker", must_not_run)
    monkeypatch.setattr(runpod.serverless, "start", must_not_run)
    with pytest.raises(SystemExit, match="holds no Hallo3 weights"):
        handler.main([])  # no options (pytest's own command line is not the handler's)
    assert handler._worker is None
    sys.modules.pop("handler", None)
