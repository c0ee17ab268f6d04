"""The exact solver (schedules/exact.py) and the general lower bound (schedules/bound.py) on small pipelines.

Brute force tries every per-rank order (each microbatch's F before its B before its W on a rank) and times it with
`simulate`, so the solver is checked against the definition: the least longest-rank-span over all orders that fit
the memory limit.
"""

from __future__ import annotations

import itertools
import random
import sys

import pytest

from zb.schedules import Costs, ScheduleError, generate, one_per_rank, simulate, v_shape, validate
from zb.schedules.actions import Action, B, F, Schedule, W
from zb.schedules.bound import lower_bound, rank_bounds
from zb.schedules.exact import solve

pytest.importorskip("ortools")

PAPER = dict(f=18.522, b=18.086, w=9.337, comm=0.601)


def span(schedule: Schedule, costs: Costs) -> float:
    timeline = simulate(schedule, costs)
    return max(timeline.span(r) for r in range(schedule.num_ranks))


def random_costs(rng: random.Random, stages: int) -> Costs:
    """Per-stage times in quarters (exact on the solver's integer clock), uneven memory."""
    def times():
        return tuple(rng.randint(1, 12) / 4 for _ in range(stages))

    mem_b = tuple(float(rng.randint(2, 4)) for _ in range(stages))
    return Costs(times(), times(), times(), rng.randint(0, 4) / 4, mem_b, tuple(m / 2 for m in mem_b))


def brute_force(ranks: int, microbatches: int, costs: Costs, limit: float | None) -> float:
    """The least step time over every order of every rank (one stage per rank), within the memory limit."""
    def orders(rank):
        pending = [[Action(rank, kind, mb) for kind in (F, B, W)] for mb in range(microbatches)]

        def extend(prefix, heads):
            if len(prefix) == 3 * microbatches:
                yield tuple(prefix)
            for mb, head in enumerate(heads):
                if head < 3:
                    heads[mb] += 1
                    yield from extend(prefix + [pending[mb][head]], heads)
                    heads[mb] -= 1

        return list(extend([], [0] * microbatches))

    best = float("inf")
    for rows in itertools.product(*(orders(r) for r in range(ranks))):
        schedule = Schedule("brute", microbatches, one_per_rank(ranks), rows)
        try:
            timeline = simulate(schedule, costs)
        except ScheduleError:  # this combination of orders deadlocks
            continue
        if limit is None or max(timeline.peak_memory) <= limit + 1e-9:
            best = min(best, max(timeline.span(r) for r in range(ranks)))
    return best


@pytest.mark.parametrize("ranks, seed, limit", [
    (2, None, None), (2, 3, None), (2, 6, None), (2, 2, 1.25), (3, 10, None), (3, 3, None), (3, 4, 1.5),
])
def test_the_solver_alone_equals_brute_force(ranks, seed, limit):
    """Two microbatches, no warm start (the solver must find and prove the optimum itself); a limit in units of the
    largest M_B: 1.25 lets a rank hold one microbatch's M_B and a pending M_W, not two microbatches."""
    costs = Costs.uniform(ranks, comm=0.5) if seed is None else random_costs(random.Random(seed), ranks)
    numeric = None if limit is None else limit * max(costs.mem_b)
    solution = solve(one_per_rank(ranks), 2, costs, numeric, time_limit=20, warm_start=False)
    validate(solution.schedule)
    assert solution.status == "optimal" and solution.wall_time > 0
    assert solution.value == pytest.approx(brute_force(ranks, 2, costs, numeric))
    assert solution.bound == pytest.approx(solution.value)
    assert solution.value == pytest.approx(span(solution.schedule, costs))


def test_known_optima_with_uniform_costs():
    """F = B = W = 1, no communication, p = 2, m = 4: with 2p of memory nothing idles (zb-h2's bubble is
    (p-1)(F+B-2W) = 0), so the optimum is the work 3m = 12 and equals the bound; at 1p it is zb-h1's 12 + (p-1)(F+B-W)
    = 13, and the limit is what costs the extra unit."""
    costs = Costs.uniform(2)
    roomy = solve(one_per_rank(2), 4, costs, "2p", time_limit=20)
    tight = solve(one_per_rank(2), 4, costs, "1p", time_limit=20)
    assert (roomy.status, roomy.value, lower_bound(one_per_rank(2), 4, costs)) == ("optimal", 12, 12)
    assert (tight.status, tight.value, tight.bound) == ("optimal", 13, 13)
    assert max(simulate(tight.schedule, costs).peak_memory) <= 2
    assert max(simulate(roomy.schedule, costs).peak_memory) > 2  # the roomy optimum needs the memory


