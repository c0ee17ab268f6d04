"""zb-auto: the shortest schedule under a per-rank memory limit, for the given per-stage costs, over the placements
zb runs.

"Shortest" is the longest rank span (first start to last end on a rank): the time one training step takes in
steady state, the paper's cost. Within a placement the makespan breaks ties, then the order candidates are tried
in; between placements a tie keeps the first in PLACEMENTS (one stage per rank has the fewest transfers). Entry
points:

    choose_placement(ranks, microbatches, costs, memory_limit) -> Decision(chunks, placement, reason, schedule)
    zb_auto(ranks, microbatches, costs, memory_limit, placement=None) -> Schedule
    replan(schedule, costs, memory_limit) -> Schedule  # zb_auto for the same ranks and placement as `schedule`
    resolve_memory_limit(memory_limit, costs, ranks, chunks=1) -> float  # what '1p', '2p' mean (below)

`choose_placement` takes costs for one stage per rank (the model cut into `ranks` pieces) and decides how to cut
and place it (PLACEMENTS): one stage per rank; or 2 x ranks stages, each half of a one-per-rank stage
(`Costs.split(2)`: F, B, W and memory halved, a transfer as long), in a V (rank r holds stages r and 2p-1-r) or
interleaved (r and p+r). `zb_auto` plans one placement for costs of its stages (re-planning with measured costs
keeps the stages and where they live): one stage per rank when the costs cover `ranks` stages; with 2 x ranks
stages, the placement given (a name or the stage-to-rank tuple), else the faster of V and interleaved.

The memory limit is per rank: '1p' is p times one microbatch's activations of a one-per-rank stage, the largest
(for 2 x ranks stages, of two neighbouring stages together), so it is the same number of bytes for every placement;
a plain number is in the units of `costs.mem_b`.

Candidates of a placement, all timed by the simulator with the same costs; a candidate counts if its peak memory
fits the limit:
  * every fixed schedule zb offers for the placement: gpipe, 1f1b, zb-h1, zb-h2 (one stage per rank), zb-v,
    v-half, v-min (V), interleaved-1f1b (interleaved), and the published heuristic (heuristic.py, one stage per
    rank). So zb-auto is never slower than any of them under the same costs and limit;
  * the list scheduler (greedy.py) under the memory limit over its knobs: a warm-up staircase (rank r holds at
    most k(p-r) microbatches, or no cap but memory), a ready B before a ready F or not, how eagerly a W fills an
    idle gap, and whether a W may delay the last microbatch's chain of backwards (`strict_drain`: it may not; that
    chain ends the first rank's step, so with it the schedule can reach the span's lower bound).

The fixed schedules and the heuristic always run (a fixed multiple of stages x microbatches actions), except in a
placement whose busiest rank's work alone is no shorter than the best step time found: no schedule there can be
shorter, so nothing of it is tried. The list scheduler's candidates then run best-first within a budget of work,
not of time, so that the plan depends only on the inputs (every rank plans the same schedule, on any machine): a
run places 3 x stages x microbatches actions, and runs go on while the actions placed stay within WORK_BUDGET;
placements take turns, the one with the best schedule so far first. bench/schedules.py measures the planning time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import itertools
from typing import NamedTuple

from zb.schedules.actions import Schedule, ScheduleError, looped, one_per_rank, v_shape
from zb.schedules.costs import Costs, parse_memory_limit
from zb.schedules.generators import gpipe, interleaved_1f1b, one_f_one_b, v_half, v_min, zb_h1, zb_h2, zb_v
from zb.schedules.greedy import Policy, greedy
from zb.schedules.heuristic import zb_heuristic
from zb.schedules.simulate import peak_memory, span_key

DEFAULT_LIMIT = "2p"
PLACEMENTS = {"one-per-rank": 1, "v": 2, "interleaved": 2}  # name -> stages per rank
# Actions the list scheduler may place over all the candidate policies it tries, on all placements. A run places
# 3 x stages x m actions: p = 8, m = 24 runs all 56 + 6 + 6 candidates (46,080 actions); p = 32, m = 256 one (24,576
# actions with one stage per rank, 49,152 with two): there the fixed schedules and the heuristic take most of the
# second planning may spend (bench/schedules.py).
WORK_BUDGET = 50_000


class Decision(NamedTuple):
    """zb-auto's choice of placement: stages per rank, the placement, why, and its schedule."""
    chunks: int  # stages per rank
    placement: str  # a key of PLACEMENTS
    reason: str  # one line: the winner's span and candidate, and what the other placements reached
    schedule: Schedule  # zb-auto's schedule for the winning placement (chunks x ranks stages)


