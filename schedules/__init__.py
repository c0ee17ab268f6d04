"""Pipeline schedules as data: generate, validate, lower, simulate, draw, and exchange with torch.

    from zb.schedules import generate, simulate, Costs
    schedule = generate("zb-h2", stages=4, microbatches=8)
    timeline = simulate(schedule, Costs.uniform(4))
    timeline.bubble_rate, timeline.peak_memory
    decision = choose_placement(8, 32, Costs.uniform(8, f=1, b=1, w=0.5), "1p")  # one stage per rank, V or interleaved
    decision.chunks, decision.placement, decision.reason, decision.schedule
    lower(schedule, reduce=True)  # sends, receives, and each stage's gradient reduction `1R` for data parallelism
    seconds = Costs.uniform(4, f=0.02, b=0.02, w=0.01).with_reduction(375e6, replicas=8, bandwidth=25e9)
    simulate(schedule, seconds).exposed_reduction  # reduction time the pipeline does not hide

Nothing here imports torch: schedules can be studied on any machine.
"""

from __future__ import annotations

from zb.schedules.actions import (
    BW, COLLECTIVE, COMMUNICATION, COMPUTE, RECV_B, RECV_F, REDUCE, SEND_B, SEND_F, Action, B, F, Schedule,
    ScheduleError, W, looped, one_per_rank, v_shape,
)
from zb.schedules.auto import (
    PLACEMENTS, Decision, choose_placement, placement_of, replan, resolve_memory_limit, zb_auto,
)
from zb.schedules.bound import lower_bound, rank_bounds
from zb.schedules.costs import Costs, parse_memory_limit
from zb.schedules.exact import Solution, solve
from zb.schedules.csv_io import from_csv, to_csv
from zb.schedules.draw import draw, to_text
from zb.schedules.generators import gpipe, interleaved_1f1b, one_f_one_b, v_half, v_min, zb_h1, zb_h2, zb_v
from zb.schedules.heuristic import zb_heuristic
from zb.schedules.lower import check_deadlock_free, lower, validate
from zb.schedules.simulate import REDUCTIONS, Timeline, peak_memory, simulate, span_key

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


__all__ = [
    "Action", "B", "BW", "COLLECTIVE", "COMMUNICATION", "COMPUTE", "Costs", "Decision", "F", "PLACEMENTS", "RECV_B",
    "RECV_F", "REDUCE", "REDUCTIONS", "SCHEDULES", "SEND_B", "SEND_F", "Schedule", "ScheduleError", "Solution",
    "Timeline", "V_SHAPED", "W", "check_deadlock_free", "choose_placement", "default_chunks", "draw", "from_csv",
    "generate", "gpipe", "interleaved_1f1b", "looped", "lower", "lower_bound", "one_f_one_b", "one_per_rank",
    "parse_memory_limit", "peak_memory", "placement_of", "rank_bounds", "replan", "resolve_memory_limit", "simulate",
    "solve", "span_key", "to_csv", "to_text", "v_half", "v_min", "v_shape", "validate", "zb_auto", "zb_h1", "zb_h2",
    "zb_heuristic", "zb_v",
]
