"""The one prepared GPU check: speed and memory of the worker on this machine, as JSON and a Markdown table.

On a CUDA device everything is full size with random weights created on the device (no downloads;
speed and memory do not depend on weight values). Sections, most valuable first; each one is
guarded (a failure is recorded with its error and the next one runs), and the JSON and Markdown are
rewritten after every section, so a run cut short still reports what it measured:

1. ``forward``: one guided (CFG batch 2) transformer forward, plain vs each exact speed-up except
   compile (scripts/bench_speedups.py): seconds, TFLOP/s and MFU against the card's dense bf16 peak;
2. ``job``: a 1-segment 480x720 job through the real pipeline (exact speed-ups, eager, offload
   ``off``): per-stage seconds, seconds per sampler step, VAE decode, peak memory;
3. ``policies``: the measured peak GPU memory of a 1-segment job under ``off``, ``partial`` and
   ``full``, beside the estimate of hallo3_worker.fitness;
4. ``presets``: a 1-segment job per speed preset: seconds, transformer forwards, what fell back;
5. ``compile``: regional torch.compile of the blocks: compile seconds and the compiled forward (a
   compile that fails, for lack of a C compiler or Python.h say, is recorded and eager stays);
6. ``cold_start``: seconds to load the main transformer from safetensors on local disk.

``--budget-s`` (default: one 10-minute call with a minute to spare) skips a section that would not
finish in time, by its expected duration: FLOPs counted on the meta device times the measured (or,
before the first forward, assumed) throughput, plus the section's fixed costs.

The check hands decoded media to the pipeline itself: nothing on its import path needs PyAV,
librosa, soundfile, audio-separator, onnx or runpod (on the lent GPU machines, only the diffusers
wheel travels). ``--dry-run`` does all of it at tiny size on the CPU (CI runs it).

    python scripts/gpu_check.py [--dry-run] [--steps 20] [--budget-s 540] [--out-dir out/gpu_check]
"""

from __future__ import annotations

import argparse
import base64
import gc
import io
import json
import logging
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.utils.flop_counter import FlopCounterMode

import bench_speedups
import gpu_check_report
from benchutil import median_seconds, sync

from hallo3_worker import fitness
from hallo3_worker.conditioning.audio import SAMPLE_RATE, Wav2VecEncoder
from hallo3_worker.conditioning.image import CANVAS_SIZE
from hallo3_worker.conditioning.text import T5TextEncoder
from hallo3_worker.conditioning.tiny_assets import build_tiny_t5
from hallo3_worker.interface import DecodedAudio, DecodedImage, DecodedInputs, GenerationRequest, Preset
from hallo3_worker.models import presets
from hallo3_worker.models.layers import FeedForward, fuse_projections
from hallo3_worker.models.loading import build_on_meta, load_converted, materialize_random
from hallo3_worker.models.reference_net import ReferenceNet
from hallo3_worker.models.speedups import ExactSpeedups, compile_blocks
from hallo3_worker.models.transformer import Hallo3Transformer
from hallo3_worker.models.vae import COGVIDEOX_5B_VAE, Hallo3VAE, build_vae
from hallo3_worker.pipeline import Hallo3Components, Hallo3Pipeline, Placement
from hallo3_worker.settings import Settings
from hallo3_worker.tiny import TinyFaceAnalyzer, build_tiny_pipeline, tiny_transformer_config

logger = logging.getLogger("gpu_check")
ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("off", "partial", "full")
DEFAULT_BUDGET_S = 540  # one 10-minute device call, a minute kept for start-up and the copy back
# Assumed until the first forward is measured: the share of the card's dense bf16 peak an eager
# forward reaches, and the CPU's FLOP/s in the dry run.
ASSUMED_MFU = 0.35
ASSUMED_CPU_FLOPS = 20e9
# Fixed costs per section (seconds) on a GPU: making the networks on the device, T5/wav2vec/VAE
# work, the VAE decode of one 49-frame segment, compile and a 10 GB safetensors round trip.
GPU_FIXED_S = {"forward": 15, "job": 60, "policies": 45, "presets": 60, "compile": 150, "cold_start": 60}
CPU_FIXED_S = {"forward": 2, "job": 20, "policies": 60, "presets": 60, "compile": 20, "cold_start": 2}  # tiny
# Transformer forwards per section, as a function of the job's steps.
FORWARDS = {"forward": lambda steps: 5 * 4, "job": lambda steps: steps + 1,
            "policies": lambda steps: 3 * (2 + 1) * 1.5, "presets": lambda steps: 3 * (min(steps, 10) + 1),
            "compile": lambda steps: 4, "cold_start": lambda steps: 0}


