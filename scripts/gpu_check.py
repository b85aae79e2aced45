"""The one prepared GPU check: speed and memory of the worker on this machine, as JSON and a Markdown table.

On a CUDA device everything is full size with random weights created on the device (no downloads;
speed and memory do not depend on weight values):

* ``speed_items``: one guided transformer forward, plain vs each exact speed-up vs all
  (scripts/bench_speedups.py), with TFLOP/s and MFU against the card's dense bf16 peak;
* ``job``: a 2-segment 480x720 job through the real pipeline (every exact speed-up on, offload
  ``off``): per-stage seconds, VAE decode seconds per segment, seconds per sampler step;
* ``policies``: the measured peak GPU memory of a 1-segment job under ``off``, ``partial`` and
  ``full``, beside the estimate of hallo3_worker.fitness;
* ``presets``: a 1-segment job per speed preset (``exact``, ``balanced``, ``fast`` with the
  endpoint defaults): seconds, transformer forwards and what fell back;
* ``cold_start``: seconds to load the main transformer from safetensors on local disk to the GPU.

``--dry-run`` does all of it at tiny size on the CPU (minutes; the numbers are meaningless, every
field is present), which is what CI runs.

    python scripts/gpu_check.py [--dry-run] [--steps 20] [--out-dir out/gpu_check]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file

import bench_speedups
from benchutil import sync

from hallo3_worker import fitness
from hallo3_worker.conditioning.image import CANVAS_SIZE
from hallo3_worker.conditioning.text import T5TextEncoder
from hallo3_worker.conditioning.audio import Wav2VecEncoder
from hallo3_worker.conditioning.tiny_assets import build_tiny_t5
from hallo3_worker.interface import GenerationRequest, Preset
from hallo3_worker.models import presets
from hallo3_worker.models.loading import build_on_meta, load_converted, materialize_random
from hallo3_worker.models.reference_net import ReferenceNet
from hallo3_worker.models.transformer import Hallo3Transformer
from hallo3_worker.models.vae import COGVIDEOX_5B_VAE, Hallo3VAE, build_vae
from hallo3_worker.pipeline import Hallo3Components, Hallo3Pipeline, Placement
from hallo3_worker.settings import Settings
from hallo3_worker.tiny import TinyFaceAnalyzer, build_tiny_pipeline

logger = logging.getLogger("gpu_check")
ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("off", "partial", "full")


def placement_for(policy: str, device: torch.device, dtype: torch.dtype) -> Placement:
    """The worker's placement for an offload policy (as hallo3_worker.worker.runtime builds it)."""
    return Placement(device=device, dtype=dtype, offload=policy != "off", offload_transformer=policy == "full",
                     feed_forward_chunk=fitness.FULL_OFFLOAD_FEED_FORWARD_CHUNK if policy == "full" else None)


def full_size_components(placement: Placement, assets: Path) -> Hallo3Components:
    """Every network at full size with random weights, where ``placement`` keeps it."""
    from transformers import T5Config, T5EncoderModel, Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    dtype = placement.dtype
    t5_config = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                         feed_forward_proj="gated-gelu")  # T5-v1.1-XXL's encoder
    tokenizer = T5TextEncoder.from_pretrained(build_tiny_t5(assets / "t5"), device="cpu", dtype=torch.float32).tokenizer
    t5 = materialize_random(build_on_meta(lambda: T5EncoderModel(t5_config), dtype), placement.job_network_device)
    wav2vec = materialize_random(build_on_meta(lambda: Wav2Vec2Model(Wav2Vec2Config()), torch.float32), placement.device)
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16_000, padding_value=0.0, do_normalize=True,
                                         return_attention_mask=False)
    return Hallo3Components(
        transformer=materialize_random(build_on_meta(lambda: Hallo3Transformer(presets.full_transformer()), dtype),
                                       placement.transformer_device),
        reference_net=materialize_random(build_on_meta(lambda: ReferenceNet(presets.full_reference_net()), dtype),
                                         placement.job_network_device),
        vae=Hallo3VAE(build_vae(COGVIDEOX_5B_VAE, dtype=dtype, device=placement.device)),
        text_encoder=T5TextEncoder(t5, tokenizer),
        audio_encoder=Wav2VecEncoder(wav2vec, extractor),
        face_analyzer=TinyFaceAnalyzer(),
    )


