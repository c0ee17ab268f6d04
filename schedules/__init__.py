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
from zb.schedules.catalog import SCHEDULES, V_SHAPED, default_chunks, generate
from zb.schedules.costs import Costs, parse_memory_limit
from zb.schedules.exact import Solution, solve
from zb.schedules.csv_io import from_csv, to_csv
from zb.schedules.draw import draw, to_text
from zb.schedules.generators import gpipe, interleaved_1f1b, one_f_one_b, v_half, v_min, zb_h1, zb_h2, zb_v
from zb.schedules.heuristic import zb_heuristic
from zb.schedules.lower import check_deadlock_free, lower, validate
from zb.schedules.simulate import REDUCTIONS, Timeline, peak_memory, simulate, span_key

__all__ = [
    "Action", "B", "BW", "COLLECTIVE", "COMMUNICATION", "COMPUTE", "Costs", "Decision", "F", "PLACEMENTS", "RECV_B",
    "RECV_F", "REDUCE", "REDUCTIONS", "SCHEDULES", "SEND_B", "SEND_F", "Schedule", "ScheduleError", "Solution",
    "Timeline", "V_SHAPED", "W", "check_deadlock_free", "choose_placement", "default_chunks", "draw", "from_csv",
    "generate", "gpipe", "interleaved_1f1b", "looped", "lower", "lower_bound", "one_f_one_b", "one_per_rank",
    "parse_memory_limit", "peak_memory", "placement_of", "rank_bounds", "replan", "resolve_memory_limit", "simulate",
    "solve", "span_key", "to_csv", "to_text", "v_half", "v_min", "v_shape", "validate", "zb_auto", "zb_h1", "zb_h2",
    "zb_heuristic", "zb_v",
]