def placement_of(name: str, ranks: int) -> tuple[int, ...]:
    """The stage-to-rank tuple of a placement."""
    if name == "one-per-rank":
        return one_per_rank(ranks)
    if name == "v":
        return v_shape(ranks)
    if name == "interleaved":
        return looped(ranks, 2)
    raise ScheduleError(f"unknown placement {name!r}; choose one of {', '.join(PLACEMENTS)}")


def choose_placement(ranks: int, microbatches: int, costs: Costs, memory_limit: str | float | None = None,
                     work_budget: int = WORK_BUDGET) -> Decision:
    """The fastest placement and its schedule, for `costs` of one stage per rank (module docstring)."""
    if costs.num_stages != ranks:
        raise ScheduleError(f"choose_placement takes costs of one stage per rank: {costs.num_stages} stages for "
                            f"{ranks} ranks")
    limit = resolve_memory_limit(memory_limit, costs, ranks)
    searches = [_Search(name, ranks, microbatches, costs if chunks == 1 else costs.split(chunks), limit)
                for name, chunks in PLACEMENTS.items()]
    with _without_cyclic_gc():
        winner = _search(searches, work_budget, limit)
    others = "; ".join(s.summary() for s in searches if s is not winner)
    reason = (f"{winner.name} is fastest within {_limit_text(memory_limit, limit)} per rank: "
              f"{winner.summary()}; {others}")
    return Decision(PLACEMENTS[winner.name], winner.name, reason, winner.schedule())


def zb_auto(ranks: int, microbatches: int, costs: Costs, memory_limit: str | float | None = None,
            work_budget: int = WORK_BUDGET, placement: str | tuple[int, ...] | None = None) -> Schedule:
    """zb-auto for one placement, for costs of its stages (module docstring)."""
    chunks, rem = divmod(costs.num_stages, ranks)
    if rem or chunks not in (1, 2):
        raise ScheduleError(f"zb-auto places one or two stages per rank: costs cover {costs.num_stages} stages for "
                            f"{ranks} ranks")
    names = [name for name, c in PLACEMENTS.items() if c == chunks]
    if placement is not None:
        names = [n for n in names if placement in (n, placement_of(n, ranks))]
        if not names:
            raise ScheduleError(f"zb-auto has no placement {placement!r} for {costs.num_stages} stages on {ranks} "
                                f"ranks")
    limit = resolve_memory_limit(memory_limit, costs, ranks, chunks)
    searches = [_Search(name, ranks, microbatches, costs, limit) for name in names]
    with _without_cyclic_gc():
        return _search(searches, work_budget, limit).schedule()


def replan(schedule: Schedule, costs: Costs, memory_limit: str | float | None = None) -> Schedule:
    """zb-auto again for new (measured) costs of `schedule`'s stages, on the same ranks and placement: what a
    running pipeline re-plans with (its stages are cut and placed)."""
    return zb_auto(schedule.num_ranks, schedule.num_microbatches, costs, memory_limit, placement=schedule.placement)