# ----------------------------------------------------------------------------------- networks


def placement_for(policy: str, device: torch.device, dtype: torch.dtype) -> Placement:
    """The worker's placement for an offload policy (as hallo3_worker.worker.runtime builds it)."""
    return Placement(device=device, dtype=dtype, offload=policy != "off", offload_transformer=policy == "full",
                     feed_forward_chunk=fitness.FULL_OFFLOAD_FEED_FORWARD_CHUNK if policy == "full" else None)


def transformer_config(dry_run: bool):
    return tiny_transformer_config() if dry_run else presets.full_transformer()


def full_size_components(placement: Placement, assets: Path) -> Hallo3Components:
    """Every network at full size with random weights, where ``placement`` keeps it (no vocal separator)."""
    from transformers import T5Config, T5EncoderModel, Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    dtype = placement.dtype
    t5_config = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                         feed_forward_proj="gated-gelu")  # T5-v1.1-XXL's encoder
    tokenizer = T5TextEncoder.from_pretrained(build_tiny_t5(assets / "t5"), device="cpu", dtype=torch.float32).tokenizer
    t5 = materialize_random(build_on_meta(lambda: T5EncoderModel(t5_config), dtype), placement.job_network_device)
    wav2vec = materialize_random(build_on_meta(lambda: Wav2Vec2Model(Wav2Vec2Config()), torch.float32), placement.device)
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0,
                                         do_normalize=True, return_attention_mask=False)
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


EAGER = ExactSpeedups(compile_blocks=False)  # compile is measured on its own (section 5)


def build(policy: str, device: torch.device, dtype: torch.dtype, dry_run: bool, assets: Path) -> Hallo3Pipeline:
    placement = placement_for(policy, device, dtype)
    if dry_run:
        return build_tiny_pipeline(assets / "tiny", placement, speedups=EAGER)
    return Hallo3Pipeline(full_size_components(placement, assets), placement, canvas=CANVAS_SIZE, speedups=EAGER)


def rebuild(pipeline: Hallo3Pipeline, policy: str) -> Hallo3Pipeline:
    """The same networks under another offload policy: each moves to where that policy keeps it."""
    old = pipeline.placement
    placement = placement_for(policy, old.device, old.dtype)
    c = pipeline.components
    if pipeline.block_streamer is not None:
        pipeline.block_streamer.remove()
    if old.feed_forward_chunk is not None and placement.feed_forward_chunk is None:
        for sub in c.transformer.modules():  # back to the class's unchunked forward
            if isinstance(sub, FeedForward):
                vars(sub).pop("forward", None)
    for module, where in ((c.transformer, placement.transformer_device), (c.reference_net, placement.job_network_device),
                          (c.text_encoder.model, placement.job_network_device)):
        module.to(where)
    free_device_memory(old.device)
    return Hallo3Pipeline(c, placement, canvas=pipeline.canvas, output_canvas=pipeline.output_canvas,
                          speedups=pipeline.speedups)


def free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------- jobs


def job_inputs(segments: int) -> DecodedInputs:
    """The demo job's portrait and a speech-like 16 kHz tone long enough for ``segments`` segments, decoded."""
    image = json.loads((ROOT / "test_input.json").read_text())["input"]["image"]
    with Image.open(io.BytesIO(base64.b64decode(image.split(",", 1)[1]))) as picture:
        rgb = np.asarray(picture.convert("RGB"))
    seconds = (segments * 47 - 1) / 25
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    speech = 0.3 * np.sin(2 * np.pi * 180 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))  # a voiced, syllabic tone
    audio = DecodedAudio(samples=speech.astype(np.float32)[None, :], sample_rate=SAMPLE_RATE, codec="pcm_f32le",
                         source_channels=1, layout="mono")
    return DecodedInputs(image=DecodedImage(rgb=rgb, format="JPEG", mode="RGB"), audio=audio)


def run_job(pipeline: Hallo3Pipeline, folder: Path, segments: int, steps: int, **preset) -> dict:
    """One job; per-stage seconds, VAE decode seconds per segment, peak memory, what the denoiser ran."""
    request = GenerationRequest(image_path=folder / "portrait.jpg", audio_path=folder / "speech.wav",
                                prompt="a person talking", seed=7, steps=steps, separate_vocals=False,
                                work_dir=folder, inputs=job_inputs(segments), **preset)
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


