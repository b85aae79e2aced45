"""Compare the speed presets on (portrait, speech) pairs: time, GPU memory, fidelity to exact, lip sync.

    python scripts/evaluate_presets.py --pairs clips/ --weights /path/to/weights --output-dir out/presets
    python scripts/evaluate_presets.py --fast 0.05:0.6 --fast 0.1:0.6 --fast 0.2:0.5 ...   # tune "fast"

For every clip it runs the exact preset and then every other preset with the same seed, and
reports per preset: wall time of the generation (and the speed-up over exact), the GPU's peak
memory, the denoiser's work (full forwards, cached steps, steps without the unconditional half),
PSNR and SSIM of the frames against exact's, a lip-sync proxy for every preset including exact
(the correlation of a mouth-opening signal with the speech loudness, see scripts/preset_metrics.py)
and the warnings (what fell back). The table goes to stdout as Markdown and, with --output-dir,
to presets.json and presets.md there.

``--pairs``: a folder of clips, each an image and an audio file with the same name stem
(``anna.jpg`` + ``anna.wav``); a folder holding just one image and one audio file is one clip
whatever their names. Default: the test assets.
``--weights``: the Hallo3 weights folder (as ``HALLO3_WEIGHTS_DIR``); without it, and without that
variable, the embedded tiny random-weight model runs on the CPU: its numbers show only that the
mechanics work.
``--landmarker``: MediaPipe's ``face_landmarker*.task`` model file for the real mouth-opening
measure; without it a stand-in (grey-level contrast of the mouth region) is used and the table
says so.
``--fast T:F`` (repeatable): run ``fast`` with cache threshold T and CFG fraction F; default: the
endpoint defaults (``HALLO3_FAST_CACHE_THRESHOLD``, ``HALLO3_FAST_CFG_FRACTION``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from preset_metrics import LandmarkMouthOpening, MouthRegionContrast, lipsync_r, loudness_envelope, psnr, ssim

from hallo3_worker.errors import InputError
from hallo3_worker.interface import GenerationRequest, Preset
from hallo3_worker.settings import CACHE_THRESHOLD_RANGE, CFG_FRACTION_RANGE, load_settings
from hallo3_worker.worker.runtime import load_pipeline

logger = logging.getLogger("evaluate_presets")

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
AUDIO_SUFFIXES = {".wav", ".mp3", ".flac", ".ogg", ".m4a"}
TINY_NOTE = ("embedded tiny random-weight model on the CPU: the frames are noise, so the times, fidelity and "
             "lip-sync numbers mean nothing; they only show that the evaluation works")


@dataclasses.dataclass(frozen=True)
class Variant:
    label: str
    preset: Preset
    cache_threshold: float = 0.0
    cfg_fraction: float = 1.0


@dataclasses.dataclass(frozen=True)
class Clip:
    name: str
    image: Path
    audio: Path


def find_clips(folder: Path) -> list[Clip]:
    files = sorted(p for p in folder.iterdir() if p.is_file())
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    audios = [p for p in files if p.suffix.lower() in AUDIO_SUFFIXES]
    if len(images) == 1 and len(audios) == 1:
        return [Clip(images[0].stem, images[0], audios[0])]
    by_stem = {p.stem: p for p in audios}
    clips = [Clip(p.stem, p, by_stem[p.stem]) for p in images if p.stem in by_stem]
    if not clips:
        raise SystemExit(f"{folder}: no (image, audio) pairs with the same name stem")
    return clips


def fast_knobs(text: str) -> tuple[float, float]:
    try:
        threshold, fraction = (float(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected THRESHOLD:FRACTION such as 0.1:0.6, got {text!r}") from None
    if not (CACHE_THRESHOLD_RANGE[0] <= threshold <= CACHE_THRESHOLD_RANGE[1]
            and CFG_FRACTION_RANGE[0] <= fraction <= CFG_FRACTION_RANGE[1]):
        raise argparse.ArgumentTypeError("threshold must be in [{:g}, {:g}] and fraction in [{:g}, {:g}]".format(
            *CACHE_THRESHOLD_RANGE, *CFG_FRACTION_RANGE))
    return threshold, fraction


def variants(presets: list[str], fast: list[tuple[float, float]]) -> list[Variant]:
    """exact first (the reference), then the others in the order asked."""
    out = [Variant("exact", Preset.EXACT)]
    for name in presets:
        if name == "balanced":
            out.append(Variant("balanced", Preset.BALANCED))
        elif name == "fast":
            out += [Variant("fast" if len(fast) == 1 else f"fast {t:g}:{f:g}", Preset.FAST, t, f) for t, f in fast]
    return out


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _face_box(pipeline, frame: np.ndarray) -> tuple[float, float, float, float] | None:
    """The face detector's box (x0, y0, x1, y1) in an output frame, or None."""
    try:
        return tuple(float(v) for v in pipeline.components.face_analyzer.analyze(frame).detection_bbox)
    except InputError:
        return None


