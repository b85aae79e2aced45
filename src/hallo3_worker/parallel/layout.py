"""How the ranks of one worker share the main transformer: CFG degree x Ulysses degree.

The guided batch has two halves (unconditional, conditional). With a CFG degree of 2 each half
runs on its own group of ranks; inside a group the video tokens are split over the Ulysses
degree, and the self-attention trades tokens for heads, so that degree must divide the heads.
Rank ``r`` computes CFG half ``r // ulysses`` and token share ``r % ulysses``.

The default for a world size: 1 serial, 2 CFG only, any other even count ``2 x (n/2)``, an odd
count Ulysses only. ``HALLO3_PARALLEL`` names another split as ``<cfg>x<ulysses>`` (``1x8``).
"""

from __future__ import annotations

import dataclasses

from hallo3_worker.settings import SettingsError


@dataclasses.dataclass(frozen=True)
class ParallelLayout:
    """``cfg`` ranks groups (1 or 2), each splitting the tokens ``ulysses`` ways."""

    cfg: int = 1
    ulysses: int = 1

    @property
    def world_size(self) -> int:
        return self.cfg * self.ulysses

    def cfg_index(self, rank: int) -> int:
        """Which half of the guided batch ``rank`` computes (0 unconditional) when ``cfg`` is 2."""
        return rank // self.ulysses

    def ulysses_rank(self, rank: int) -> int:
        """``rank``'s share of the video tokens within its CFG group."""
        return rank % self.ulysses

    def ulysses_ranks(self, cfg_index: int) -> list[int]:
        """The global ranks of one CFG group, in token order."""
        return [cfg_index * self.ulysses + u for u in range(self.ulysses)]

    def __str__(self) -> str:
        return f"{self.cfg}x{self.ulysses}"

    def describe(self) -> str:
        if self.world_size == 1:
            return "serial (1 rank)"
        parts = []
        if self.cfg > 1:
            parts.append(f"CFG-parallel {self.cfg}")
        if self.ulysses > 1:
            parts.append(f"Ulysses {self.ulysses}")
        return f"{' x '.join(parts)} ({self.world_size} ranks)"


def default_layout(world_size: int) -> ParallelLayout:
    """The split used for ``world_size`` ranks when no override is given."""
    if world_size < 1:
        raise ValueError(f"world size must be at least 1, got {world_size}")
    if world_size % 2 == 0:
        return ParallelLayout(cfg=2, ulysses=world_size // 2)
    return ParallelLayout(cfg=1, ulysses=world_size)


def parse_layout(text: str) -> ParallelLayout:
    """``"2x4"`` -> ParallelLayout(cfg=2, ulysses=4). Raises SettingsError naming HALLO3_PARALLEL."""
    parts = text.lower().replace(" ", "").split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise SettingsError(f"HALLO3_PARALLEL must be 'auto' or '<cfg>x<ulysses>' such as '2x4', got {text!r}")
    cfg, ulysses = (int(p) for p in parts)
    if cfg not in (1, 2):
        raise SettingsError(f"HALLO3_PARALLEL: the CFG degree must be 1 or 2 (the guided batch's halves), got {cfg}")
    if ulysses < 1:
        raise SettingsError(f"HALLO3_PARALLEL: the Ulysses degree must be at least 1, got {ulysses}")
    return ParallelLayout(cfg=cfg, ulysses=ulysses)


def choose_layout(
    world_size: int, num_heads: int, override: str = "auto", *, source: str = "HALLO3_GPUS"
) -> ParallelLayout:
    """The layout for ``world_size`` ranks and a transformer with ``num_heads`` heads.

    ``override`` is ``HALLO3_PARALLEL`` (``auto`` or ``<cfg>x<ulysses>``); ``source`` names the
    setting that gave the world size, for the messages. Raises SettingsError when the override
    does not multiply to the world size or the Ulysses degree does not divide the heads.
    """
    if override.strip().lower() == "auto":
        layout = default_layout(world_size)
    else:
        layout = parse_layout(override)
        if layout.world_size != world_size:
            raise SettingsError(
                f"HALLO3_PARALLEL={override} needs {layout.world_size} ranks, but {source} gives {world_size}"
            )
    if num_heads % layout.ulysses:
        raise SettingsError(
            f"{source}={world_size} splits the attention {layout.ulysses} ways (layout {layout}), which does not "
            f"divide the model's {num_heads} heads; choose a GPU count whose Ulysses degree divides {num_heads} "
            "or set HALLO3_PARALLEL"
        )
    return layout


__all__ = ["ParallelLayout", "choose_layout", "default_layout", "parse_layout"]
