"""zb-auto over placements, the published heuristic, V-Half and V-Min, re-planning, and the compiler's decision.

The property test is the promise: for any per-stage costs and memory limit, zb-auto's step time (longest rank
span) is at most that of every fixed schedule zb offers, on every placement, that fits the same limit.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zb.schedules import (
    PLACEMENTS, Costs, ScheduleError, choose_placement, default_chunks, generate, one_per_rank, peak_memory,
    placement_of, replan, resolve_memory_limit, simulate, span_key, v_half, v_min, validate, zb_auto, zb_heuristic,
)
from zb.schedules import auto, heuristic

PAPER = dict(f=18.522, b=18.086, w=9.337, comm=0.601)  # 1.5B model, p=8, m=24 (A100 profile)
FIXED = {"one-per-rank": ("gpipe", "1f1b", "zb-h1", "zb-h2"), "v": ("zb-v", "v-half", "v-min"),
         "interleaved": ("interleaved-1f1b",)}


def span(schedule, costs) -> float:
    return span_key(schedule, costs)[0]


def stage_costs(costs: Costs, chunks: int) -> Costs:
    return costs if chunks == 1 else costs.split(chunks)


# The published heuristic


@pytest.mark.parametrize("limit, paper", [("1p", 0.1585), ("2p", 0.0433)])
def test_heuristic_reproduces_the_papers_zb_1p_and_zb_2p(limit, paper):
    costs = Costs.uniform(8, **PAPER)
    schedule = zb_heuristic(8, 24, costs, limit)
    validate(schedule)
    timeline = simulate(schedule, costs)
    assert round(timeline.bubble_rate, 4) == paper
    assert max(timeline.peak_memory) <= int(limit[0]) * 8 + 1e-9


@pytest.mark.parametrize("p", [2, 4, 8])
def test_heuristic_at_2p_with_uniform_costs_has_zb_h2s_bubble(p):
    costs = Costs.uniform(p)
    for m in (2 * p, 3 * p):
        assert span(zb_heuristic(p, m, costs, "2p"), costs) == pytest.approx(span(generate("zb-h2", p, m), costs))


@settings(max_examples=30, deadline=None)
@given(p=st.integers(2, 5), m=st.integers(1, 12), data=st.data(), limit=st.sampled_from(["1p", "2p", "3p", None]))
def test_heuristic_is_valid_within_its_limit_and_keeps_the_best_flag_setting(p, m, data, limit):
    values = st.sampled_from([0.5, 1.0, 2.0, 3.0])
    costs = Costs(tuple(data.draw(values) for _ in range(p)), tuple(data.draw(values) for _ in range(p)),
                  tuple(data.draw(values) for _ in range(p)), data.draw(st.sampled_from([0.0, 0.3])))
    try:
        schedule = zb_heuristic(p, m, costs, limit)
    except ScheduleError as e:
        assert "finds no schedule" in str(e)
        return
    validate(schedule)
    if limit is not None:
        assert max(peak_memory(schedule, costs)) <= resolve_memory_limit(limit, costs, p) + 1e-9
    # every flag setting run in full (no de-duplication), timed by the simulator: the heuristic kept the best
    spans = []
    for allow, prioritize, greedy in heuristic.FLAGS:
        rounds = heuristic._Rounds(p, m, costs, None if limit is None else resolve_memory_limit(limit, costs, p))
        try:
            rounds.warm_up(allow)
            own = rounds.run(prioritize, greedy)
        except heuristic._DoesNotFit:
            continue
        candidate = type(schedule)("x", m, one_per_rank(p), tuple(map(tuple, rounds.orders())))
        try:
            spans.append(span(candidate, costs))
        except ScheduleError:  # the paper's warm-up can give a rank more forwards than the one before it
            assert own is None
            continue
        if own is not None:  # its own times are the simulator's
            assert own == pytest.approx(spans[-1])
    assert span(schedule, costs) == pytest.approx(min(spans))


# V-Half and V-Min


@pytest.mark.parametrize("p", range(2, 17))
def test_v_half_and_v_min_memory_bounds(p):
    """In M_B of a whole rank's layers (each of the 2p stages holds half of one-per-rank stage's activations):
    V-Half at most (p+2)/2, V-Min at most (p+4)/3; 1F1B holds p."""
    costs = Costs.uniform(2 * p, 0.5, 0.5, 0.5, mem_b=0.5)
    for make, bound in ((v_half, (p + 2) / 2), (v_min, (p + 4) / 3)):
        schedule = make(p, 4 * p)
        validate(schedule)
        assert max(simulate(schedule, costs).peak_memory) <= bound + 1e-9, make.__name__


@pytest.mark.parametrize("p", [4, 8, 16])
def test_v_half_and_v_min_bubbles_against_1f1b(p):
    """With F = B = W the paper gives bubble rates of about p/2m (V-Half) and 2p/3m (V-Min), against 1F1B's
    (p-1)/(m+p-1): about half and two thirds of it."""
    m = 8 * p
    full, half = Costs.uniform(p), Costs.uniform(2 * p, 0.5, 0.5, 0.5, mem_b=0.5)
    one_f_one_b = simulate(generate("1f1b", p, m), full).bubble_rate
    rate_half = simulate(generate("v-half", 2 * p, m), half).bubble_rate
    rate_min = simulate(generate("v-min", 2 * p, m), half).bubble_rate
    assert rate_half <= p / (2 * m) + 0.01 and rate_half < 0.7 * one_f_one_b
    assert rate_min <= 2 * p / (3 * m) and rate_min < 0.75 * one_f_one_b


def test_v_half_and_v_min_need_two_stages_per_rank():
    with pytest.raises(ScheduleError, match="v-half places exactly 2 stages per rank"):
        generate("v-half", 6, 8, chunks=3)
    assert default_chunks("v-min") == 2 and generate("v-min", 8, 2).placement == placement_of("v", 4)


# zb-auto: never slower than a fixed schedule that fits


def _fixed_spans(p, m, costs, limit):
    """(placement, schedule name, span) of every fixed schedule that fits `limit` (the units of costs.mem_b)."""
    out = []
    for placement, names in FIXED.items():
        chunks = PLACEMENTS[placement]
        c = stage_costs(costs, chunks)
        for name in names:
            try:
                schedule = generate(name, p * chunks, m, chunks=chunks)
            except ScheduleError:
                continue
            if max(peak_memory(schedule, c)) <= limit + 1e-9:
                out.append((placement, name, span(schedule, c)))
    try:
        out.append(("one-per-rank", "the published heuristic", span(zb_heuristic(p, m, costs, limit), costs)))
    except ScheduleError:
        pass
    return out


per_stage = st.lists(st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0]), min_size=6, max_size=6)


@settings(max_examples=40, deadline=None)
@given(p=st.integers(2, 4), m=st.integers(1, 10), f=per_stage, b=per_stage, w=per_stage, mem=per_stage,
       comm=st.sampled_from([0.0, 0.2, 1.0]), limit=st.sampled_from(["1p", "2p", "3p"]))
def test_zb_auto_is_never_slower_than_any_fixed_schedule_that_fits(p, m, f, b, w, mem, comm, limit):
    costs = Costs(tuple(f[:p]), tuple(b[:p]), tuple(w[:p]), comm, tuple(mem[:p]))
    absolute = resolve_memory_limit(limit, costs, p)
    try:
        decision = choose_placement(p, m, costs, limit)
    except ScheduleError:
        assert not _fixed_spans(p, m, costs, absolute)
        return
    c = stage_costs(costs, decision.chunks)
    assert decision.schedule.placement == placement_of(decision.placement, p)
    assert max(peak_memory(decision.schedule, c)) <= absolute + 1e-9
    best = span(decision.schedule, c)
    for placement, name, other in _fixed_spans(p, m, costs, absolute):
        assert best <= other + 1e-9, (placement, name)
    # each placement alone: zb_auto with that placement's costs is never slower than its own fixed schedules
    for placement, chunks in PLACEMENTS.items():
        try:
            own = zb_auto(p, m, stage_costs(costs, chunks), limit, placement=placement)
        except ScheduleError:
            continue
        assert span(own, stage_costs(costs, chunks)) >= best - 1e-9  # the decision took the fastest placement


def test_the_memory_limit_means_the_same_bytes_for_every_placement():
    costs = Costs((1, 1, 1), (1, 1, 1), (1, 1, 1), 0.0, (4.0, 6.0, 2.0))
    assert resolve_memory_limit("2p", costs, 3) == 2 * 3 * 6.0
    assert resolve_memory_limit("2p", costs.split(2), 3, chunks=2) == 2 * 3 * 6.0
    assert resolve_memory_limit(10.0, costs.split(2), 3, chunks=2) == 10.0
    with pytest.raises(ScheduleError, match="below what any schedule needs"):
        resolve_memory_limit(2.0, costs, 3)


def test_choose_placement_picks_the_v_for_the_papers_costs_and_says_why():
    decision = choose_placement(8, 16, Costs.uniform(8, **PAPER), "1p")
    assert (decision.chunks, decision.placement) == (2, "v")
    assert decision.reason.startswith("v is fastest within 1p = 8 per rank: v ")
    assert "one-per-rank" in decision.reason and "interleaved" in decision.reason
    # equal step times keep the first placement: one stage per rank (fewer transfers)
    assert choose_placement(4, 8, Costs.uniform(4), "2p").placement == "one-per-rank"


def test_zb_auto_keeps_the_single_placement_api():
    costs = Costs.uniform(4, **PAPER)
    assert generate("zb-auto", 4, 8, costs, "2p").placement == one_per_rank(4)
    two = costs.split(2)
    assert generate("zb-auto", 8, 8, two, "2p", chunks=2, placement="v").placement == placement_of("v", 4)
    either = generate("zb-auto", 8, 8, two, "2p", chunks=2)
    assert either.placement in (placement_of("v", 4), placement_of("interleaved", 4))
    with pytest.raises(ScheduleError, match="no placement 'one-per-rank' for 8 stages on 4 ranks"):
        zb_auto(4, 8, two, "2p", placement="one-per-rank")
    with pytest.raises(ScheduleError, match="one or two stages per rank"):
        zb_auto(4, 8, Costs.uniform(12), "2p")


@pytest.mark.parametrize("p, m", [(4, 8), (8, 24)])
def test_choose_placement_is_deterministic_and_work_bounded(monkeypatch, p, m):
    costs = Costs.uniform(p, **PAPER)
    first = choose_placement(p, m, costs, "2p")
    runs = []
    real = auto.greedy
    monkeypatch.setattr(auto, "greedy", lambda *args: runs.append(len(args[1]) * args[2] * 3) or real(*args))
    again = choose_placement(p, m, costs, "2p")
    assert again == first
    assert sum(runs) <= auto.WORK_BUDGET


# Re-planning with measured costs


def test_replanning_with_measured_costs_changes_the_schedule_to_the_fastest():
    """What zb/adapt.py does after profiling: zb-auto again for the measured costs, on the same placement. Here
    the measured B takes 1.5 F, W half an F and a transfer half an F (planned: all equal, no transfer time): the
    plan changes, and the new one is the fastest under those costs of the old plan and every fixed schedule of
    the placement."""
    p, m = 4, 12
    planned = choose_placement(p, m, Costs.uniform(p), "2p")
    stages = p * planned.chunks
    measured = Costs.uniform(stages, 1.0, 1.5, 0.5, comm=0.5)
    fresh = replan(planned.schedule, measured, "2p")
    assert fresh.placement == planned.schedule.placement and fresh.name == "zb-auto"
    assert fresh.actions != planned.schedule.actions
    limit = resolve_memory_limit("2p", measured, p, planned.chunks)
    assert max(peak_memory(fresh, measured)) <= limit + 1e-9
    assert span(fresh, measured) < span(planned.schedule, measured)
    for name in FIXED[planned.placement]:
        try:
            fixed = generate(name, stages, m, chunks=planned.chunks)
        except ScheduleError:
            continue
        if max(peak_memory(fixed, measured)) <= limit + 1e-9:
            assert span(fresh, measured) <= span(fixed, measured) + 1e-9, name


# The compiler decides the placement before cutting


def test_pipeline_decides_the_placement_before_the_cut(monkeypatch):
    from zb import pipeline
    from zb.core.options import Options

    monkeypatch.setattr(pipeline, "_distributed", lambda options: True)
    monkeypatch.setattr(pipeline, "_groups", lambda options: (None, None, 0))
    monkeypatch.setattr(pipeline, "_world_size", lambda group: 4)
    monkeypatch.setattr(pipeline, "_rank", lambda group: 0)
    chosen = pipeline.Pipeline(Options.from_dict(dict(schedule="zb-auto", microbatches=8, memory_limit="1p")))
    expected = choose_placement(4, 8, Costs.uniform(4), "1p")
    assert (chosen.chunks, chosen.num_stages, chosen.num_ranks) == (expected.chunks, 4 * expected.chunks, 4)
    assert chosen.schedule_for(True) == expected.schedule
    assert chosen.placement_summary.startswith(f"zb-auto chose {expected.chunks} stage(s) per rank")
    explicit = pipeline.Pipeline(Options.from_dict(dict(schedule="zb-auto", microbatches=8, stages=4)))
    assert explicit.decision is None and explicit.chunks == 1 and explicit.placement_summary == ""
    assert explicit.schedule_for(True).placement == one_per_rank(4)
    v = pipeline.Pipeline(Options.from_dict(dict(schedule="zb-auto", microbatches=8, stages=8)))
    assert v.chunks == 2 and v.schedule_for(True).placement in (placement_of("v", 4), placement_of("interleaved", 4))