def build(policy: str, device: torch.device, dtype: torch.dtype, dry_run: bool, assets: Path) -> Hallo3Pipeline:
    placement = placement_for(policy, device, dtype)
    if dry_run:
        return build_tiny_pipeline(assets / "tiny", placement)
    return Hallo3Pipeline(full_size_components(placement, assets), placement, canvas=CANVAS_SIZE)


def rebuild(pipeline: Hallo3Pipeline, policy: str) -> Hallo3Pipeline:
    """The same networks under another offload policy: each moves to where that policy keeps it."""
    old = pipeline.placement
    placement = placement_for(policy, old.device, old.dtype)
    c = pipeline.components
    for module, where in ((c.transformer, placement.transformer_device), (c.reference_net, placement.job_network_device),
                          (c.text_encoder.model, placement.job_network_device)):
        module.to(where)
    if old.device.type == "cuda":
        torch.cuda.empty_cache()
    return Hallo3Pipeline(c, placement, canvas=pipeline.canvas, output_canvas=pipeline.output_canvas)


def job_inputs(folder: Path, segments: int) -> tuple[Path, Path]:
    """The demo job's portrait and a speech-like clip long enough for ``segments`` segments."""
    import base64

    image = json.loads((ROOT / "test_input.json").read_text())["input"]["image"]
    image_path = folder / "portrait.jpg"
    image_path.write_bytes(base64.b64decode(image.split(",", 1)[1]))
    seconds = (segments * 47 - 1) / 25
    t = np.arange(int(seconds * 16_000)) / 16_000
    speech = 0.3 * np.sin(2 * np.pi * 180 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))  # a voiced, syllabic tone
    audio_path = folder / "speech.wav"
    sf.write(audio_path, speech.astype(np.float32), 16_000)
    return image_path, audio_path


def run_job(pipeline: Hallo3Pipeline, folder: Path, segments: int, steps: int, **preset) -> dict:
    """One job; per-stage seconds, VAE decode seconds per segment, peak memory, what the denoiser ran."""
    image, audio = job_inputs(folder, segments)
    request = GenerationRequest(image_path=image, audio_path=audio, prompt="a person talking", seed=7, steps=steps,
                                separate_vocals=False, work_dir=folder, **preset)
    decode_times: list[float] = []
    decode = pipeline.decode_segment

    def timed_decode(latents):
        sync(pipeline.placement.device)
        started = time.perf_counter()
        out = decode(latents)
        sync(pipeline.placement.device)
        decode_times.append(round(time.perf_counter() - started, 3))
        return out

    pipeline.decode_segment = timed_decode
    try:
        started = time.perf_counter()
        result = pipeline.generate(pipeline.prepare(request))
        total = time.perf_counter() - started
    finally:
        del pipeline.decode_segment  # back to the class's method
    segment_s = [result.timings[f"segment_{i}"] for i in range(segments)]
    return {
        "segments": segments,
        "steps": steps,
        "frames": int(result.frames.shape[0]),
        "total_s": round(total, 2),
        "stages_s": {k: round(v, 3) for k, v in result.timings.items()},
        "vae_decode_s_per_segment": decode_times,
        "step_s": round((sum(segment_s) - sum(decode_times)) / (segments * steps), 4),
        "peak_memory_gib": None if result.peak_memory_bytes is None else round(result.peak_memory_bytes / 2**30, 2),
        "denoiser_forwards": result.denoiser_forwards,
        "warnings": list(result.warnings),
    }


def run_presets(pipeline: Hallo3Pipeline, folder: Path, steps: int) -> dict:
    """A 1-segment job per preset (the endpoint defaults of ``fast``): seconds, forwards, what fell back."""
    knobs = {Preset.EXACT: {}, Preset.BALANCED: {},
             Preset.FAST: {"cache_threshold": Settings().fast_cache_threshold, "cfg_fraction": Settings().fast_cfg_fraction}}
    report = {}
    for preset, extra in knobs.items():
        job = run_job(pipeline, folder, segments=1, steps=steps, preset=preset, **extra)
        report[preset.value] = {key: job[key] for key in ("total_s", "step_s", "denoiser_forwards", "peak_memory_gib",
                                                          "warnings")}
    return report