# ----------------------------------------------------------------------------------- sections


class Check:
    """The sections, the budget and the report; the report is written after every section."""

    def __init__(self, args: argparse.Namespace, folder: Path) -> None:
        self.args, self.folder = args, folder
        self.dry_run = args.dry_run
        self.device = torch.device("cpu" if args.dry_run else "cuda")
        self.dtype = torch.float32 if args.dry_run else torch.bfloat16
        self.started = time.perf_counter()
        self.pipeline: Hallo3Pipeline | None = None
        self.flop_per_forward = self._count_forward_flop()
        self.forward_s: float | None = None  # measured by the first section
        self.report: dict = {
            "device": bench_speedups.device_name(self.device), "torch": torch.__version__,
            "model": "tiny, CPU dry run (numbers meaningless)" if args.dry_run else "full size, random weights",
            "dtype": str(self.dtype).removeprefix("torch."), "budget_s": args.budget_s, "steps": args.steps,
            "flop_per_forward": self.flop_per_forward, "sections": {},
        }

    def _count_forward_flop(self) -> int:
        """FLOPs of one guided forward, counted on the meta device (shapes only, nothing computed)."""
        model = build_on_meta(lambda: Hallo3Transformer(transformer_config(self.dry_run)))
        with torch.device("meta"):
            inputs, tokens = bench_speedups.guided_inputs(model, torch.device("meta"), torch.float32)
            with FlopCounterMode(display=False) as counter:
                model(*inputs, tokens)
        return counter.get_total_flops()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def expected_s(self, name: str) -> float:
        """A section's expected seconds: its transformer forwards at the measured (or assumed) speed, plus fixed costs."""
        if self.forward_s is not None:
            per_forward = self.forward_s
        else:
            peak = bench_speedups.peak_tflops(self.device)
            flops = ASSUMED_CPU_FLOPS if self.dry_run else (peak or 400.0) * 1e12 * ASSUMED_MFU
            per_forward = self.flop_per_forward / flops
        fixed = (CPU_FIXED_S if self.dry_run else GPU_FIXED_S)[name]
        return FORWARDS[name](self.args.steps) * per_forward + fixed

    def section(self, name: str, body: Callable[[], dict]) -> None:
        expected = self.expected_s(name)
        left = self.args.budget_s - self.elapsed()
        entry: dict = {"expected_s": round(expected, 1)}
        if self.report["sections"] and expected > left:  # the first section always runs
            entry.update(status="skipped", reason=f"expected {expected:.0f} s, {max(left, 0):.0f} s of the budget left")
            logger.warning("skipping %s: %s", name, entry["reason"])
        else:
            logger.info("section %s (expected %.0f s, %.0f s left)", name, expected, left)
            started = time.perf_counter()
            try:
                entry.update(status="ok", **body())
            except Exception as error:  # noqa: BLE001 - recorded; the next section still runs
                entry.update(status="failed", error=f"{type(error).__name__}: {error}"[:2000],
                             traceback=traceback.format_exc(limit=6)[-3000:])
                logger.exception("section %s failed", name)
                free_device_memory(self.device)
            entry["wall_s"] = round(time.perf_counter() - started, 1)
        self.report["sections"][name] = entry
        self.save()

    def save(self) -> None:
        self.report["wall_s"] = round(self.elapsed(), 1)
        out = self.args.out_dir
        out.mkdir(parents=True, exist_ok=True)
        for filename, text in (("gpu_check.json", json.dumps(self.report, indent=2) + "\n"),
                               ("gpu_check.md", gpu_check_report.markdown(self.report))):
            partial = out / f".{filename}.partial"
            partial.write_text(text)
            partial.replace(out / filename)  # a reader never sees half a file

    def pipeline_for(self, policy: str) -> Hallo3Pipeline:
        if self.pipeline is None:
            self.pipeline = build(policy, self.device, self.dtype, self.dry_run, self.folder)
        elif self.pipeline.placement.offload != (policy != "off") or \
                self.pipeline.placement.offload_transformer != (policy == "full"):
            self.pipeline = rebuild(self.pipeline, policy)
        return self.pipeline

    # -- the sections

    def forward(self) -> dict:
        result = bench_speedups.run(self.device, self.dtype, warmup=1, iters=3, compile_=False)
        self.forward_s = next(r["forward_s"] for r in result["rows"] if r["item"] == "all")
        free_device_memory(self.device)
        return result

    def job(self) -> dict:
        return {**run_job(self.pipeline_for("off"), self.folder, segments=1, steps=self.args.steps),
                "speedups_attached": self.pipeline.speedup_report}

    def policies(self) -> dict:
        measured = {}
        for policy in POLICIES:  # from most to least resident, moving the same networks
            job = run_job(self.pipeline_for(policy), self.folder, segments=1, steps=2)
            measured[policy] = {"peak_memory_gib": job["peak_memory_gib"], "total_s": job["total_s"],
                                "estimate_gib": round(fitness.estimate_gpu_bytes(policy) / 2**30, 2)}
        return {"policies": measured}

    def presets(self) -> dict:
        settings = Settings()
        knobs = {Preset.EXACT: {}, Preset.BALANCED: {},
                 Preset.FAST: {"cache_threshold": settings.fast_cache_threshold,
                               "cfg_fraction": settings.fast_cfg_fraction}}
        pipeline, report = self.pipeline_for("off"), {}
        for preset, extra in knobs.items():
            job = run_job(pipeline, self.folder, segments=1, steps=min(self.args.steps, 10), preset=preset, **extra)
            report[preset.value] = {key: job[key] for key in ("total_s", "step_s", "denoiser_forwards",
                                                              "peak_memory_gib", "warnings")}
        return {"presets": report}

    def compile(self) -> dict:
        """Regional compile of a fresh transformer's blocks (fused, as the worker runs): compile and forward seconds."""
        self.pipeline = None  # the job's networks make room
        free_device_memory(self.device)
        model = materialize_random(build_on_meta(lambda: Hallo3Transformer(transformer_config(self.dry_run)),
                                                 self.dtype), self.device)
        fuse_projections(model)
        inputs, tokens = bench_speedups.guided_inputs(model, self.device, self.dtype)
        reference = model.reference_kv(tokens)
        with torch.inference_mode():
            eager_s = median_seconds(lambda: model(*inputs, reference), self.device, 1, 3)
            compile_blocks(model.blocks)
            sync(self.device)
            started = time.perf_counter()
            try:
                model(*inputs, reference)  # the first call compiles
            except Exception as error:  # noqa: BLE001 - e.g. no C compiler or Python.h: eager stays
                logger.warning("torch.compile failed; the worker would need HALLO3_COMPILE=off: %s", error)
                return {"compiled": False, "eager_forward_s": round(eager_s, 4),
                        "compile_error": f"{type(error).__name__}: {error}"[:2000], "fallback": "eager"}
            sync(self.device)
            compile_s = time.perf_counter() - started
            compiled_s = median_seconds(lambda: model(*inputs, reference), self.device, 1, 3)
        return {"compiled": True, "compile_s": round(compile_s, 2), "eager_forward_s": round(eager_s, 4),
                "compiled_forward_s": round(compiled_s, 4), "speedup": round(eager_s / compiled_s, 3)}

    def cold_start(self) -> dict:
        """Seconds to read the main transformer's safetensors from local disk onto the device."""
        self.pipeline = None
        free_device_memory(self.device)
        config = transformer_config(self.dry_run)
        model = materialize_random(build_on_meta(lambda: Hallo3Transformer(config), self.dtype), "cpu")
        path = self.folder / "transformer.safetensors"
        save_file(model.state_dict(), path)
        del model
        sync(self.device)
        started = time.perf_counter()
        fresh = load_converted(build_on_meta(lambda: Hallo3Transformer(config), self.dtype),
                               load_file(path, device=str(self.device)))
        sync(self.device)
        seconds = time.perf_counter() - started
        size = path.stat().st_size
        del fresh
        path.unlink()
        return {"transformer_gib": round(size / 2**30, 2), "load_s": round(seconds, 2),
                "gib_per_s": round(size / 2**30 / seconds, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny size on the CPU (checks the script)")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps of the job section")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="skip sections that would end past this many seconds (the first always runs)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "out" / "gpu_check")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device; use --dry-run to check the script on the CPU")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        check = Check(args, Path(tmp))
        check.save()
        for name in ("forward", "job", "policies", "presets", "compile", "cold_start"):
            check.section(name, getattr(check, name))
        check.pipeline = None
    print(gpu_check_report.markdown(check.report))  # the script's result
    sections = check.report["sections"]
    logger.info("wrote %s and gpu_check.md in %.0f s", args.out_dir / "gpu_check.json", check.report["wall_s"])
    return 1 if any(entry["status"] == "failed" for entry in sections.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
