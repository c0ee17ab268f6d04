"""Pipeline schedules as data: generate, validate, lower, simulate, draw, and exchange with torch.

    from zb.schedules import generate, simulate, Costs
    schedule = generate("zb-h2", stages=4, microbatches=8)
    timeline = simulate(schedule, Costs.uniform(4))
    timeline.bubble_rate, timeline.peak_memory
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
from zb.schedules.auto import zb_auto
from zb.schedules.costs import Costs, parse_memory_limit
from zb.schedules.csv_io import from_csv, to_csv
from zb.schedules.draw import draw, to_text
from zb.schedules.generators import gpipe, interleaved_1f1b, one_f_one_b, zb_h1, zb_h2, zb_v
from zb.schedules.lower import check_deadlock_free, lower, validate
from zb.schedules.simulate import REDUCTIONS, Timeline, simulate

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-h2", "zb-v", "zb-auto")


def default_chunks(name: str) -> int:
    """Stages per rank a schedule uses unless told otherwise."""
    return {"zb-v": 2, "interleaved-1f1b": 2}.get(name, 1)


def generate(name: str, stages: int, microbatches: int, costs: Costs | None = None,
             memory_limit: str | float | None = None, chunks: int | None = None) -> Schedule:
    """A compute-only schedule for `stages` stages (spread over stages // chunks ranks); it validates."""
    if name not in SCHEDULES:
        raise ScheduleError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    chunks = default_chunks(name) if chunks is None else chunks
    if chunks < 1 or stages < 1 or microbatches < 1:
        raise ScheduleError("stages, microbatches and chunks must be positive")
    if stages % chunks:
        raise ScheduleError(f"{stages} stages cannot be spread over ranks with {chunks} chunks each")
    ranks = stages // chunks
    if name == "zb-v" and chunks != 2:
        raise ScheduleError(f"zb-v places exactly 2 stages per rank in a V; got chunks={chunks} "
                            f"(use an even number of stages and chunks=2)")
    if name == "interleaved-1f1b" and chunks < 2:
        raise ScheduleError("interleaved-1f1b needs chunks >= 2 (stages per rank); for one, use 1f1b")
    if name not in ("zb-v", "interleaved-1f1b") and chunks != 1:
        raise ScheduleError(f"{name} places one stage per rank; chunks={chunks} only applies to zb-v and "
                            "interleaved-1f1b")
    if memory_limit is not None and name != "zb-auto":
        raise ScheduleError(f"a memory limit applies to zb-auto only, not {name}")
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
    else:
        schedule = zb_auto(ranks, microbatches, costs or Costs.uniform(stages), memory_limit)
    validate(schedule)
    return schedule


__all__ = [
    "Action", "B", "BW", "COLLECTIVE", "COMMUNICATION", "COMPUTE", "Costs", "F", "RECV_B", "RECV_F", "REDUCE",
    "REDUCTIONS", "SCHEDULES", "SEND_B", "SEND_F", "Schedule", "ScheduleError", "Timeline", "W",
    "check_deadlock_free", "default_chunks", "draw", "from_csv", "generate", "gpipe", "interleaved_1f1b", "looped",
    "lower", "one_f_one_b", "one_per_rank", "parse_memory_limit", "simulate", "to_csv", "to_text", "v_shape",
    "validate", "zb_auto", "zb_h1", "zb_h2", "zb_v",
]
