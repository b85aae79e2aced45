"""The guided model function on several ranks equals the serial one in fp32, for every layout.

Each world is spawned once (gloo on the CPU) and runs every case under each of its layouts through
the worker's own protocol (rank 0 drives, the others follow): CFG-only, Ulysses-only and both,
uneven token splits that cross latent frames, plain and fused projections, reference tokens and
reference keys/values, and upstream's golden fixtures (one forward, the sampler's first x0 and the
full 50-step trajectory, through 2 ranks).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from parallel_cases import forward_world

from hallo3_worker.parallel.group import free_port

PARALLEL_TOL = 1e-5  # max abs difference relative to the serial output's max magnitude
GOLDEN_TOL = 1e-4  # as tests/models/test_golden_denoiser.py
TRAJECTORY_TOL = 1e-3  # likewise, for the full 50-step sampler trajectory


def _spawn(world: int, layouts: list[str], cases: list[str], tmp_path: Path) -> dict[str, dict[str, float]]:
    out = tmp_path / f"results_{world}.json"
    mp.spawn(forward_world, args=(world, free_port(), layouts, cases, str(out)), nprocs=world, join=True)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict[str, dict[str, float]]:
    return _spawn(2, ["2x1", "1x2"], ["small", "small_fused_kv", "golden"], tmp_path_factory.mktemp("two"))


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory) -> dict[str, dict[str, float]]:
    return _spawn(4, ["2x2", "1x4"], ["small", "small_fused_kv"], tmp_path_factory.mktemp("four"))


@pytest.mark.parametrize("layout", ["2x1", "1x2"])
@pytest.mark.parametrize("case", ["small", "small_fused_kv", "golden"])
def test_two_ranks_match_serial(two_ranks, layout: str, case: str) -> None:
    result = two_ranks[f"{layout}/{case}"]
    assert result["vs_serial"] <= PARALLEL_TOL
    assert result["halves_differ"] > 1e-3  # both halves of the guided batch really were compared


@pytest.mark.parametrize("layout", ["2x1", "1x2"])
def test_golden_fixtures_through_two_ranks(two_ranks, layout: str) -> None:
    result = two_ranks[f"{layout}/golden"]
    assert result["vs_golden"] <= GOLDEN_TOL
    assert result["step0_vs_golden"] <= GOLDEN_TOL
    assert result["trajectory_vs_golden"] <= TRAJECTORY_TOL


@pytest.mark.parametrize("layout", ["2x2", "1x4"])
@pytest.mark.parametrize("case", ["small", "small_fused_kv"])
def test_four_ranks_match_serial(four_ranks, layout: str, case: str) -> None:
    assert four_ranks[f"{layout}/{case}"]["vs_serial"] <= PARALLEL_TOL