def resolve_memory_limit(memory_limit: str | float | None, costs: Costs, ranks: int, chunks: int = 1) -> float:
    """zb-auto's per-rank limit in the units of costs.mem_b (None: DEFAULT_LIMIT). 'kp' is k x ranks x the M_B of
    the largest one-per-rank stage: with `chunks` stages per rank, of `chunks` neighbouring stages together, so
    that '1p' is the same number of bytes for every placement of the same model."""
    whole = max(sum(costs.mem_b[i:i + chunks]) for i in range(0, costs.num_stages, chunks))
    limit = parse_memory_limit(DEFAULT_LIMIT if memory_limit is None else memory_limit, whole, ranks)
    if limit + 1e-9 < max(costs.mem_b):
        raise ScheduleError(
            f"memory limit {limit:g} is below what any schedule needs: one microbatch in flight on a stage takes "
            f"{max(costs.mem_b):g} (M_B); give at least that (for example '1p' = {ranks * whole:g})"
        )
    return limit


def _limit_text(memory_limit: str | float | None, limit: float) -> str:
    given = DEFAULT_LIMIT if memory_limit is None else memory_limit
    return f"{given} = {limit:g}" if isinstance(given, str) and given.strip().endswith("p") else f"{limit:g}"


@contextlib.contextmanager
def _without_cyclic_gc():
    """Planning allocates about a million small tuples and lists and no reference cycles: Python's cyclic
    collector would walk them again and again (a fifth of the time at p = 32, m = 256) and free nothing."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _search(searches: list[_Search], work_budget: int, limit: float) -> _Search:
    """Runs every placement's fixed candidates, then the list scheduler's within the budget; the best search.
    A placement whose busiest rank's work alone is no shorter than the best step time so far cannot win (a tie
    keeps the earlier placement): its remaining candidates are skipped, and cost no budget."""

    def shortest() -> float:
        return min((s.best[0][0] for s in searches if s.best is not None), default=float("inf"))

    for search in searches:
        search.fixed(shortest)
    order = sorted((s for s in searches if s.best is not None), key=lambda s: s.best[0])
    order += [s for s in searches if s.best is None]
    spent = 0
    turns = itertools.zip_longest(*(s.runs() for s in order))
    for search, work, run in (r for turn in turns for r in turn if r is not None):
        if search.hopeless(shortest()):
            continue
        if spent + work > work_budget:
            break
        spent += work
        run()
    fitting = [s for s in searches if s.best is not None]
    if not fitting:
        raise ScheduleError(f"no schedule keeps every rank within memory limit {limit:g}; raise the limit")
    winner = fitting[0]
    for search in fitting[1:]:  # the step time decides; on a tie the earlier placement (fewer transfers) stays
        if search.best[0][0] < winner.best[0][0] - 1e-9 * winner.best[0][0]:
            winner = search
    return winner


class _Search:
    """One placement's candidates and the best of them so far."""

    def __init__(self, name: str, ranks: int, microbatches: int, costs: Costs, limit: float):
        self.name, self.ranks, self.microbatches, self.costs, self.limit = name, ranks, microbatches, costs, limit
        self.placement = placement_of(name, ranks)
        self.best: tuple[tuple[float, float], Schedule, str] | None = None
        # No schedule of this placement is shorter than its busiest rank's work.
        work = [0.0] * ranks
        for stage, rank in enumerate(self.placement):
            work[rank] += microbatches * (costs.f[stage] + costs.b[stage] + costs.w[stage])
        self.floor = max(work)
        self.pruned = False

    def hopeless(self, shortest: float) -> bool:
        """Whether no candidate of this placement can be shorter than `shortest` (then it is left unsearched)."""
        if shortest <= self.floor * (1 + 1e-9):
            self.pruned = True
        return self.pruned

    def consider(self, schedule: Schedule, label: str, key: tuple[float, float] | None = None) -> None:
        if key is None:
            if max(peak_memory(schedule, self.costs)) > self.limit + 1e-9:
                return
            key = span_key(schedule, self.costs, None if self.best is None else self.best[0][0])
            if key is None:  # timing stopped: a rank already took longer than this placement's best
                return
        if self.best is None or key < self.best[0]:
            self.best = (key, schedule, label)

    def fixed(self, shortest) -> None:
        """The fixed schedules and (one stage per rank) the heuristic, while this placement can still win against
        `shortest()`, the best step time found so far."""
        p, m = self.ranks, self.microbatches
        for name in _FIXED[self.name]:
            if self.hopeless(shortest()):
                return
            try:
                schedule = _fixed_schedule(name, p, m)
            except ScheduleError:  # e.g. zb-v with m < p, interleaved-1f1b with m not a multiple of p
                continue
            self.consider(schedule, name)
        if self.name == "one-per-rank" and not self.hopeless(shortest()):
            try:
                self.consider(zb_heuristic(p, m, self.costs, self.limit), "the published heuristic")
            except ScheduleError:
                pass

    def runs(self):
        """The list scheduler's candidates, best-first, as (this search, actions it places, call) for `_search`."""
        work = 3 * len(self.placement) * self.microbatches
        for policy in _policies(self.name, self.ranks, self.limit):
            yield self, work, functools.partial(self._greedy, policy)

    def _greedy(self, policy: Policy) -> None:
        try:
            schedule, _ = greedy("zb-auto", self.placement, self.microbatches, self.costs, policy)
        except ScheduleError:
            return
        # Timed by the simulator like every other candidate: the list scheduler's own timeline can hold idle time
        # that running its order as soon as possible does not (found by tests/test_auto.py's property test: p=4,
        # m=2, the interleaved placement's 12.2 by the scheduler's clock ran in 12.05, so another placement won).
        self.consider(schedule, "the list scheduler")

    def schedule(self) -> Schedule:
        chosen = self.best[1]
        return Schedule("zb-auto", chosen.num_microbatches, chosen.placement, chosen.actions)

    def summary(self) -> str:
        if self.best is None and self.pruned:
            return f"{self.name}: cannot be shorter (its busiest rank's work alone takes {self.floor:.6g})"
        if self.best is None:
            return f"{self.name}: nothing fits"
        (span, _), _, label = self.best
        return f"{self.name} {span:.6g} ({label})"