def cold_start(device: torch.device, dtype: torch.dtype, dry_run: bool, folder: Path) -> dict:
    """Seconds to read the main transformer's safetensors from local disk onto the device."""
    config = presets.golden_tiny_transformer() if dry_run else presets.full_transformer()
    model = materialize_random(build_on_meta(lambda: Hallo3Transformer(config), dtype), "cpu")
    path = folder / "transformer.safetensors"
    save_file(model.state_dict(), path)
    del model
    sync(device)
    started = time.perf_counter()
    fresh = load_converted(build_on_meta(lambda: Hallo3Transformer(config), dtype), load_file(path, device=str(device)))
    sync(device)
    seconds = time.perf_counter() - started
    size = path.stat().st_size
    del fresh
    path.unlink()
    return {"transformer_gib": round(size / 2**30, 2), "load_s": round(seconds, 2), "gib_per_s": round(size / 2**30 / seconds, 2)}


def markdown(report: dict) -> str:
    job, cold = report["job"], report["cold_start"]
    lines = [f"GPU check on {report['device']} ({report['model']}), torch {report['torch']}, {report['dtype']}.", "",
             "Exact speed items, one guided forward:", "", bench_speedups.markdown(report["speed_items"]), "",
             f"A {job['segments']}-segment job at {job['steps']} steps ({job['frames']} frames): {job['total_s']} s; "
             f"{job['step_s']} s per sampler step; VAE decode per segment {job['vae_decode_s_per_segment']} s.", "",
             "| stage | seconds |", "| --- | ---: |"]
    lines += [f"| {name} | {seconds} |" for name, seconds in job["stages_s"].items()]
    lines += ["", "| preset (1 segment) | seconds | s / step | transformer forwards | peak GiB | fell back |",
              "| --- | ---: | ---: | ---: | ---: | --- |"]
    for name, entry in report["presets"].items():
        fell_back = "; ".join(entry["warnings"]) or "nothing"
        lines.append(f"| {name} | {entry['total_s']} | {entry['step_s']} | {entry['denoiser_forwards']} | "
                     f"{entry['peak_memory_gib'] if entry['peak_memory_gib'] is not None else 'n/a'} | {fell_back} |")
    lines += ["", "| offload policy | measured peak GiB | estimated GiB |", "| --- | ---: | ---: |"]
    for policy in POLICIES:
        entry = report["policies"][policy]
        lines.append(f"| {policy} | {entry['peak_memory_gib'] if entry['peak_memory_gib'] is not None else 'n/a'} | "
                     f"{entry['estimate_gib']} |")
    lines += ["", f"Cold start: the transformer ({cold['transformer_gib']} GiB) loads from local safetensors in "
                  f"{cold['load_s']} s ({cold['gib_per_s']} GiB/s); the first forward's compile took "
                  f"{report['speed_items']['compile_s']} s."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny size on the CPU (checks the script)")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps of the 2-segment job")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "out" / "gpu_check")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device; use --dry-run to check the script on the CPU")
    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    started = time.perf_counter()
    report: dict = {"device": bench_speedups.device_name(device), "torch": torch.__version__,
                    "model": "tiny, CPU dry run (numbers meaningless)" if args.dry_run else "full size, random weights",
                    "dtype": str(dtype).removeprefix("torch.")}
    report["speed_items"] = bench_speedups.run(device, dtype, warmup=1, iters=3)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the speed items' transformer is gone before the job's networks are made
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        folder = Path(tmp)
        report["cold_start"] = cold_start(device, dtype, args.dry_run, folder)
        pipeline = build("off", device, dtype, args.dry_run, folder)
        report["job"] = run_job(pipeline, folder, segments=2, steps=args.steps)
        report["speedups_attached"] = pipeline.speedup_report
        report["presets"] = run_presets(pipeline, folder, steps=min(args.steps, 10))
        report["policies"] = {}
        for policy in POLICIES:  # from most to least resident, moving the same networks
            pipeline = rebuild(pipeline, policy)
            measured = run_job(pipeline, folder, segments=1, steps=2)
            report["policies"][policy] = {"peak_memory_gib": measured["peak_memory_gib"],
                                          "estimate_gib": round(fitness.estimate_gpu_bytes(policy) / 2**30, 2)}
    report["wall_s"] = round(time.perf_counter() - started, 1)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out_dir / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))  # the script's result
    logger.info("wrote %s and gpu_check.md in %.0f s", args.out_dir / "gpu_check.json", report["wall_s"])
    return 0 if all(math.isfinite(r["forward_s"]) for r in report["speed_items"]["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
