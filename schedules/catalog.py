"""The named schedules: what `zb.schedules.generate` offers, and how many stages per rank each places."""

from __future__ import annotations

from zb.schedules.actions import Schedule, ScheduleError
from zb.schedules.auto import zb_auto
from zb.schedules.costs import Costs
from zb.schedules.generators import gpipe, interleaved_1f1b, one_f_one_b, v_half, v_min, zb_h1, zb_h2, zb_v
from zb.schedules.lower import validate

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-h2", "zb-v", "v-half", "v-min", "zb-auto")
V_SHAPED = ("zb-v", "v-half", "v-min")  # exactly 2 stages per rank, in a V


def default_chunks(name: str) -> int:
    """Stages per rank a schedule uses unless told otherwise (zb-auto: see choose_placement)."""
    return 2 if name in V_SHAPED or name == "interleaved-1f1b" else 1


def generate(name: str, stages: int, microbatches: int, costs: Costs | None = None,
             memory_limit: str | float | None = None, chunks: int | None = None,
             placement: str | tuple[int, ...] | None = None) -> Schedule:
    """A compute-only schedule for `stages` stages (spread over stages // chunks ranks); it validates.

    zb-auto plans for `costs` (uniform if None) one stage per rank, or with chunks=2 the V or interleaved
    placement (`placement`: 'v', 'interleaved' or the stage-to-rank tuple; None: the faster of the two)."""
    if name not in SCHEDULES:
        raise ScheduleError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    chunks = default_chunks(name) if chunks is None else chunks
    if chunks < 1 or stages < 1 or microbatches < 1:
        raise ScheduleError("stages, microbatches and chunks must be positive")
    if stages % chunks:
        raise ScheduleError(f"{stages} stages cannot be spread over ranks with {chunks} chunks each")
    ranks = stages // chunks
    if name in V_SHAPED and chunks != 2:
        raise ScheduleError(f"{name} places exactly 2 stages per rank in a V; got chunks={chunks} "
                            f"(use an even number of stages and chunks=2)")
    if name == "interleaved-1f1b" and chunks < 2:
        raise ScheduleError("interleaved-1f1b needs chunks >= 2 (stages per rank); for one, use 1f1b")
    if name == "zb-auto" and chunks > 2:
        raise ScheduleError(f"zb-auto places one or two stages per rank, not chunks={chunks}")
    if name not in V_SHAPED + ("interleaved-1f1b", "zb-auto") and chunks != 1:
        raise ScheduleError(f"{name} places one stage per rank; chunks={chunks} only applies to zb-v, v-half, "
                            "v-min, interleaved-1f1b and zb-auto")
    if memory_limit is not None and name != "zb-auto":
        raise ScheduleError(f"a memory limit applies to zb-auto only, not {name}")
    if placement is not None and name != "zb-auto":
        raise ScheduleError(f"a placement applies to zb-auto only, not {name}")
    if name == "gpipe":
        schedule = gpipe(ranks, microbatches)
    elif name == "1f1b":
        schedule = one_f_one_b(ranks, microbatches)
    elif name == "interleaved-1f1b":
        schedule = interleaved_1f1b(ranks, microbatches, chunks)
    elif name == "zb-h1":
        schedule = zb_h1(ranks, microbatches)
    elif name == "zb-h2":
        schedule = zb_h2(ranks, microbatches)
    elif name == "zb-v":
        schedule = zb_v(ranks, microbatches)
    elif name == "v-half":
        schedule = v_half(ranks, microbatches)
    elif name == "v-min":
        schedule = v_min(ranks, microbatches)
    else:
        schedule = zb_auto(ranks, microbatches, costs or Costs.uniform(stages), memory_limit, placement=placement)
    validate(schedule)
    return schedule
