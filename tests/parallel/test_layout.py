"""Layouts, token splits and the settings that choose them (no processes started)."""

from __future__ import annotations

import pytest
import torch

from hallo3_worker.parallel.exchange import all_to_all_bytes_per_block, token_range, token_splits
from hallo3_worker.parallel.layout import ParallelLayout, choose_layout, default_layout
from hallo3_worker.parallel.sharded import _frame_pieces
from hallo3_worker.settings import Settings, SettingsError, load_settings
from hallo3_worker.worker.ranks import start_ranks, world_size

HEADS = 48


@pytest.mark.parametrize(
    ("gpus", "cfg", "ulysses"), [(1, 1, 1), (2, 2, 1), (3, 1, 3), (4, 2, 2), (6, 2, 3), (8, 2, 4), (16, 2, 8)]
)
def test_default_layouts(gpus: int, cfg: int, ulysses: int) -> None:
    layout = choose_layout(gpus, HEADS)
    assert (layout.cfg, layout.ulysses, layout.world_size) == (cfg, ulysses, gpus)
    assert layout == default_layout(gpus)


def test_rank_places() -> None:
    layout = ParallelLayout(cfg=2, ulysses=4)
    assert [layout.cfg_index(r) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [layout.ulysses_rank(r) for r in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert layout.ulysses_ranks(1) == [4, 5, 6, 7]
    assert layout.describe() == "CFG-parallel 2 x Ulysses 4 (8 ranks)"


def test_override_and_its_errors() -> None:
    assert choose_layout(8, HEADS, "1x8") == ParallelLayout(1, 8)
    with pytest.raises(SettingsError, match="HALLO3_PARALLEL=2x2 needs 4 ranks, but HALLO3_GPUS gives 8"):
        choose_layout(8, HEADS, "2x2")
    with pytest.raises(SettingsError, match="does not divide the model's 48 heads"):
        choose_layout(5, HEADS)  # Ulysses 5
    with pytest.raises(SettingsError, match="HALLO3_GPUS=10 splits the attention 5 ways"):
        choose_layout(10, HEADS)  # 2 x 5
    with pytest.raises(SettingsError, match="--ranks=3"):
        choose_layout(3, 2, source="--ranks")  # the tiny model's 2 heads


def test_token_splits_cover_the_tokens_in_order() -> None:
    assert token_splits(17_550, 4) == [4388, 4388, 4387, 4387]
    assert token_splits(17_550, 3) == [5850] * 3
    assert [token_range(105, 4, i) for i in range(4)] == [(0, 27), (27, 53), (53, 79), (79, 105)]
    # Runs of one latent frame each (35 tokens per frame): the second share starts and ends mid-frame.
    assert _frame_pieces(27, 53, 35) == [(0, 0, 8), (1, 8, 26)]
    assert _frame_pieces(0, 105, 35) == [(0, 0, 35), (1, 35, 70), (2, 70, 105)]


def test_all_to_all_volume_of_the_released_model() -> None:
    """Per block and rank, bf16, batch 1 per CFG half, Ulysses 4: about 3 x 4388 x 3072 x 3/4 out
    and (226 + 4388) x 3072 x 3/4 back."""
    sent = all_to_all_bytes_per_block(1, 226, 17_550, 3072, 4, 2)
    assert sent == pytest.approx(2 * (3 * 4387.5 * 3072 * 0.75 + (226 + 4387.5) * 3072 * 0.75), rel=1e-6)
    assert all_to_all_bytes_per_block(1, 226, 17_550, 3072, 1, 2) == 0


def test_settings_name_the_bad_value() -> None:
    defaults = load_settings({})
    assert (defaults.gpus, defaults.parallel, defaults.collective_timeout_s) == ("auto", "auto", 300.0)
    parsed = load_settings({"HALLO3_GPUS": "4", "HALLO3_PARALLEL": "1X4", "HALLO3_COLLECTIVE_TIMEOUT_S": "60"})
    assert (parsed.gpus, parsed.parallel, parsed.collective_timeout_s) == ("4", "1x4", 60.0)
    for env, name in (({"HALLO3_GPUS": "two"}, "HALLO3_GPUS"), ({"HALLO3_GPUS": "0"}, "HALLO3_GPUS"),
                      ({"HALLO3_PARALLEL": "3x2"}, "HALLO3_PARALLEL"), ({"HALLO3_PARALLEL": "4"}, "HALLO3_PARALLEL"),
                      ({"HALLO3_COLLECTIVE_TIMEOUT_S": "0"}, "HALLO3_COLLECTIVE_TIMEOUT_S")):  # fmt: skip
        with pytest.raises(SettingsError, match=name):
            load_settings(env)


def test_world_size_from_the_settings_on_the_cpu() -> None:
    cpu = torch.device("cpu")
    assert world_size(Settings(), cpu) == (1, "HALLO3_GPUS")
    assert world_size(Settings(gpus="1"), cpu) == (1, "HALLO3_GPUS")
    assert world_size(Settings(gpus="8"), cpu, requested=2) == (2, "--ranks")  # a script's --ranks wins
    with pytest.raises(SettingsError, match="HALLO3_GPUS=2 needs CUDA GPUs"):
        world_size(Settings(gpus="2"), cpu)


def test_start_ranks_checks_before_starting_anything() -> None:
    assert start_ranks(Settings(device="cpu")) is None  # one rank: nothing to start
    with pytest.raises(SettingsError, match="does not divide the model's 2 heads"):
        start_ranks(Settings(device="cpu"), requested=3)  # the tiny model: Ulysses 3 of 2 heads
    with pytest.raises(SettingsError, match="HALLO3_PARALLEL=2x2 needs 4 ranks"):
        start_ranks(Settings(device="cpu", parallel="2x2"), requested=2)


def test_benchmark_times_each_layout_of_two_ranks(tmp_path) -> None:
    """scripts/benchmark_denoiser.py --ranks 2 on the CPU: the forward per layout and the exchange table."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    output = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(root / "scripts" / "benchmark_denoiser.py"), "--device", "cpu", "--warmup", "0",
         "--iters", "1", "--ranks", "2", "--output", str(output)],
        capture_output=True, text=True, timeout=600, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(output.read_text())
    assert set(report["ranks"]["layouts"]) == {"2x1", "1x2"}
    assert all(entry["forward_s"] > 0 for entry in report["ranks"]["layouts"].values())
    assert report["exchange_mib_full_size_bf16"]["2x1"]["all_to_all_per_rank"] == 0
    assert report["exchange_mib_full_size_bf16"]["2x4"]["all_to_all_per_rank"] > 1000


def test_a_ulysses_split_refuses_streamed_blocks() -> None:
    """HALLO3_OFFLOAD=full streams rank 0's blocks, which the Ulysses path does not call as blocks."""
    from types import SimpleNamespace

    from hallo3_worker.worker.ranks import Ranks

    ranks = Ranks(SimpleNamespace(layout=ParallelLayout(2, 2)), followers=None, context=None)
    with pytest.raises(SettingsError, match="HALLO3_OFFLOAD=full .* 2x2 split"):
        ranks.attach(SimpleNamespace(block_streamer=object()))
