"""builder/convert_weights.py: SAT/DeepSpeed checkpoint -> safetensors in our names -> strict load."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import tiny_weights as tw
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hallo3_worker import weights as hw
from hallo3_worker.models import checkpoint as ck
from hallo3_worker.models import presets
from hallo3_worker.models.loading import load_converted


convert_weights = tw.builder_module("convert_weights")

TINY = dict(
    transformer_config=presets.golden_tiny_transformer(),
    reference_config=presets.golden_tiny_reference_net(),
)


def _vae_config():
    from hallo3_worker.models.vae import TINY_VAE

    return TINY_VAE


def _direct_bf16(tiny: tw.TinyWeights):
    """The networks loaded straight from the upstream tensors (no files), cast to bf16 per tensor."""
    main = hw.build_transformer(presets.golden_tiny_transformer())
    state = ck.convert_state_dict(tiny.upstream, ck.MAIN_PREFIX, ck.transformer_key_rules(main.config), main)
    load_converted(main, {k: v.to(torch.bfloat16) for k, v in state.items()})
    ref = hw.build_reference_net(presets.golden_tiny_reference_net())
    state = ck.convert_state_dict(tiny.upstream, ck.REFERENCE_PREFIX, ck.reference_key_rules(ref.config), ref)
    load_converted(ref, {k: v.to(torch.bfloat16) for k, v in state.items()})
    return main, ref


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[tw.TinyWeights, dict]:
    root = tmp_path_factory.mktemp("weights")
    tiny = tw.make_tiny_weights(root, seed=11)
    result = convert_weights.convert(root, **TINY, vae_config=_vae_config())
    return tiny, result


def test_conversion_writes_bf16_networks_and_stored_precision_vae(converted) -> None:
    tiny, result = converted
    out = tiny.root / hw.CONVERTED_DIRNAME
    manifest = json.loads((out / hw.CONVERTED_MANIFEST).read_text())
    assert manifest == json.loads(json.dumps(result))
    comps = manifest["components"]
    assert comps["transformer"]["dtypes"] == {"bfloat16": len(tiny.transformer.state_dict())}
    assert comps["reference_net"]["dtypes"] == {"bfloat16": len(tiny.reference_net.state_dict())}
    assert comps["vae"]["dtypes"] == {"float16": comps["vae"]["tensors"]}  # the fixture VAE is stored in fp16
    assert comps["transformer"]["source_dtypes"] == {"float32": len(ck.transformer_key_rules(tiny.transformer.config))}
    for entry in comps.values():
        path = out / entry["file"]
        assert path.stat().st_size == entry["size"]
        assert hw.sha256_file(path) == entry["sha256"]
    # The DeepSpeed wrapper was understood and the foreign sections ignored.
    source = manifest["sources"]["checkpoint"]
    assert source["load_mode"] == "weights_only"
    assert {"global_steps", "dp_world_size"} <= set(source["bookkeeping_keys"])
    assert source["ignored_keys"] == {"conditioner.": 1, "first_stage_model.": 1}
    # Our names, exactly our networks' keys; no upstream-only keys (rotary tables, unused rows).
    with safe_open(str(out / "transformer.safetensors"), "pt") as f:
        assert set(f.keys()) == set(tiny.transformer.state_dict())
    with safe_open(str(out / "reference_net.safetensors"), "pt") as f:
        assert set(f.keys()) == set(tiny.reference_net.state_dict())
    assert not any(k.startswith("loss.") for k in load_file(str(out / "vae.safetensors")))


def test_converted_files_load_strictly_and_match_direct_loading_exactly(converted) -> None:
    tiny, _ = converted
    location = hw.locate_weights(tiny.root, hf_cache_dir=None, volume_dir=None, image_dir=None)
    # VAE cast to fp32 on load (fp16 convolutions are slow on CPU); the stored file stays fp16.
    loaded = hw.load_networks(location, device="cpu", dtype=None, vae_dtype=torch.float32, require_aux=False)
    assert loaded.source_format == "converted"
    assert set(loaded.timings) >= {"verify", "transformer", "reference_net", "vae", "total"}

    main, ref = _direct_bf16(tiny)
    for name, tensor in main.state_dict().items():
        assert torch.equal(loaded.transformer.state_dict()[name], tensor), name
    assert torch.equal(tw.transformer_output(loaded.transformer), tw.transformer_output(main))
    got, want = tw.reference_output(loaded.reference_net), tw.reference_output(ref)
    assert len(got) == len(want) == 2
    assert all(torch.equal(a, b) for a, b in zip(got, want))

    from hallo3_worker.models.vae import TINY_VAE, Hallo3VAE, build_vae

    direct_vae = Hallo3VAE(build_vae(TINY_VAE, tiny.vae_sat_state, dtype=torch.float32))
    assert loaded.vae.dtype == torch.float32
    assert torch.equal(tw.vae_decode(loaded.vae), tw.vae_decode(direct_vae))


def test_rerun_keeps_a_complete_conversion(converted) -> None:
    tiny, result = converted
    again = convert_weights.convert(tiny.root, **TINY, vae_config=_vae_config())
    assert again["skipped"] is True
    assert again["components"] == result["components"]


def test_missing_key_in_checkpoint_names_file_and_key(tmp_path: Path) -> None:
    tiny = tw.make_tiny_weights(tmp_path, seed=3, with_vae=False)
    upstream = dict(tiny.upstream)
    del upstream[ck.MAIN_PREFIX + "transformer.layers.1.mlp.dense_h_to_4h.weight"]
    torch.save({"module": upstream, "global_steps": 1}, tiny.checkpoint)
    with pytest.raises(ck.CheckpointError) as info:
        convert_weights.convert(tmp_path, **TINY, components=("transformer",))
    assert str(tiny.checkpoint) in str(info.value)
    assert "transformer.layers.1.mlp.dense_h_to_4h.weight" in str(info.value)
    assert not (tmp_path / hw.CONVERTED_DIRNAME / hw.CONVERTED_MANIFEST).exists()


def test_wrong_shape_in_checkpoint_is_refused(tmp_path: Path) -> None:
    tiny = tw.make_tiny_weights(tmp_path, seed=4, with_vae=False)
    upstream = dict(tiny.upstream)
    upstream[ck.REFERENCE_PREFIX + "transformer.layers.0.attention.dense.weight"] = torch.zeros(3, 3)
    torch.save({"module": upstream}, tiny.checkpoint)
    with pytest.raises(ck.CheckpointError, match="wrong shape"):
        convert_weights.convert(tmp_path, **TINY, components=("reference_net",))


def test_bookkeeping_that_weights_only_refuses_is_read_without_foreign_code(tmp_path: Path) -> None:
    tiny = tw.make_tiny_weights(tmp_path, seed=5, exotic_bookkeeping=True, with_vae=False)
    with pytest.raises(Exception):  # plain weights_only loading does refuse this file
        torch.load(str(tiny.checkpoint), weights_only=True, mmap=True)
    sat = hw.read_sat_checkpoint(tiny.checkpoint)
    assert sat.load_mode == "restricted_unpickler"
    assert sat.fallback_reason
    assert "sat" not in sys.modules and "sat.fake_args" not in sys.modules
    assert set(sat.module) == set(tiny.upstream)
    assert all(torch.equal(sat.module[k], v) for k, v in tiny.upstream.items())
    result = convert_weights.convert(tmp_path, **TINY, components=("transformer", "reference_net"))
    assert result["sources"]["checkpoint"]["load_mode"] == "restricted_unpickler"


def test_delete_sources_updates_the_download_manifest(tmp_path: Path) -> None:
    download_weights = tw.builder_module("download_weights")
    tiny = tw.make_tiny_weights(tmp_path, seed=6)
    download_weights.write_manifest(tmp_path, hw.HALLO3_REPO_ID, None, ["hallo3/*", "hallo3/1/*", "cogvideox-5b-i2v-sat/vae/*"])
    convert_weights.convert(tmp_path, **TINY, vae_config=_vae_config(), delete_sources=True)
    assert not tiny.checkpoint.exists() and not tiny.vae.exists()
    manifest = json.loads((tmp_path / hw.DOWNLOAD_MANIFEST).read_text())
    assert set(manifest["removed_after_conversion"]) == {tw.CHECKPOINT_REL, tw.VAE_REL}
    report = hw.verify_weights(hw.WeightsLocation(tmp_path, "image"), require_aux=False)
    assert report.converted and tw.CHECKPOINT_REL not in report.files


def test_cli_converts_a_golden_tiny_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tw.make_tiny_weights(tmp_path, seed=8)
    rc = convert_weights.main(["--weights-dir", str(tmp_path), "--preset", "golden_tiny", "--log-level", "WARNING"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["components"]) == {"transformer", "reference_net", "vae"}
    assert summary["components"]["transformer"]["dtypes"] == {"bfloat16": summary["components"]["transformer"]["dtypes"]["bfloat16"]}
    assert convert_weights.main(["--weights-dir", str(tmp_path / "nope"), "--preset", "golden_tiny"]) == 1


def test_streaming_writer_output_reads_back_with_safetensors(tmp_path: Path) -> None:
    fused = torch.randn(12, 4)
    q, k, v = fused.chunk(3)  # views sharing one storage, as the Q/K/V split produces
    tensors = {"q": q, "k": k, "v": v, "ids": torch.arange(5), "half": torch.randn(3, dtype=torch.float16), "scalar": torch.tensor(2.5)}
    written = convert_weights.write_safetensors_streaming(tmp_path / "x.safetensors", tensors, metadata={"component": "t"})
    back = load_file(str(tmp_path / "x.safetensors"))
    assert set(back) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(back[name], tensor) and back[name].dtype == tensor.dtype
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"component": "t"}
    assert written.sha256 == hw.sha256_file(tmp_path / "x.safetensors")
    cast = convert_weights.write_safetensors_streaming(tmp_path / "y.safetensors", tensors, dtype=torch.bfloat16)
    back = load_file(str(cast.path))
    assert back["q"].dtype == torch.bfloat16 and back["ids"].dtype == torch.int64
    assert torch.equal(back["q"], q.to(torch.bfloat16))


def test_real_vae_key_names_convert_to_the_full_vae(tmp_path: Path) -> None:
    """The converter's VAE step on the real 3d-vae.pt key set (shapes only, on the meta device)."""
    from hallo3_worker.models.vae import COGVIDEOX_5B_VAE, check_vae_state_dict, convert_sat_vae_state_dict

    keys = json.loads((tw.REPO_ROOT / "tests" / "goldens" / "vae" / "real_sat_vae_keys.json").read_text())["keys"]
    sat_state = {k: torch.empty(shape, device="meta") for k, shape in keys.items()}
    state = convert_sat_vae_state_dict(sat_state, COGVIDEOX_5B_VAE.num_levels)
    check_vae_state_dict(hw.build_vae_on_meta(COGVIDEOX_5B_VAE), state)
