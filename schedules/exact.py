"""The exact solver: the shortest schedule of a small pipeline, proven, with OR-Tools CP-SAT (`pip install
'zb[exact]'`).

`solve(placement, microbatches, costs, memory_limit)` returns a `Solution`: a schedule that validates, its step
time (`value`: the longest rank span, first start to last end on a rank, as `simulate` times it: the cost zb-auto
minimises and the paper's bubble rate divides by), the solver's `status` ("optimal": no schedule of this placement
within the memory limit is shorter; "feasible": the best found within `time_limit`) and `bound`, a proven lower
bound on every schedule's step time (the solver's, or bound.py's if that is higher).

The model (per-stage costs, one F, B and W per stage and microbatch, B and W split)
-----------------------------------------------------------------------------------
* Integer time. Every cost is divided by `tick` and must then be a whole number: by default the largest tick that
  divides all of F, B, W and comm (F=18.522, comm=0.601 -> 0.001; F=B=W=1 -> 1). Costs with more than six
  decimals are rounded to 1e-6 (`Solution.rounded` says so; the proof is then for the rounded costs).
* Order. Per rank, a successor circuit (`add_circuit`) through the rank's actions and a dummy node: literal
  (a -> b) says b runs right after a. Only an F can come first and only a W last when the rank holds them; an arc
  that would put an action before its own dependency is left out. A redundant `add_no_overlap` per rank helps.
* Timing as zb runs it. A schedule is its per-rank order, and ranks run it as soon as possible (`simulate`), so
  start(a) = max(end of a's predecessor on the rank (0 for the first), end(d) + comm for each dependency d, comm
  only across ranks), an equality (`add_max_equality`). The solver therefore times every order exactly as
  `simulate` does, and its optimum is the best step time over all orders (with free start times it could delay
  a rank's first action, which no zb schedule can express).
* Memory. Per rank a running sum (`add_reservoir_constraint` at the actions' start times, distinct on a rank as
  every action takes time): F adds M_B, B releases M_B - M_W, W releases M_W, and the level must stay within the
  limit (as in `simulate.peak_memory` and zb-auto: "2p" is 2 x ranks x the largest M_B). Memory values are
  integers on their own tick. A limit no order can reach is left out.
* Symmetry. Microbatches are interchangeable, so stage 0 runs its forwards in microbatch order.
* Objective: the step time, T >= last end - first start on every rank, and T >= bound.py's bound (a proven
  bound, so hitting it ends the search).
* Warm start. Every schedule `generate` offers for this placement that fits the limit (zb-auto among them) and
  the caller's `hint` are timed; the best is given to the solver as a full hint, and returned (status
  "feasible") if the solver finds nothing better in time. So the result is never worse than zb-auto's. If the
  warm start already meets bound.py's bound it is optimal, and the solver does not run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from zb.schedules.actions import BW, Action, B, F, Schedule, ScheduleError, W
from zb.schedules.bound import lower_bound, rank_bounds
from zb.schedules.catalog import SCHEDULES, generate
from zb.schedules.auto import resolve_memory_limit
from zb.schedules.costs import Costs
from zb.schedules.lower import validate
from zb.schedules.simulate import dependencies, simulate

DEFAULT_LIMIT = "2p"  # as zb-auto's
MAX_DECIMALS = 6


@dataclass(frozen=True)
class Solution:
    """The exact solver's schedule with its step time, its proven lower bound and whether it is optimal."""
    schedule: Schedule
    status: str  # "optimal" (proven) or "feasible" (the best found within the time limit)
    value: float  # step time of `schedule` (longest rank span under `simulate`)
    bound: float  # no schedule of this placement within the memory limit has a shorter step time
    tick: float  # the solver's time unit, in the units of the costs
    rounded: bool  # the costs were rounded to the tick (the proof holds for the rounded costs)
    wall_time: float  # seconds the solver ran

    @property
    def gap(self) -> float:
        """(value - bound) / bound: 0 when proven optimal."""
        return (self.value - self.bound) / self.bound if self.bound else 0.0


