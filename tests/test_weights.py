"""hallo3_worker.weights (locate, verify, load) and hallo3_worker.fitness, on tiny weights, CPU only."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
import tiny_weights as tw

from hallo3_worker import fitness
from hallo3_worker import weights as hw
from hallo3_worker.models import checkpoint as ck
from hallo3_worker.models import presets

convert_weights = tw.builder_module("convert_weights")

TINY_CONFIGS = dict(
    transformer_config=presets.golden_tiny_transformer(),
    reference_config=presets.golden_tiny_reference_net(),
)


def _tiny_vae():
    from hallo3_worker.models.vae import TINY_VAE

    return TINY_VAE


@pytest.fixture(scope="module")
def converted_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete tiny weights folder: download manifest, converted files and stand-in aux files."""
    root = tmp_path_factory.mktemp("converted")
    tw.make_tiny_weights(root, seed=21)
    tw.write_aux_files(root)
    download = tw.builder_module("download_weights")
    download.write_manifest(root, hw.HALLO3_REPO_ID, None, download.INFERENCE_ALLOW_PATTERNS[:3] + ("t5-v1_1-xxl/*",))
    convert_weights.convert(root, **TINY_CONFIGS, vae_config=_tiny_vae())
    return root


@pytest.fixture()
def scratch(converted_root: Path, tmp_path: Path) -> Path:
    """A private copy of the converted folder that a test may damage."""
    copy = tmp_path / "weights"
    shutil.copytree(converted_root, copy)
    return copy


def _explicit(root: Path) -> hw.WeightsLocation:
    return hw.locate_weights(root, hf_cache_dir=None, volume_dir=None, image_dir=None)


# --------------------------------------------------------------------------------------------------
# Locating
# --------------------------------------------------------------------------------------------------


def _weights_dir(path: Path) -> Path:
    (path / "hallo3").mkdir(parents=True)
    (path / "hallo3" / "latest").write_text("1")
    return path