@pytest.mark.parametrize("seed", range(4))
def test_bound_below_optimum_below_every_generated_schedule(seed):
    rng = random.Random(100 + seed)
    ranks, microbatches = rng.choice([(2, 3), (2, 4), (3, 3), (3, 4)])
    costs = random_costs(rng, ranks)
    solution = solve(one_per_rank(ranks), microbatches, costs, None, time_limit=20)
    assert solution.status == "optimal"
    assert lower_bound(one_per_rank(ranks), microbatches, costs) <= solution.value + 1e-9
    for name in ("gpipe", "1f1b", "zb-h1", "zb-h2", "zb-auto"):
        if name in ("zb-h1", "zb-h2") and microbatches < ranks:
            continue
        assert solution.value <= span(generate(name, ranks, microbatches, costs), costs) + 1e-9, name


def test_the_memory_limit_is_respected_and_can_cost_time():
    rng = random.Random(7)
    costs = random_costs(rng, 3)
    free = solve(one_per_rank(3), 4, costs, None, time_limit=20)
    for limit in (1.5 * max(costs.mem_b), "1p"):
        tight = solve(one_per_rank(3), 4, costs, limit, time_limit=20)
        numeric = limit if isinstance(limit, float) else 3 * max(costs.mem_b)
        assert max(simulate(tight.schedule, costs).peak_memory) <= numeric + 1e-9
        assert tight.value >= free.value
    assert tight.value > free.value or max(simulate(free.schedule, costs).peak_memory) <= numeric
    with pytest.raises(ScheduleError, match="memory limit .* is below what any schedule needs"):
        solve(one_per_rank(3), 4, costs, 0.9 * max(costs.mem_b), time_limit=20)


def test_v_placement_is_at_least_as_good_as_zb_v():
    costs = Costs.uniform(4, 0.5, 0.5, 0.5, 0.25, 0.5)
    solution = solve(v_shape(2), 3, costs, None, time_limit=20)
    validate(solution.schedule)
    assert solution.schedule.placement == v_shape(2)
    assert rank_bounds(v_shape(2), 3, costs)[0] <= solution.value + 1e-9
    assert solution.value <= span(generate("zb-v", 4, 3), costs) + 1e-9


def test_never_worse_than_zb_auto_within_the_time_limit():
    """With almost no time the solver may prove nothing, and then returns its warm start: zb-auto's schedule."""
    costs = Costs.uniform(4, **PAPER)
    solution = solve(one_per_rank(4), 8, costs, "1p", time_limit=0.05)
    assert solution.status in ("optimal", "feasible")
    assert solution.bound <= solution.value
    assert solution.value <= span(generate("zb-auto", 4, 8, costs, "1p"), costs) + 1e-9
    assert solution.tick == pytest.approx(0.001) and not solution.rounded


def test_the_bound_is_the_paper_bound_in_the_paper_case():
    """p = 8, m = 24 (docs/schedules.md): (p-1)(F+comm) + m(F+B) + (p-1)(B+comm) + W = 1152.599, which zb-auto
    reaches at 2p, so the solver proves it without searching."""
    costs = Costs.uniform(8, **PAPER)
    assert lower_bound(one_per_rank(8), 24, costs) == pytest.approx(1152.599)
    solution = solve(one_per_rank(8), 24, costs, "2p", time_limit=5)
    assert (solution.status, solution.wall_time) == ("optimal", 0.0)
    assert solution.value == pytest.approx(1152.599)


def test_missing_ortools_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ortools.sat.python", None)
    with pytest.raises(ScheduleError, match=r"pip install 'zb\[exact\]'"):
        solve(one_per_rank(2), 2, Costs.uniform(2))