_FIXED = {"one-per-rank": ("zb-h1", "zb-h2", "1f1b", "gpipe"), "v": ("zb-v", "v-half", "v-min"),
          "interleaved": ("interleaved-1f1b",)}


@functools.lru_cache(maxsize=64)
def _fixed_schedule(name: str, ranks: int, microbatches: int) -> Schedule:
    """A fixed schedule as `generate` makes it (the same for any costs: kept for re-planning)."""
    make = {"gpipe": gpipe, "1f1b": one_f_one_b, "zb-h1": zb_h1, "zb-h2": zb_h2, "zb-v": zb_v, "v-half": v_half,
            "v-min": v_min, "interleaved-1f1b": lambda p, m: interleaved_1f1b(p, m, 2)}[name]
    return make(ranks, microbatches)


def _policies(placement: str, ranks: int, limit: float):
    """The list scheduler's knob settings, best-first. One stage per rank: where the budget cuts the search (large
    p x m) the winners on the benchmark's costs fill every idle moment with a W under the 2(p-r) staircase, so those
    two go first; then the ones that won most often on smaller pipelines. Two stages per rank: memory alone
    bounds the warm-up (a staircase of in-flight caps won nowhere on the benchmark's and random costs)."""
    if placement != "one-per-rank":
        # (B first, fill): F first and every gap filled won most on the V, B first on the interleaved placement
        for b_first, fill in ((False, "always"), (True, "gap"), (True, "always"), (False, "gap")):
            yield Policy(memory_limit=limit, b_first=b_first, fill=fill)
        for b_first in (True, False):
            yield Policy(memory_limit=limit, b_first=b_first, fill="gap", strict_drain=True)
        return
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
