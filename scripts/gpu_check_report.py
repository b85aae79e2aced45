"""The GPU check's Markdown: one part per section of scripts/gpu_check.py, in the JSON's order.

A section that did not run says so (skipped, with the reason; failed, with the error), so the table
of a run cut short reads as far as it went.
"""

from __future__ import annotations

import bench_speedups


def _gib(value) -> str:
    return "n/a" if value is None else f"{value}"


def _forward(entry: dict) -> list[str]:
    return ["One guided forward (CFG batch 2), plain vs each exact speed-up (eager):", "",
            bench_speedups.markdown(entry)]


def _job(entry: dict) -> list[str]:
    lines = [f"A {entry['segments']}-segment job at {entry['steps']} steps ({entry['frames']} frames): "
             f"{entry['total_s']} s; {entry['step_s']} s per sampler step; VAE decode "
             f"{entry['vae_decode_s_per_segment']} s; peak {_gib(entry['peak_memory_gib'])} GiB.", "",
             "| stage | seconds |", "| --- | ---: |"]
    return lines + [f"| {name} | {seconds} |" for name, seconds in entry["stages_s"].items()]


def _policies(entry: dict) -> list[str]:
    lines = ["| offload policy | measured peak GiB | estimated GiB | job s (2 steps) |", "| --- | ---: | ---: | ---: |"]
    for policy, row in entry["policies"].items():
        lines.append(f"| {policy} | {_gib(row['peak_memory_gib'])} | {row['estimate_gib']} | {row['total_s']} |")
    return lines


def _presets(entry: dict) -> list[str]:
    lines = ["| preset (1 segment) | seconds | s / step | transformer forwards | peak GiB | fell back |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for name, row in entry["presets"].items():
        fell_back = "; ".join(row["warnings"]) or "nothing"
        lines.append(f"| {name} | {row['total_s']} | {row['step_s']} | {row['denoiser_forwards']} | "
                     f"{_gib(row['peak_memory_gib'])} | {fell_back} |")
    return lines


def _compile(entry: dict) -> list[str]:
    if not entry["compiled"]:
        return [f"Regional compile failed, eager stays ({entry['eager_forward_s']} s / forward): "
                f"{entry['compile_error']}"]
    return [f"Regional compile of the blocks: {entry['compile_s']} s; forward {entry['eager_forward_s']} s eager, "
            f"{entry['compiled_forward_s']} s compiled ({entry['speedup']}x)."]


def _cold_start(entry: dict) -> list[str]:
    return [f"Cold start: the transformer ({entry['transformer_gib']} GiB) loads from local safetensors in "
            f"{entry['load_s']} s ({entry['gib_per_s']} GiB/s)."]


PARTS = {"forward": ("1. Transformer forward", _forward), "job": ("2. One segment job", _job),
         "policies": ("3. Peak memory per offload policy", _policies), "presets": ("4. Presets", _presets),
         "compile": ("5. Compile", _compile), "cold_start": ("6. Cold start", _cold_start)}


def markdown(report: dict) -> str:
    lines = [f"GPU check on {report['device']} ({report['model']}), torch {report['torch']}, {report['dtype']}; "
             f"{report['wall_s']} s of a {report['budget_s']:.0f} s budget.", ""]
    sections = report["sections"]
    for name, (title, render) in PARTS.items():
        lines.append(f"### {title}")
        lines.append("")
        entry = sections.get(name)
        if entry is None:
            lines.append("Not reached (the run stopped before this section).")
        elif entry["status"] == "skipped":
            lines.append(f"Skipped: {entry['reason']}.")
        elif entry["status"] == "failed":
            lines.append(f"Failed after {entry['wall_s']} s: `{entry['error'].splitlines()[0][:300]}`")
        else:
            lines += render(entry)
            lines.append("")
            lines.append(f"({entry['wall_s']} s; expected {entry['expected_s']} s.)")
        lines.append("")
    return "\n".join(lines)