def _cache_snapshot(cache: Path, commit: str = "c" * 40) -> Path:
    repo = hw.hf_cache_repo_dir(cache, hw.HALLO3_REPO_ID)
    snapshot = _weights_dir(repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_search_order_explicit_then_cached_then_volume_then_image(tmp_path: Path) -> None:
    explicit = _weights_dir(tmp_path / "explicit")
    cache = tmp_path / "hub"
    snapshot = _cache_snapshot(cache)
    volume = _weights_dir(tmp_path / "volume")
    image = _weights_dir(tmp_path / "image")
    kwargs = dict(hf_cache_dir=cache, volume_dir=volume, image_dir=image)

    assert hw.locate_weights(explicit, **kwargs) == hw.WeightsLocation(explicit, "explicit")
    assert hw.locate_weights(None, **kwargs) == hw.WeightsLocation(snapshot, "cached_model")
    assert hw.locate_weights("auto", **kwargs) == hw.locate_weights("", **kwargs) == hw.WeightsLocation(snapshot, "cached_model")
    shutil.rmtree(cache)
    assert hw.locate_weights(None, **kwargs) == hw.WeightsLocation(volume, "network_volume")
    shutil.rmtree(volume)
    assert hw.locate_weights(None, **kwargs) == hw.WeightsLocation(image, "image")
    shutil.rmtree(image)
    with pytest.raises(hw.WeightsError) as info:
        hw.locate_weights(None, **kwargs)
    for place in ("snapshots/<hash>", str(volume), str(image)):
        assert place in str(info.value)
    assert [s for s, _ in hw.weights_search_order(explicit, **kwargs)] == ["explicit", "cached_model", "network_volume", "image"]


def test_explicit_folder_is_never_silently_skipped(tmp_path: Path) -> None:
    image = _weights_dir(tmp_path / "image")
    with pytest.raises(hw.WeightsError, match="does not exist"):
        hw.locate_weights(tmp_path / "missing", hf_cache_dir=None, volume_dir=None, image_dir=image)
    (tmp_path / "empty").mkdir()
    with pytest.raises(hw.WeightsError, match="holds no Hallo3 weights"):
        hw.locate_weights(tmp_path / "empty", hf_cache_dir=None, volume_dir=None, image_dir=image)


def test_snapshot_resolution(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    main = _cache_snapshot(cache, "a" * 40)
    other = _weights_dir(hw.hf_cache_repo_dir(cache, hw.HALLO3_REPO_ID) / "snapshots" / ("b" * 40))
    repo = hw.hf_cache_repo_dir(cache, hw.HALLO3_REPO_ID)
    assert hw.resolve_snapshot(repo) == main  # refs/main wins over the newer folder
    assert hw.resolve_snapshot(repo, "b" * 40) == other
    with pytest.raises(hw.WeightsError, match="no ref named"):
        hw.resolve_snapshot(repo, "v2")
    (repo / "refs" / "main").unlink()
    os.utime(main, (time.time() + 60, time.time() + 60))
    assert hw.resolve_snapshot(repo) == main  # newest when no ref
    # An explicit folder may also be the cache folder itself.
    assert hw.locate_weights(repo, hf_cache_dir=None, volume_dir=None, image_dir=None).root == main


# --------------------------------------------------------------------------------------------------
# Building and loading
# --------------------------------------------------------------------------------------------------


def test_full_size_networks_build_on_meta_fast_without_storage() -> None:
    start = time.perf_counter()
    main = hw.build_transformer(presets.full_transformer(), torch.bfloat16)
    ref = hw.build_reference_net(presets.full_reference_net(), torch.bfloat16)
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0
    tensors = [*main.parameters(), *main.buffers(), *ref.parameters(), *ref.buffers()]
    assert tensors and all(t.is_meta for t in tensors)
    assert sum(t.untyped_storage().nbytes() for t in tensors if not t.is_meta) == 0
    assert sum(p.numel() for p in main.parameters()) > 8_900_000_000  # really full size


def _file_mappings(path: Path) -> list[tuple[int, int]]:
    ranges = []
    target = str(path.resolve())
    with open("/proc/self/maps", encoding="utf-8") as maps:
        for line in maps:
            parts = line.split()
            if len(parts) >= 6 and parts[5] == target:
                low, high = (int(x, 16) for x in parts[0].split("-"))
                ranges.append((low, high))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc to see memory mappings")
def test_cpu_load_is_zero_copy_from_the_file_mapping(converted_root: Path) -> None:
    loaded = hw.load_networks(_explicit(converted_root), device="cpu", dtype=None, components=("transformer",))
    path = converted_root / hw.CONVERTED_DIRNAME / "transformer.safetensors"
    ranges = _file_mappings(path)
    assert ranges, "transformer.safetensors is not memory-mapped"
    params = list(loaded.transformer.parameters())
    inside = [p for p in params if any(low <= p.data_ptr() < high for low, high in ranges)]
    assert len(inside) == len(params)  # every parameter lives in the file mapping: no copies


def test_cast_on_load_and_timings(converted_root: Path) -> None:
    loaded = hw.load_networks(_explicit(converted_root), device="cpu", dtype=torch.float32, vae_dtype=torch.float32, require_aux=True)
    assert {p.dtype for p in loaded.transformer.parameters()} == {torch.float32}
    assert loaded.vae.dtype == torch.float32
    assert loaded.verification is not None and loaded.verification.converted
    assert all(loaded.timings[k] >= 0 for k in ("verify", "transformer", "reference_net", "vae", "total"))


def test_upstream_checkpoints_load_directly_from_a_cached_model_snapshot(tmp_path: Path) -> None:
    """The cached-models case: the folder is the Hugging Face snapshot itself, no converted files."""
    repo = hw.hf_cache_repo_dir(tmp_path, hw.HALLO3_REPO_ID)
    snapshot = repo / "snapshots" / ("d" * 40)
    tiny = tw.make_tiny_weights(snapshot, seed=31)
    tw.write_aux_files(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("d" * 40)
    location = hw.locate_weights(None, hf_cache_dir=tmp_path, volume_dir=None, image_dir=None)
    assert location.source == "cached_model" and not location.has_converted
    loaded = hw.load_networks(
        location,
        device="cpu",
        dtype=None,
        vae_dtype=torch.float32,  # the fixture VAE is fp16; fp16 convolutions are slow on CPU
        require_aux=True,
        vae_config=_tiny_vae(),
        **TINY_CONFIGS,
    )
    assert loaded.source_format == "upstream"
    assert torch.equal(tw.transformer_output(loaded.transformer), tw.transformer_output(tiny.transformer))
    assert all(torch.equal(a, b) for a, b in zip(tw.reference_output(loaded.reference_net), tw.reference_output(tiny.reference_net)))
    from hallo3_worker.models.vae import Hallo3VAE, build_vae

    direct = Hallo3VAE(build_vae(_tiny_vae(), tiny.vae_sat_state, dtype=torch.float32))
    assert torch.equal(tw.vae_decode(loaded.vae), tw.vae_decode(direct))


def test_cached_snapshot_blob_hashes_are_checked(tmp_path: Path) -> None:
    repo = hw.hf_cache_repo_dir(tmp_path, hw.HALLO3_REPO_ID)
    snapshot = repo / "snapshots" / ("e" * 40)
    tw.make_tiny_weights(snapshot, seed=32, with_vae=False)
    # Turn the checkpoint into a Hugging Face blob + symlink, as the cache stores LFS files.
    ckpt = snapshot / tw.CHECKPOINT_REL
    blob = repo / "blobs" / hw.sha256_file(ckpt)
    blob.parent.mkdir()
    shutil.move(str(ckpt), blob)
    ckpt.symlink_to(os.path.relpath(blob, ckpt.parent))
    location = hw.WeightsLocation(snapshot, "cached_model")
    hw.verify_weights(location, check_hashes=True, components=("transformer",), require_aux=False)
    with open(blob, "r+b") as handle:  # same size, different bytes
        handle.seek(-4, os.SEEK_END)
        handle.write(b"\x00\x01\x02\x03")
    with pytest.raises(hw.WeightsError, match=r"mp_rank_00_model_states\.pt: corrupt"):
        hw.verify_weights(location, check_hashes=True, components=("transformer",), require_aux=False)


# --------------------------------------------------------------------------------------------------
# Damaged files give clear errors that name the file
# --------------------------------------------------------------------------------------------------


def test_truncated_file(scratch: Path) -> None:
    path = scratch / hw.CONVERTED_DIRNAME / "transformer.safetensors"
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 100)
    with pytest.raises(hw.WeightsError, match="truncated") as info:
        hw.load_networks(_explicit(scratch), device="cpu")
    assert info.value.path == path and str(path) in str(info.value)
    # Even without the size check, reading it fails with the file named.
    with pytest.raises(hw.WeightsError) as info:
        hw.load_networks(_explicit(scratch), device="cpu", verify=False, components=("transformer",))
    assert str(path) in str(info.value) and "truncated or corrupt" in str(info.value)


def test_corrupted_file(scratch: Path) -> None:
    path = scratch / hw.CONVERTED_DIRNAME / "reference_net.safetensors"
    size = path.stat().st_size
    with open(path, "r+b") as handle:  # flip bytes in the tensor data, keep the size
        handle.seek(size - 64)
        data = handle.read(16)
        handle.seek(size - 64)
        handle.write(bytes(b ^ 0xFF for b in data))
    hw.verify_weights(_explicit(scratch), require_aux=True)  # sizes alone cannot see it
    with pytest.raises(hw.WeightsError, match="corrupt") as info:
        hw.load_networks(_explicit(scratch), device="cpu", verify_hashes=True)
    assert info.value.path == path

    with open(path, "r+b") as handle:  # a damaged header is caught even without hashing
        handle.seek(8)
        handle.write(b"#garbage#")
    with pytest.raises(hw.WeightsError, match="truncated or corrupt") as info:
        hw.load_networks(_explicit(scratch), device="cpu", verify=False, components=("reference_net",))
    assert str(path) in str(info.value)


def test_missing_files(scratch: Path) -> None:
    vae = scratch / hw.CONVERTED_DIRNAME / "vae.safetensors"
    vae.unlink()
    with pytest.raises(hw.WeightsError, match="missing") as info:
        hw.load_networks(_explicit(scratch), device="cpu")
    assert info.value.path == vae
    aux = scratch / hw.FACE_ANALYSIS_DIR / "glintr100.onnx"
    aux.unlink()
    with pytest.raises(hw.WeightsError, match="glintr100.onnx: file is missing"):
        hw.verify_weights(_explicit(scratch), components=("transformer",))
    (scratch / hw.DOWNLOAD_MARKER).unlink()
    with pytest.raises(hw.WeightsError, match="did not finish"):
        hw.verify_weights(_explicit(scratch), components=("transformer",), require_aux=False)


def test_wrong_shape_tensor(scratch: Path) -> None:
    directory = scratch / hw.CONVERTED_DIRNAME
    path = directory / "transformer.safetensors"
    tensors = load_file(str(path))
    key = "blocks.1.attn.to_out.weight"
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, str(path))
    manifest = json.loads((directory / hw.CONVERTED_MANIFEST).read_text())
    manifest["components"]["transformer"].update(size=path.stat().st_size, sha256=hw.sha256_file(path))
    (directory / hw.CONVERTED_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(hw.WeightsError) as info:
        hw.load_networks(_explicit(scratch), device="cpu", verify_hashes=True)
    message = str(info.value)
    assert str(path) in message and "wrong shape" in message and key in message
    assert isinstance(info.value, ck.CheckpointError)


def test_truncated_upstream_checkpoint(tmp_path: Path) -> None:
    tiny = tw.make_tiny_weights(tmp_path, seed=33, with_vae=False)
    with open(tiny.checkpoint, "r+b") as handle:
        handle.truncate(tiny.checkpoint.stat().st_size // 2)
    with pytest.raises(hw.WeightsError) as info:
        hw.read_sat_checkpoint(tiny.checkpoint)
    assert str(tiny.checkpoint) in str(info.value) and "truncated or corrupt" in str(info.value)


# --------------------------------------------------------------------------------------------------
# Fitness checks
# --------------------------------------------------------------------------------------------------


def test_weights_fitness(converted_root: Path, tmp_path: Path) -> None:
    message = fitness.check_weights(converted_root, hf_cache_dir=None, volume_dir=None, image_dir=None)
    assert "weights OK" in message and "converted safetensors" in message
    with pytest.raises(fitness.FitnessError, match="no Hallo3 weights found"):
        fitness.check_weights(None, hf_cache_dir=tmp_path / "hub", volume_dir=tmp_path / "v", image_dir=tmp_path / "i")


def test_gpu_memory_fitness() -> None:
    off, partial, full = (fitness.estimate_gpu_bytes(policy) for policy in fitness.OFFLOAD_POLICIES)
    weights = fitness.DEFAULT_COMPONENT_BYTES
    act = fitness.STAGE_ACTIVATION_BYTES
    bank, overhead = fitness.REFERENCE_BANK_BYTES, fitness.CUDA_OVERHEAD_BYTES
    small = weights["vae"] + weights["audio_encoder"] + weights["onnx"]
    everything = sum(weights[name] for name in fitness.GPU_COMPONENTS)
    # off peaks at the (sliced) VAE decode with every network resident.
    assert off == everything + bank + act["vae_decode"] + overhead
    # partial and full peak while the reference network visits: the decode is now smaller than that
    # stage, and under full the transformer's blocks stream (two of its 42 on the GPU at a time).
    assert partial == weights["transformer"] + small + weights["reference_net"] + act["reference"] + overhead
    assert full == small + weights["reference_net"] + act["reference"] + overhead
    streamed = (fitness.TRANSFORMER_REST_BYTES + 2 * fitness.TRANSFORMER_BLOCK_BYTES) / (
        fitness.TRANSFORMER_REST_BYTES + 42 * fitness.TRANSFORMER_BLOCK_BYTES)
    assert small + int(weights["transformer"] * streamed) + bank + act["denoise_chunked"] + overhead < full
    assert full < partial < off
    # A bigger stage is seen: an activation peak above all others sets the estimate.
    huge = fitness.estimate_gpu_bytes("partial", activations={"text": 100 * fitness.GIB})
    assert huge == weights["transformer"] + small + weights["text_encoder"] + 100 * fitness.GIB + overhead
    with pytest.raises(ValueError, match="unknown offload policy"):
        fitness.estimate_gpu_bytes("on")

    def card(free_gib: float, total_gib: float):
        return lambda index: (int(free_gib * fitness.GIB), int(total_gib * fitness.GIB), "Test GPU")

    assert "Test GPU" in fitness.check_gpu_memory(off, memory_info=card(78, 80))
    assert "Test GPU" in fitness.check_gpu_memory(partial, memory_info=card(44, 44.5))  # a 48 GB card
    with pytest.raises(fitness.FitnessError, match=r"44\.0 GiB free of 44\.5 GiB.*HALLO3_OFFLOAD=partial or full"):
        fitness.check_gpu_memory(off, memory_info=card(44, 44.5))
    assert "skipped" in fitness.check_gpu_memory(partial, memory_info=lambda index: None)
    with pytest.raises(fitness.FitnessError, match="no usable CUDA device"):
        fitness.check_gpu_memory(partial, memory_info=lambda index: None, require_cuda=True)


def test_gpu_estimate_uses_converted_sizes(converted_root: Path) -> None:
    location = _explicit(converted_root)
    sizes = hw.converted_component_sizes(location)
    known = fitness.component_bytes(location)
    assert {name: known[name] for name in sizes} == sizes
    default = fitness.estimate_gpu_bytes("off")
    with_files = fitness.estimate_gpu_bytes("off", location=location)
    assert default - with_files == sum(fitness.DEFAULT_COMPONENT_BYTES[n] - sizes[n] for n in sizes)


def test_encoder_fitness_and_registration_bundle(converted_root: Path) -> None:
    assert fitness.check_video_encoders().startswith("video encoders OK")
    with pytest.raises(fitness.FitnessError, match="no_such_codec"):
        fitness.check_video_encoders(("libx264", "no_such_codec"))
    checks = fitness.fitness_checks(
        fitness.FitnessConfig(weights_dir=converted_root, hf_cache_dir=None, volume_dir=None, image_dir=None)
    )
    assert [c.__name__ for c in checks] == ["hallo3_weights_present", "hallo3_gpu_memory", "hallo3_video_encoders"]
    messages = fitness.run_fitness_checks(checks)
    assert len(messages) == 3 and "weights OK" in messages[0]


def test_converted_files_refuse_a_different_requested_config(converted_root: Path) -> None:
    with pytest.raises(hw.WeightsError, match="different TransformerConfig") as info:
        hw.load_networks(
            _explicit(converted_root), device="cpu", components=("transformer",), transformer_config=presets.full_transformer()
        )
    assert info.value.path == converted_root / hw.CONVERTED_DIRNAME / "transformer.safetensors"
    with pytest.raises(ValueError, match="unknown component"):
        hw.load_networks(_explicit(converted_root), device="cpu", components=("t5",))
