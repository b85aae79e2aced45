"""builder/download_weights.py with a stand-in for huggingface_hub.snapshot_download (no network)."""

from __future__ import annotations

import fnmatch
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import tiny_weights as tw

from hallo3_worker import weights as hw


dw = tw.builder_module("download_weights")

# A plausible repository listing, including files inference does not need.
REPO_FILES = {
    "hallo3/latest": b"1\n",
    "hallo3/1/mp_rank_00_model_states.pt": b"main and reference transformers" * 10,
    "cogvideox-5b-i2v-sat/vae/3d-vae.pt": b"vae weights" * 10,
    "cogvideox-5b-i2v-sat/transformer/1/mp_rank_00_model_states.pt": b"training init, not needed",
    "cogvideox-5b-i2v-sat/transformer/latest": b"1\n",
    "t5-v1_1-xxl/config.json": b"{}",
    "t5-v1_1-xxl/model-00001-of-00002.safetensors": b"t5 shard 1",
    "t5-v1_1-xxl/model-00002-of-00002.safetensors": b"t5 shard 2",
    "t5-v1_1-xxl/spiece.model": b"spm",
    "wav2vec/wav2vec2-base-960h/config.json": b"{}",
    "wav2vec/wav2vec2-base-960h/model.safetensors": b"w2v",
    "audio_separator/Kim_Vocal_2.onnx": b"onnx",
    "audio_separator/download_checks.json": b"{}",
    "face_analysis/models/scrfd_10g_bnkps.onnx": b"det",
    "face_analysis/models/glintr100.onnx": b"rec",
    "README.md": b"readme",
    "examples/ref.png": b"png",
}


class FakeHub:
    """Records calls and writes the repository files that the allow-patterns select."""

    def __init__(self, files: dict[str, bytes] = REPO_FILES) -> None:
        self.files = files
        self.calls: list[dict[str, Any]] = []

    def __call__(self, **kwargs: Any) -> str:
        self.calls.append(kwargs)
        patterns = kwargs["allow_patterns"]
        if "local_dir" in kwargs:
            folder = Path(kwargs["local_dir"])
        else:  # Hugging Face cache layout
            repo = hw.hf_cache_repo_dir(Path(kwargs["cache_dir"]), kwargs["repo_id"])
            folder = repo / "snapshots" / ("a" * 40)
            (repo / "refs").mkdir(parents=True, exist_ok=True)
            (repo / "refs" / "main").write_text("a" * 40)
        for rel, data in self.files.items():
            if any(fnmatch.fnmatch(rel, p) for p in patterns):
                path = folder / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                if not path.exists():  # resume: finished files are kept
                    path.write_bytes(data)
        return str(folder)


def test_downloads_only_inference_files_and_writes_manifest_then_marker(tmp_path: Path) -> None:
    hub = FakeHub()
    result = dw.download_weights(tmp_path, snapshot_download=hub)
    assert result.action == "downloaded"
    (call,) = hub.calls
    assert call["allow_patterns"] == list(dw.INFERENCE_ALLOW_PATTERNS)
    assert call["repo_id"] == "fudan-generative-ai/hallo3"
    assert call["local_dir"] == str(tmp_path)
    assert call["token"] is None
    assert not (tmp_path / "cogvideox-5b-i2v-sat" / "transformer").exists()
    assert not (tmp_path / "README.md").exists()

    manifest = json.loads((tmp_path / hw.DOWNLOAD_MANIFEST).read_text())
    listed = {e["path"]: e for e in manifest["files"]}
    expected = {r for r in REPO_FILES if any(fnmatch.fnmatch(r, p) for p in dw.INFERENCE_ALLOW_PATTERNS)}
    assert set(listed) == expected and result.files == len(expected)
    entry = listed["hallo3/1/mp_rank_00_model_states.pt"]
    assert entry["size"] == len(REPO_FILES["hallo3/1/mp_rank_00_model_states.pt"])
    assert entry["sha256"] == hw.sha256_file(tmp_path / "hallo3/1/mp_rank_00_model_states.pt")
    marker = json.loads((tmp_path / hw.DOWNLOAD_MARKER).read_text())
    assert marker["manifest_sha256"] == hw.sha256_file(tmp_path / hw.DOWNLOAD_MANIFEST)


def test_second_run_verifies_without_downloading(tmp_path: Path) -> None:
    dw.download_weights(tmp_path, snapshot_download=FakeHub())

    def must_not_download(**kwargs: Any) -> str:
        raise AssertionError("a completed folder was downloaded again")

    result = dw.download_weights(tmp_path, snapshot_download=must_not_download)
    assert result.action == "verified"
    result = dw.download_weights(tmp_path, snapshot_download=must_not_download, verify="sha256")
    assert result.action == "verified"


