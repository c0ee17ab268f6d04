"""zb-auto: the shortest schedule under a per-rank memory limit, for the given per-stage costs.

"Shortest" is the longest rank span (first start to last end on a rank): the time one training step takes in
steady state, the paper's cost; the makespan breaks ties. Candidates, all timed with the same model:
  * the handcrafted zb-h1, zb-h2 and 1f1b when their peak memory fits;
  * the paper's heuristic, as the list scheduler (greedy.py) under the memory limit, over its knobs: a warm-up
    staircase (rank r holds at most k(p-r) microbatches, or no cap but memory), a ready B before a ready F or
    not, how eagerly a W fills an idle gap, and whether a W may delay the last microbatch's chain of backwards
    (`strict_drain`: it may not; that chain ends the first rank's step, so with it the schedule can reach the
    lower bound below).
So zb-auto is never worse than zb-h1 at `1p` nor than zb-h2 at `2p`.

The heuristic's candidates run best-first within a budget of work, not of time, so that the plan depends only on
the inputs (every rank plans the same schedule, on any machine): each list-scheduler run places 3 x stages x
microbatches actions (an F, a B and a W per microbatch and stage), and candidates run while the actions placed
so far stay within WORK_BUDGET. Up to p x m = 8 x 64 (or 16 x 32) every candidate runs; p = 32, m = 256 gets the
first 4, and the whole `zb schedule` command stays under 2 s there (bench/schedules.py measures it).
"""

from __future__ import annotations

import dataclasses
import itertools

from zb.schedules.actions import Schedule, ScheduleError, one_per_rank
from zb.schedules.costs import Costs, parse_memory_limit
from zb.schedules.generators import one_f_one_b, zb_h1, zb_h2
from zb.schedules.greedy import Policy, greedy
from zb.schedules.simulate import simulate

DEFAULT_LIMIT = "2p"
# Actions the list scheduler may place over all the candidate policies it tries (about 0.5 s on a 2-core CI
# machine). A run places 3 x p x m actions, so all 56 candidates run while p x m <= 595 (p = 8, m = 24: 576 actions
# a run; 8 x 64; 16 x 32); p = 32, m = 256 (24576 a run) gets the first 4.
WORK_BUDGET = 100_000


def zb_auto(ranks: int, microbatches: int, costs: Costs, memory_limit: str | float | None = None,
            work_budget: int = WORK_BUDGET) -> Schedule:
    if costs.num_stages != ranks:
        raise ScheduleError(f"zb-auto places one stage per rank: costs cover {costs.num_stages} stages for "
                            f"{ranks} ranks")
    unit = max(costs.mem_b)  # one microbatch's activations on the most loaded rank
    limit = parse_memory_limit(DEFAULT_LIMIT if memory_limit is None else memory_limit, unit, ranks)
    if limit + 1e-9 < unit:
        raise ScheduleError(
            f"memory limit {limit:g} is below what any schedule needs: one microbatch in flight on a stage takes "
            f"{unit:g} (M_B); give at least that (for example '1p' = {ranks * unit:g})"
        )
    per_run = 3 * ranks * microbatches  # the actions one list-scheduler run places
    spent = 0
    best: tuple[tuple[float, float], Schedule] | None = None

    def consider(schedule: Schedule, key: tuple[float, float] | None = None) -> None:
        nonlocal best
        if key is None:
            timeline = simulate(schedule, costs)
            if max(timeline.peak_memory) > limit + 1e-9:
                return
            key = (max(timeline.span(r) for r in range(ranks)), timeline.makespan)
        if best is None or key < best[0]:
            best = (key, schedule)

    if microbatches >= ranks:
        for make in (zb_h1, zb_h2):
            consider(make(ranks, microbatches))
    consider(one_f_one_b(ranks, microbatches))
    for policy in _policies(ranks, limit):
        if best is not None and spent + per_run > work_budget:
            break
        spent += per_run
        try:
            schedule, key = greedy("zb-auto", one_per_rank(ranks), microbatches, costs, policy)
        except ScheduleError:
            continue
        consider(schedule, key)
    if best is None:
        raise ScheduleError(f"no schedule keeps every rank within memory limit {limit:g}; raise the limit")
    chosen = best[1]
    return Schedule("zb-auto", chosen.num_microbatches, chosen.placement, chosen.actions)


def _policies(ranks: int, limit: float):
    """The heuristic's knob settings, best-first: where the budget cuts the search (large p x m) the winners on the
    benchmark's costs fill every idle moment with a W under the 2(p-r) staircase, so those two go first; then the
    ones that won most often on smaller pipelines."""
    stairs = [tuple(2 * (ranks - r) for r in range(ranks)), tuple(2 * (ranks - r) - 1 for r in range(ranks)),
              None, tuple(ranks - r for r in range(ranks))]
    gap = [Policy(inflight=inflight, memory_limit=limit, b_first=b_first, fill="gap", gap_fraction=fraction)
           for inflight, b_first, fraction in itertools.product(stairs, (True, False), (0.75, 1.0, 0.5))]
    always = [Policy(inflight=inflight, memory_limit=limit, b_first=b_first, fill="always")
              for inflight, b_first in itertools.product(stairs, (True, False))]
    yield from always[:2]
    yield from gap
    yield from always[2:]
    for policy in gap:  # last: run on small pipelines, where the last 0.1% is worth a search
        yield dataclasses.replace(policy, strict_drain=True)