def solve(placement: tuple[int, ...], microbatches: int, costs: Costs, memory_limit: str | float | None = DEFAULT_LIMIT,
          time_limit: float = 10.0, hint: Schedule | None = None, workers: int | None = None,
          warm_start: bool = True) -> Solution:
    """The shortest schedule of `microbatches` microbatches on `placement` (placement[stage] = rank) under the
    per-rank memory limit ('1p', '2p', a number in the units of M_B, or None for no limit), searched for at most
    `time_limit` seconds on `workers` threads (CP-SAT's default: all cores). `warm_start=False` leaves out the
    generated schedules (the solver alone; `hint` still counts). Raises ScheduleError when no schedule fits the
    limit, or ortools is missing."""
    try:
        from ortools.sat.python import cp_model
    except ImportError:
        raise ScheduleError("the exact solver needs OR-Tools: pip install 'zb[exact]'") from None
    placement = tuple(placement)
    n, ranks = len(placement), max(placement) + 1
    if costs.num_stages != n:
        raise ScheduleError(f"costs are for {costs.num_stages} stages, the placement has {n}")
    if microbatches < 1 or set(placement) != set(range(ranks)):
        raise ScheduleError("the exact solver needs microbatches >= 1 and every rank 0..R-1 holding a stage")
    limit = resolve_memory_limit(memory_limit, costs, ranks, n // ranks)
    tick, rounded = _tick(costs.f + costs.b + costs.w + (costs.comm,))
    ticks = _in_ticks(costs, tick)
    if min(ticks.f + ticks.b + ticks.w) < 1:
        raise ScheduleError("the exact solver needs every F, B and W to take time (a cost of 0 was given)")
    start_schedule = _warm_start(placement, microbatches, costs, memory_limit, limit, hint, warm_start)
    bound = lower_bound(placement, microbatches, costs)
    if start_schedule is not None and _value(start_schedule, costs) <= bound + 1e-9:  # nothing can be shorter
        return Solution(start_schedule, "optimal", _value(start_schedule, costs), bound, tick, rounded, 0.0)

    model = _Model(cp_model.CpModel(), placement, microbatches, ticks, costs, limit)
    if start_schedule is not None:
        model.hint(start_schedule)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit
    # Measured on the benchmark grid: probing spent the whole budget in presolve at p = 6, m = 18, and the stronger
    # linear relaxation proves the paper-like cases sooner.
    solver.parameters.cp_model_probing_level = 0
    solver.parameters.linearization_level = 2
    if workers:
        solver.parameters.num_workers = workers
    began = time.perf_counter()
    code = solver.solve(model.model)
    wall = time.perf_counter() - began
    if code == cp_model.INFEASIBLE:
        raise ScheduleError(f"no schedule keeps every rank within memory limit {limit:g}; raise the limit")
    if code not in (cp_model.OPTIMAL, cp_model.FEASIBLE) and start_schedule is None:
        raise ScheduleError(f"the exact solver found no schedule within {time_limit:g} s; raise the time limit")
    best, status = start_schedule, "feasible"
    if code in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        found = model.schedule(solver)
        validate(found)
        fits = limit is None or max(simulate(found, costs).peak_memory) <= limit + 1e-9  # memory tick rounding
        if fits and (best is None or _value(found, costs) <= _value(best, costs) + 1e-9):
            best, status = found, ("optimal" if code == cp_model.OPTIMAL else "feasible")
    value = _value(best, costs)
    if not rounded:  # the model is exact: the solver's bound holds for these costs
        bound = max(bound, solver.best_objective_bound * tick)
    return Solution(best, status, value, min(bound, value), tick, rounded, wall)


class _Model:
    """The CP-SAT model of the module docstring, in ticks: start times, per-rank successor circuits, as-soon-as-
    possible timing, memory reservoirs and the step-time objective."""

    def __init__(self, model, placement, microbatches, ticks: Costs, costs: Costs, limit: float | None):
        self.model, self.placement, self.microbatches, self.ticks = model, placement, microbatches, ticks
        n, m, ranks = len(placement), microbatches, max(placement) + 1
        actions = [Action(s, k, mb) for s in range(n) for k in (F, B, W) for mb in range(m)]
        self.on_rank = [[a for a in actions if placement[a.stage] == r] for r in range(ranks)]
        horizon = int(sum(self.duration(a) for a in actions) + ticks.comm * len(actions))
        self.start = {a: model.new_int_var(0, horizon, f"start_{a}") for a in actions}
        self.arcs, self.rank_free = {}, {}
        before = _same_rank_ancestors(placement)
        for acts in self.on_rank:
            self._order(acts, before, horizon)
            if limit is not None:
                capacity, levels = _memory_ticks(costs, acts, limit)
                if levels is not None:
                    model.add_reservoir_constraint([self.start[a] for a in acts], [levels[a] for a in acts], 0,
                                                   capacity)
        for mb in range(1, m):  # symmetry: microbatches are interchangeable
            model.add(self.start[Action(0, F, mb)] >= self.end(Action(0, F, mb - 1)))
        self.step = model.new_int_var(0, horizon, "step_time")
        self.spans = []
        for acts, least in zip(self.on_rank, rank_bounds(placement, m, ticks)):
            first, last = model.new_int_var(0, horizon, "first"), model.new_int_var(0, horizon, "last")
            model.add_min_equality(first, [self.start[a] for a in acts if (None, a) in self.arcs])
            model.add_max_equality(last, [self.end(a) for a in acts if (a, None) in self.arcs])
            model.add(last - first >= math.ceil(least - 1e-6))
            model.add(self.step >= last - first)
            self.spans.append((first, last))
        model.minimize(self.step)

    def duration(self, a: Action) -> int:
        return int(self.ticks.duration(a.stage, a.kind))

    def end(self, a: Action):
        return self.start[a] + self.duration(a)

    def arrival(self, d: Action, a: Action):
        return self.end(d) + (int(self.ticks.comm) if self.placement[d.stage] != self.placement[a.stage] else 0)

    def _order(self, acts: list[Action], before, horizon: int) -> None:
        """One rank: the successor circuit, no overlap, and each start as soon as the rank and the inputs allow."""
        model, n = self.model, len(self.placement)
        rank = self.placement[acts[0].stage]
        last_types = {x for x in before if self.placement[x[0]] == rank
                      and not any(x in before[y] for y in before if self.placement[y[0]] == rank)}
        index = {a: i + 1 for i, a in enumerate(acts)}
        circuit, previous = [], {a: [] for a in acts}
        for a in acts:
            if not before[a.stage, a.kind] and not (a.stage == 0 and a.microbatch > 0):
                self.arcs[None, a] = lit = model.new_bool_var(f"first_{a}")
                circuit.append((0, index[a], lit))
                previous[a].append((lit, 0))
            if (a.stage, a.kind) in last_types:
                self.arcs[a, None] = lit = model.new_bool_var(f"last_{a}")
                circuit.append((index[a], 0, lit))
            for b in acts:
                if b != a and _may_follow(a, b, before):
                    self.arcs[a, b] = lit = model.new_bool_var(f"{a}_then_{b}")
                    circuit.append((index[a], index[b], lit))
                    previous[b].append((lit, self.end(a)))
        model.add_circuit(circuit)
        model.add_no_overlap([model.new_fixed_size_interval_var(self.start[a], self.duration(a), f"run_{a}")
                              for a in acts])
        for a in acts:
            self.rank_free[a] = free = model.new_int_var(0, horizon, f"free_before_{a}")
            for lit, value in previous[a]:
                model.add(free == value).only_enforce_if(lit)
            deps = dependencies(a, n, True)
            for d in deps:
                model.add(self.start[a] >= self.arrival(d, a))
            model.add_max_equality(self.start[a], [free] + [self.arrival(d, a) for d in deps])

    def hint(self, schedule: Schedule) -> None:
        """Every variable's value in `schedule` (split, stage 0's forwards in order), timed in ticks."""
        timeline = simulate(schedule, self.ticks)
        for a, t in timeline.start.items():
            self.model.add_hint(self.start[a], int(t))
        chosen = set()
        for acts in schedule.actions:
            chosen |= {(None, acts[0]), (acts[-1], None)} | set(zip(acts, acts[1:]))
            self.model.add_hint(self.rank_free[acts[0]], 0)
            for a, b in zip(acts, acts[1:]):
                self.model.add_hint(self.rank_free[b], int(timeline.end[a]))
        for key, lit in self.arcs.items():
            self.model.add_hint(lit, key in chosen)
        for acts, (first, last) in zip(schedule.actions, self.spans):
            self.model.add_hint(first, int(timeline.start[acts[0]]))
            self.model.add_hint(last, int(timeline.end[acts[-1]]))
        self.model.add_hint(self.step, int(max(timeline.span(r) for r in range(schedule.num_ranks))))

    def schedule(self, solver) -> Schedule:
        orders = [tuple(sorted(acts, key=lambda a: solver.value(self.start[a]))) for acts in self.on_rank]
        return Schedule("exact", self.microbatches, self.placement, tuple(orders))


def _value(schedule: Schedule, costs: Costs) -> float:
    timeline = simulate(schedule, costs)
    return max(timeline.span(r) for r in range(schedule.num_ranks))


def _tick(values: tuple[float, ...]) -> tuple[float, bool]:
    """The largest time unit that makes every value a whole number (at most MAX_DECIMALS decimals), and whether the
    values had to be rounded to it."""
    for decimals in range(MAX_DECIMALS + 1):
        scale = 10 ** decimals
        if all(abs(v * scale - round(v * scale)) <= 1e-9 * max(1.0, v * scale) for v in values):
            break
    whole = [round(v * scale) for v in values]
    rounded = any(abs(v * scale - w) > 1e-9 * max(1.0, v * scale) for v, w in zip(values, whole))
    divisor = math.gcd(*whole) or 1
    return divisor / scale, rounded


def _in_ticks(costs: Costs, tick: float) -> Costs:
    def whole(values):
        return tuple(float(round(v / tick)) for v in values)

    return Costs(whole(costs.f), whole(costs.b), whole(costs.w), float(round(costs.comm / tick)), costs.mem_b,
                 costs.mem_w)


def _memory_ticks(costs: Costs, acts: list[Action], limit: float) -> tuple[int, dict[Action, int] | None]:
    """The limit and each action's memory change in integer units; no changes (None) if the limit cannot bind."""
    unit, _ = _tick(tuple(costs.mem_b) + tuple(costs.mem_w))
    levels = {a: round(costs.memory_delta(a.stage, a.kind) / unit) for a in acts}
    if sum(v for v in levels.values() if v > 0) * unit <= limit + 1e-9:
        return 0, None
    return math.floor(limit / unit + 1e-6), levels


def _same_rank_ancestors(placement: tuple[int, ...]) -> dict[tuple[int, str], set[tuple[int, str]]]:
    """For each action type (stage, kind), the types of the same microbatch on the same rank that must run
    before it."""
    n = len(placement)
    order = [(s, F) for s in range(n)] + [(s, B) for s in reversed(range(n))] + [(s, W) for s in range(n)]
    ancestors: dict[tuple[int, str], set[tuple[int, str]]] = {}
    for x in order:
        ancestors[x] = set()
        for d in dependencies(Action(*x, 0), n, True):
            ancestors[x] |= ancestors[d.stage, d.kind] | {(d.stage, d.kind)}
    return {x: {y for y in anc if placement[y[0]] == placement[x[0]]} for x, anc in ancestors.items()}


def _may_follow(a: Action, b: Action, before) -> bool:
    """Whether b may run right after a on their rank."""
    if a.microbatch == b.microbatch and (b.stage, b.kind) in before[a.stage, a.kind]:
        return False
    if a.stage == b.stage == 0 and a.kind == b.kind == F:  # stage 0's forwards in microbatch order
        return b.microbatch == a.microbatch + 1
    return True


def _warm_start(placement, m, costs, memory_limit, limit, hint, generated: bool) -> Schedule | None:
    """The shortest of `hint` and (if `generated`) the schedules `generate` offers for this placement that fit the
    limit, with B and W split and stage 0's forwards in microbatch order (None if none fits)."""
    ranks, n = max(placement) + 1, len(placement)
    candidates = [hint] if hint is not None else []
    for name in SCHEDULES if generated else ():
        try:
            candidates.append(generate(name, n, m, costs, memory_limit if name == "zb-auto" else None, n // ranks,
                                       placement=placement if name == "zb-auto" else None))
        except ScheduleError:
            continue
    best = None
    for schedule in candidates:
        if schedule.placement != placement:
            continue
        schedule = _relabelled(_split(schedule))
        timeline = simulate(schedule, costs)
        if limit is not None and max(timeline.peak_memory) > limit + 1e-9:
            continue
        value = max(timeline.span(r) for r in range(ranks))
        if best is None or value < best[0] - 1e-9:
            best = (value, schedule)
    return None if best is None else best[1]


def _split(schedule: Schedule) -> Schedule:
    """Each BW as its B then its W (the same timing and memory)."""
    rows = tuple(tuple(x for a in acts for x in ((Action(a.stage, B, a.microbatch), Action(a.stage, W, a.microbatch))
                                               if a.kind == BW else (a,))) for acts in schedule.actions)
    return Schedule(schedule.name, schedule.num_microbatches, schedule.placement, rows)


def _relabelled(schedule: Schedule) -> Schedule:
    """The same schedule with microbatches renamed in the order stage 0 runs their forwards."""
    rank = schedule.placement[0]
    firsts = [a.microbatch for a in schedule.actions[rank] if a.stage == 0 and a.kind == F]
    name = {old: new for new, old in enumerate(firsts)}
    rows = tuple(tuple(Action(a.stage, a.kind, name[a.microbatch]) for a in acts) for acts in schedule.actions)
    return Schedule(schedule.name, schedule.num_microbatches, schedule.placement, rows)