def test_verification_detects_changed_files_and_repair_fetches_them(tmp_path: Path) -> None:
    dw.download_weights(tmp_path, snapshot_download=FakeHub())
    target = tmp_path / "cogvideox-5b-i2v-sat/vae/3d-vae.pt"
    target.write_bytes(b"short")  # truncated
    with pytest.raises(dw.DownloadError, match=r"3d-vae\.pt.*truncated"):
        dw.download_weights(tmp_path, snapshot_download=FakeHub())

    original = REPO_FILES["cogvideox-5b-i2v-sat/vae/3d-vae.pt"]
    target.write_bytes(b"X" * len(original))  # same size, different bytes
    assert dw.download_weights(tmp_path, snapshot_download=FakeHub()).action == "verified"  # sizes only
    with pytest.raises(dw.DownloadError, match=r"3d-vae\.pt.*corrupt"):
        dw.download_weights(tmp_path, snapshot_download=FakeHub(), verify="sha256")

    target.unlink()
    with pytest.raises(dw.DownloadError, match=r"3d-vae\.pt.*missing"):
        dw.download_weights(tmp_path, snapshot_download=FakeHub())
    hub = FakeHub()
    assert dw.download_weights(tmp_path, snapshot_download=hub, repair=True).action == "repaired"
    assert len(hub.calls) == 1 and target.read_bytes() == original
    assert dw.download_weights(tmp_path, snapshot_download=FakeHub(), verify="sha256").action == "verified"


def test_interrupted_download_resumes(tmp_path: Path) -> None:
    class Interrupted(FakeHub):
        def __call__(self, **kwargs: Any) -> str:
            super().__call__(**{**kwargs, "allow_patterns": ["hallo3/*", "hallo3/1/*"]})
            raise ConnectionError("connection reset")

    with pytest.raises(dw.DownloadError, match="connection reset"):
        dw.download_weights(tmp_path, snapshot_download=Interrupted())
    assert not (tmp_path / hw.DOWNLOAD_MARKER).exists()
    hub = FakeHub()
    assert dw.download_weights(tmp_path, snapshot_download=hub).action == "downloaded"
    assert (tmp_path / hw.DOWNLOAD_MARKER).exists() and len(hub.calls) == 1


def test_missing_pattern_means_the_repository_changed(tmp_path: Path) -> None:
    files = {k: v for k, v in REPO_FILES.items() if not k.startswith("audio_separator/")}
    with pytest.raises(dw.DownloadError, match="audio_separator"):
        dw.download_weights(tmp_path, snapshot_download=FakeHub(files))
    assert not (tmp_path / hw.DOWNLOAD_MARKER).exists()


def test_hf_cache_layout_is_found_by_the_loader(tmp_path: Path) -> None:
    hub = FakeHub()
    result = dw.download_weights(tmp_path, snapshot_download=hub, hf_cache=True)
    assert "cache_dir" in hub.calls[0] and "local_dir" not in hub.calls[0]
    assert result.folder == hw.hf_cache_repo_dir(tmp_path, hw.HALLO3_REPO_ID) / "snapshots" / ("a" * 40)
    location = hw.locate_weights(None, hf_cache_dir=tmp_path, volume_dir=None, image_dir=None)
    assert location.source == "cached_model" and location.root == result.folder
    assert dw.download_weights(tmp_path, snapshot_download=FakeHub(), hf_cache=True).action == "verified"


def test_token_comes_from_file_or_environment_and_is_never_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    secret = "hf_secret_value_123"
    token_file = tmp_path / "token"
    token_file.write_text(secret + "\n")
    token = dw.resolve_token(token_file, env={})
    assert token.value == secret and secret not in repr(token)
    assert dw.resolve_token(None, env={"HF_TOKEN": "hf_env"}).value == "hf_env"
    assert dw.resolve_token(tmp_path / "absent", env={}).value is None

    hub = FakeHub()
    with caplog.at_level(logging.DEBUG):
        dw.download_weights(tmp_path / "w", snapshot_download=hub, token=token)
    assert hub.calls[0]["token"] == secret
    assert secret not in caplog.text
    assert not any(secret in p.read_text(errors="ignore") for p in (tmp_path / "w").glob(".hallo3*"))
    assert secret not in (tmp_path / "w" / hw.DOWNLOAD_MANIFEST).read_text()


def test_cli_lists_patterns_and_reports_verification(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert dw.main(["--list-patterns"]) == 0
    assert capsys.readouterr().out.split() == list(dw.INFERENCE_ALLOW_PATTERNS)
    dw.download_weights(tmp_path, snapshot_download=FakeHub())
    assert dw.main(["--target", str(tmp_path), "--verify", "sha256", "--log-level", "WARNING"]) == 0
    assert json.loads(capsys.readouterr().out)["action"] == "verified"
    (tmp_path / "hallo3/latest").unlink()
    assert dw.main(["--target", str(tmp_path), "--log-level", "ERROR"]) == 1