def evaluate_clip(pipeline, clip: Clip, runs: list[Variant], args: argparse.Namespace, landmarker) -> dict:
    def request(variant: Variant, steps: int) -> GenerationRequest:
        return GenerationRequest(
            image_path=clip.image, audio_path=clip.audio, prompt=args.prompt, seed=args.seed, steps=steps,
            separate_vocals=args.separate_vocals, max_duration_s=args.max_seconds, preset=variant.preset,
            cache_threshold=variant.cache_threshold, cfg_fraction=variant.cfg_fraction,
        )

    job = pipeline.prepare(request(runs[0], args.steps))
    audio = job.data["audio"]
    loudness = loudness_envelope(audio.mono(), audio.sample_rate, job.num_frames)
    rows, exact_frames, exact_wall, meter = [], None, None, landmarker
    for variant in runs:
        _sync()
        started = time.perf_counter()
        result = pipeline.generate(dataclasses.replace(job, request=request(variant, args.steps)))
        _sync()
        wall = time.perf_counter() - started
        frames = result.frames
        if exact_frames is None:
            exact_frames, exact_wall = frames, wall
            if meter is None:
                meter = MouthRegionContrast.from_face(_face_box(pipeline, frames[0]), *frames.shape[1:3])
        value = psnr(frames, exact_frames)
        rows.append({
            "variant": variant.label,
            "preset": variant.preset.value,
            "cache_threshold": variant.cache_threshold if variant.preset is Preset.FAST else None,
            "cfg_fraction": variant.cfg_fraction if variant.preset is Preset.FAST else None,
            "wall_s": round(wall, 3),
            "speedup": round(exact_wall / wall, 3) if wall > 0 else None,
            "gpu_peak_gib": None if result.peak_memory_bytes is None else round(result.peak_memory_bytes / 2**30, 2),
            "denoiser_forwards": result.denoiser_forwards,
            "cached_steps": result.cached_steps,
            "cond_only_steps": result.cond_only_steps,
            "identical_to_exact": bool(np.array_equal(frames, exact_frames)),
            "psnr_db": None if value == float("inf") else round(value, 2),
            "ssim": round(ssim(frames, exact_frames), 4),
            "lipsync_r": _round(lipsync_r(meter.measure(frames), loudness)),
            "warnings": [w for w in result.warnings if "fell back" in w],
        })
        logger.info("%s / %s: %.1f s", clip.name, variant.label, wall)
    return {"clip": clip.name, "image": clip.image.name, "audio": clip.audio.name, "frames": job.num_frames,
            "mouth_meter": meter.name, "rows": rows}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def markdown(report: dict) -> str:
    lines = [f"# Presets on {report['model']}", ""]
    if report.get("note"):
        lines += [f"**Note:** {report['note']}.", ""]
    lines += [f"Device: {report['device']}; steps {report['steps']}; seed {report['seed']}.", ""]
    header = ("| preset | wall s | speed-up | GPU peak GiB | forwards | cached | cond-only | PSNR dB | SSIM | "
              "lip-sync r | fell back |")
    for clip in report["clips"]:
        lines += [f"## {clip['clip']} ({clip['frames']} frames; mouth signal: {clip['mouth_meter']})", "", header,
                  "|" + "---|" * 11]
        for r in clip["rows"]:
            psnr_text = "identical" if r["identical_to_exact"] else ("-" if r["psnr_db"] is None else f"{r['psnr_db']}")
            cells = [r["variant"], r["wall_s"], r["speedup"], r["gpu_peak_gib"], r["denoiser_forwards"],
                     r["cached_steps"], r["cond_only_steps"], psnr_text, r["ssim"], r["lipsync_r"],
                     "; ".join(w.split(": ")[1] for w in r["warnings"]) or "-"]
            lines.append("| " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=Path, default=ROOT / "tests" / "assets", help="folder of clips")
    parser.add_argument("--weights", type=Path, help="Hallo3 weights folder (default: HALLO3_WEIGHTS_DIR or tiny)")
    parser.add_argument("--device", help="torch device (default: HALLO3_DEVICE, else auto)")
    parser.add_argument("--presets", default="balanced,fast", help="presets besides exact, comma-separated")
    parser.add_argument("--fast", type=fast_knobs, action="append", metavar="T:F",
                        help="cache threshold and CFG fraction of a fast run (repeatable)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--prompt", default="A person is talking.")
    parser.add_argument("--max-seconds", type=float, help="use at most this much of each audio file")
    parser.add_argument("--no-separate-vocals", dest="separate_vocals", action="store_false")
    parser.add_argument("--landmarker", type=Path, help="MediaPipe face_landmarker .task file")
    parser.add_argument("--warmup", type=int, choices=(0, 1), help="one short untimed run of each preset first "
                        "(compilation, fp8 copies); default 1 on a GPU, 0 on the CPU")
    parser.add_argument("--output-dir", type=Path, help="write presets.json and presets.md here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    names = [n.strip().lower() for n in args.presets.split(",") if n.strip()]
    unknown = [n for n in names if n not in {p.value for p in Preset}]
    if unknown:
        parser.error(f"unknown preset {unknown[0]!r}")
    settings = load_settings()
    overrides = {k: v for k, v in (("weights_dir", args.weights), ("device", args.device)) if v is not None}
    settings = dataclasses.replace(settings, **overrides)
    runs = variants(names, args.fast or [(settings.fast_cache_threshold, settings.fast_cfg_fraction)])
    clips = find_clips(args.pairs)
    landmarker = LandmarkMouthOpening(args.landmarker) if args.landmarker else None

    pipeline = load_pipeline(settings)
    device = pipeline.placement.device
    if args.warmup if args.warmup is not None else device.type == "cuda":
        for variant in runs:  # untimed: compilation, the fp8 copies
            request = GenerationRequest(image_path=clips[0].image, audio_path=clips[0].audio, prompt=args.prompt,
                                        seed=args.seed, steps=2, separate_vocals=False, max_duration_s=1.0,
                                        preset=variant.preset)
            pipeline.generate(pipeline.prepare(request))
    report = {
        "model": "tiny random-weight model" if pipeline.is_tiny else f"Hallo3 weights in {settings.weights_dir}",
        "note": TINY_NOTE if pipeline.is_tiny else "",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "steps": args.steps,
        "seed": args.seed,
        "clips": [evaluate_clip(pipeline, clip, runs, args, landmarker) for clip in clips],
    }
    text = markdown(report)
    if args.output_dir:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        (args.output_dir / "presets.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.output_dir / "presets.md").write_text(text + "\n")
    print(text)  # the table is the script's output
    return 0


if __name__ == "__main__":
    sys.exit(main())
