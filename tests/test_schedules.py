"""Schedules: generators against the paper's closed forms, the simulator, validation, lowering, CSV, pictures."""

import json
import pathlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zb.cli import main
from zb.schedules import (
    SCHEDULES, Action, Costs, Schedule, ScheduleError, check_deadlock_free, default_chunks, draw, from_csv, generate,
    lower, simulate, to_csv, to_text, validate,
)

GOLDEN = pathlib.Path(__file__).parent / "golden"
PAPER = dict(f=18.522, b=18.086, w=9.337, comm=0.601)  # 1.5B model, p=8, m=24 (A100 profile)


def _bubble(timeline):
    """Idle time of the longest rank (span minus busy time): the closed forms' 'bubble per rank'."""
    ranks = range(timeline.schedule.num_ranks)
    longest = max(ranks, key=lambda r: (timeline.span(r), timeline.work(r)))
    return timeline.span(longest) - timeline.work(longest)


# Costs in the paper's regime: T_W <= T_F <= T_B.
costs_f_b_w = st.tuples(st.integers(1, 4), st.integers(0, 3), st.integers(1, 4)).map(
    lambda t: (t[0], t[0] + t[1], min(t[2], t[0]))
)


@settings(max_examples=60, deadline=None)
@given(p=st.integers(2, 8), extra=st.integers(0, 12), fbw=costs_f_b_w)
def test_one_f_one_b_bubble_and_memory(p, extra, fbw):
    f, b, w = fbw
    m = p + extra
    t = simulate(generate("1f1b", p, m), Costs.uniform(p, f, b, w))
    assert _bubble(t) == pytest.approx((p - 1) * (f + b + w))
    assert t.bubble_rate == pytest.approx((p - 1) * (f + b + w) / ((m + p - 1) * (f + b + w)))
    assert t.peak_memory[0] == p


@settings(max_examples=60, deadline=None)
@given(p=st.integers(2, 8), extra=st.integers(0, 12), fbw=costs_f_b_w)
def test_zb_h1_bubble_and_memory(p, extra, fbw):
    f, b, w = fbw
    t = simulate(generate("zb-h1", p, p + extra), Costs.uniform(p, f, b, w))
    assert _bubble(t) == pytest.approx((p - 1) * (f + b - w))
    assert t.peak_memory[0] == p  # rank 0 holds p microbatches' M_B, no W waiting


@settings(max_examples=60, deadline=None)
@given(p=st.integers(2, 8), extra=st.integers(0, 12), fbw=costs_f_b_w)
def test_zb_h2_bubble_and_memory(p, extra, fbw):
    f, b, w = fbw
    t = simulate(generate("zb-h2", p, 2 * p - 1 + extra), Costs.uniform(p, f, b, w))
    assert _bubble(t) == pytest.approx((p - 1) * (f + b - 2 * w))
    assert t.peak_memory[0] == 2 * p - 1


@settings(max_examples=40, deadline=None)
@given(p=st.integers(2, 8), extra=st.integers(0, 12), cost=st.integers(1, 3))
def test_zb_v_has_no_bubble_when_f_b_w_are_equal(p, extra, cost):
    t = simulate(generate("zb-v", 2 * p, 2 * p - 1 + extra), Costs.uniform(2 * p, cost, cost, cost))
    assert _bubble(t) == pytest.approx(0)
    assert max(t.peak_memory) == 2 * p  # 2p half-size stages in flight: p M_B


@settings(max_examples=40, deadline=None)
@given(p=st.integers(2, 6), groups=st.integers(1, 4), v=st.integers(2, 3), fbw=costs_f_b_w)
def test_interleaved_1f1b_bubble_shrinks_by_chunks(p, groups, v, fbw):
    f, b, w = fbw
    t = simulate(generate("interleaved-1f1b", p * v, p * groups, chunks=v), Costs.uniform(p * v, f, b, w))
    assert _bubble(t) == pytest.approx((p - 1) * (f + b + w))  # each chunk costs 1/v of a full stage here
    assert max(t.peak_memory) > p


def test_paper_bubble_rates_for_the_1_5b_model():
    costs = Costs.uniform(8, **PAPER)
    measured = {name: simulate(generate(name, 8, 24), costs).bubble_rate for name in ("1f1b", "zb-h1", "zb-h2")}
    assert measured["1f1b"] == pytest.approx(0.2431, abs=0.02)
    assert measured["zb-h1"] == pytest.approx(0.1585, abs=0.02)
    assert measured["zb-h2"] == pytest.approx(0.1083, abs=0.02)


def _span_lower_bound(p: int, m: int, f: float, b: float, w: float, comm: float) -> float:
    """No schedule's first rank spans less: the last rank starts (p-1)(F+comm) after it, runs m F's and m B's
    before its last B, whose gradient then crosses p-1 links and p-1 more B's (the first rank's included) before
    the first rank's last W."""
    return (p - 1) * (f + comm) + m * (f + b) + (p - 1) * (b + comm) + w


def test_zb_auto_at_2p_reaches_the_lower_bound_and_the_papers_zb_2p():
    costs = Costs.uniform(8, **PAPER)
    timeline = simulate(generate("zb-auto", 8, 24, costs, "2p"), costs)
    bound = _span_lower_bound(8, 24, PAPER["f"], PAPER["b"], PAPER["w"], PAPER["comm"])
    assert timeline.span(0) == pytest.approx(bound, abs=1e-6)  # optimal: nothing can be shorter
    # The optimum's bubble rate is 0.043310; the paper reports ZB-2p's as 0.0433, to 4 decimals.
    assert round(timeline.bubble_rate, 4) <= 0.0433
    assert max(timeline.peak_memory) <= 2 * 8 + 1e-9


@settings(max_examples=20, deadline=None)
@given(p=st.integers(2, 6), extra=st.integers(0, 10), fbw=costs_f_b_w, comm=st.sampled_from([0, 0.1, 0.5]))
def test_no_schedule_beats_the_span_lower_bound(p, extra, fbw, comm):
    f, b, w = fbw
    m = p + extra
    costs = Costs.uniform(p, f=f, b=b, w=w, comm=comm)
    bound = _span_lower_bound(p, m, f, b, w, comm)
    for name in ("zb-auto", "zb-h1", "zb-h2", "1f1b"):
        timeline = simulate(generate(name, p, m, costs), costs)
        assert timeline.span(0) >= bound - 1e-9, name


@settings(max_examples=25, deadline=None)
@given(p=st.integers(2, 6), extra=st.integers(0, 8), fbw=costs_f_b_w, comm=st.sampled_from([0, 0.1, 0.5]),
       skew=st.sampled_from([1.0, 1.5]))
def test_zb_auto_is_never_worse_than_zb_h1_at_1p_nor_zb_h2_at_2p(p, extra, fbw, comm, skew):
    f, b, w = fbw
    m = p + extra
    # the first and last stages carry more (embedding, loss): per-stage costs differ
    scale = [skew] + [1.0] * (p - 2) + [skew]
    costs = Costs(tuple(f * s for s in scale), tuple(b * s for s in scale), tuple(w * s for s in scale), comm)

    def span(schedule):
        t = simulate(schedule, costs)
        return max(t.span(r) for r in range(p))

    auto_1p = generate("zb-auto", p, m, costs, "1p")
    auto_2p = generate("zb-auto", p, m, costs, "2p")
    assert max(simulate(auto_1p, costs).peak_memory) <= p * max(costs.mem_b) + 1e-9
    assert span(auto_1p) <= span(generate("zb-h1", p, m)) + 1e-9
    assert span(auto_2p) <= span(generate("zb-h2", p, m)) + 1e-9


@pytest.mark.parametrize("p, m", [(4, 8), (32, 128)])
def test_zb_auto_plans_the_same_schedule_however_slow_the_clock(monkeypatch, p, m):
    """zb-auto's search is bounded by work, not time: every rank plans the same schedule on any machine. At
    p=32, m=128 the budget cuts the search (a clock budget would have cut it elsewhere under a slow clock)."""
    import time

    costs = Costs.uniform(p, **PAPER)
    normal = generate("zb-auto", p, m, costs, "2p")
    now = [0.0]

    def slow_clock():
        now[0] += 10.0  # every reading 10 s later: any time budget would be spent at once
        return now[0]

    for name in ("perf_counter", "monotonic", "time", "process_time"):
        monkeypatch.setattr(time, name, slow_clock)
    for name in ("perf_counter_ns", "monotonic_ns", "time_ns", "process_time_ns"):
        monkeypatch.setattr(time, name, lambda: int(slow_clock() * 1e9))
    slowed = generate("zb-auto", p, m, costs, "2p")
    assert slowed.actions == normal.actions and slowed.placement == normal.placement


def test_zb_auto_tries_every_candidate_on_small_pipelines_and_a_fixed_number_on_large_ones(monkeypatch):
    from zb.schedules import auto

    runs = []
    real = auto.greedy
    monkeypatch.setattr(auto, "greedy", lambda *args: runs.append(args[2]) or real(*args))
    generate("zb-auto", 8, 24, Costs.uniform(8, **PAPER), "2p")
    assert len(runs) == len(list(auto._policies("one-per-rank", 8, 16.0))) == 56
    runs.clear()
    generate("zb-auto", 32, 128, Costs.uniform(32, **PAPER), "2p")
    assert len(runs) == auto.WORK_BUDGET // (3 * 32 * 128) == 4


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_schedule_validates_lowers_and_cannot_deadlock(name):
    stages = 4 * default_chunks(name)
    schedule = generate(name, stages, 8)
    validate(schedule)
    lowered = lower(schedule)
    check_deadlock_free(lowered)
    sends = sum(a.kind.startswith("SEND") for acts in lowered.actions for a in acts)
    receives = sum(a.kind.startswith("RECV") for acts in lowered.actions for a in acts)
    assert sends == receives > 0


@pytest.mark.parametrize("name", SCHEDULES)
def test_golden_schedules(name):
    stages = 4 * default_chunks(name)
    text = generate(name, stages, 8).text() + "\n"
    path = GOLDEN / f"{name}_s{stages}_m8.txt"
    assert text == path.read_text(), f"{name} changed; if intended, regenerate {path}"


def test_action_text_round_trip():
    for text in ("1F3", "0B2", "0W2", "12BW7", "1SEND_F3", "2RECV_B0"):
        assert str(Action.parse(text)) == text
    with pytest.raises(ScheduleError, match="cannot parse action 'F3'"):
        Action.parse("F3")
    schedule = generate("zb-h1", 3, 4)
    assert Schedule.from_text(schedule.text(), schedule.placement, 4, "zb-h1") == schedule


def test_validate_names_the_broken_rule():
    good = generate("zb-h1", 2, 2)
    rows = [list(r) for r in good.actions]

    def with_rows(rows):
        return Schedule("bad", 2, good.placement, tuple(tuple(r) for r in rows))

    duplicate = [rows[0] + [rows[0][0]], rows[1]]
    with pytest.raises(ScheduleError, match="0F0 appears 2 times"):
        validate(with_rows(duplicate))
    wrong_rank = [rows[0] + [Action(1, "F", 0)], rows[1]]
    with pytest.raises(ScheduleError, match="rank 0 runs 1F0, but stage 1 lives on rank 1"):
        validate(with_rows(wrong_rank))
    w_first = list(rows[0])
    i, j = w_first.index(Action(0, "B", 1)), w_first.index(Action(0, "W", 1))
    w_first[i], w_first[j] = w_first[j], w_first[i]
    with pytest.raises(ScheduleError, match="rank 0 runs 0W1 before 0B1"):
        validate(with_rows([w_first, rows[1]]))
    # rank 0 waits for 1B0 before sending 0F1; rank 1 wants 0F1 before it runs 1F0: a cycle across ranks
    parse = lambda text: [Action.parse(a) for a in text.split()]  # noqa: E731
    crossed = [parse("0F0 0B0 0W0 0F1 0B1 0W1"), parse("1F1 1F0 1B0 1W0 1B1 1W1")]
    with pytest.raises(ScheduleError, match="deadlocks: every rank waits"):
        validate(with_rows(crossed))


def test_lowered_schedule_with_a_receive_before_its_send_deadlocks():
    lowered = lower(generate("1f1b", 2, 2))
    rank0, rank1 = list(lowered.actions[0]), list(lowered.actions[1])
    # rank 0 waits for a gradient before it sends the activation rank 1 needs to produce it
    rank0.remove(Action(0, "RECV_B", 0))
    rank0.insert(0, Action(0, "RECV_B", 0))
    broken = Schedule("x", 2, lowered.placement, (tuple(rank0), tuple(rank1)))
    with pytest.raises(ScheduleError, match="lowered schedule deadlocks: rank 0 at 0RECV_B0"):
        check_deadlock_free(broken)


@pytest.mark.parametrize("request_, message", [
    (dict(name="zb-h1", stages=4, microbatches=3), "zb-h1 needs at least as many microbatches as ranks"),
    (dict(name="zb-h2", stages=4, microbatches=2), "zb-h2 needs at least as many microbatches as ranks"),
    (dict(name="zb-v", stages=8, microbatches=2), "zb-v needs at least as many microbatches as ranks"),
    (dict(name="zb-v", stages=6, microbatches=8, chunks=3), "zb-v places exactly 2 stages per rank"),
    (dict(name="zb-v", stages=7, microbatches=8), "7 stages cannot be spread over ranks with 2 chunks"),
    (dict(name="interleaved-1f1b", stages=8, microbatches=6), "microbatches divisible by the ranks"),
    (dict(name="zb-auto", stages=4, microbatches=8, memory_limit=0.5), "below what any schedule needs"),
    (dict(name="zb-auto", stages=4, microbatches=8, memory_limit="lots"), "give a number or a multiple of p"),
    (dict(name="1f1b", stages=4, microbatches=8, memory_limit="1p"), "applies to zb-auto only"),
    (dict(name="zb-h3", stages=4, microbatches=8), "unknown schedule 'zb-h3'"),
])
def test_impossible_requests_name_the_constraint(request_, message):
    with pytest.raises(ScheduleError, match=message):
        generate(**request_)


def test_simulator_reports_a_deadlocked_order():
    schedule = Schedule("stuck", 1, (0, 1), ((Action(0, "BW", 0), Action(0, "F", 0)), (Action(1, "F", 0),
                                                                                       Action(1, "BW", 0))))
    with pytest.raises(ScheduleError, match="deadlocks"):
        simulate(schedule, Costs.uniform(2))


def test_costs_parse_per_stage_values():
    costs = Costs.parse("F=1:2:2:1,B=2,W=1,comm=0.5,MB=4", 4)
    assert costs.f == (1, 2, 2, 1) and costs.b == (2,) * 4 and costs.comm == 0.5 and costs.mem_w == (2,) * 4
    with pytest.raises(ScheduleError, match="F lists 2 values for 4 stages"):
        Costs.parse("F=1:2", 4)
    with pytest.raises(ScheduleError, match="cannot read cost 'X=1'"):
        Costs.parse("X=1", 4)


def test_csv_round_trip_uses_torch_names(tmp_path):
    from torch.distributed.pipelining.schedules import _Action

    for name in ("zb-h1", "1f1b"):
        schedule = generate(name, 4, 8)
        path = tmp_path / f"{name}.csv"
        to_csv(schedule, path)
        cells = path.read_text().splitlines()[0].split(",")
        assert [str(_Action.from_str(c)) for c in cells] == cells  # torch reads every cell
        kinds = {c.rstrip("0123456789")[-1] for c in cells}
        assert kinds == ({"F", "I", "W"} if name == "zb-h1" else {"F", "B"})
        back = from_csv(path, name=name)
        assert back == schedule


def test_csv_reads_torch_idle_cells_and_rejects_comms(tmp_path):
    path = tmp_path / "torch.csv"
    path.write_text("0F0,,0I0,0W0\n,1F0,1I0,1W0\n")
    schedule = from_csv(path)
    validate(schedule)
    assert schedule.placement == (0, 1) and schedule.num_microbatches == 1
    path.write_text("0F0,0SEND_F0\n")
    with pytest.raises(ScheduleError, match="compute-only"):
        from_csv(path)


def test_pictures(tmp_path):
    timeline = simulate(generate("zb-v", 8, 8), Costs.uniform(8))
    for suffix in ("png", "svg"):
        path = draw(timeline, tmp_path / f"t.{suffix}")
        assert path.stat().st_size > 1000
    assert "bubble rate" in (tmp_path / "t.svg").read_text()
    text = to_text(timeline, width=60).splitlines()
    assert text[0].startswith("zb-v: 4 ranks, 8 stages, 8 microbatches; bubble rate")
    assert len(text) == 5 and all(len(line) == len("rank  0 |") + 61 for line in text[1:])


def test_cli_json_and_files(tmp_path, capsys):
    args = ["schedule", "--schedule", "zb-h2", "--stages", "4", "--microbatches", "8",
            "--costs", "F=1,B=1,W=1,comm=0", "--out", str(tmp_path / "t.svg"), "--csv", str(tmp_path / "t.csv")]
    assert main(args + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= {"makespan", "bubble_rate", "peak_memory", "schedule"}
    assert result["bubble_rate"] == 0 and result["peak_memory"] == [7, 6, 5, 4]
    assert result["schedule"][0][:2] == ["0F0", "0F1"]
    assert (tmp_path / "t.svg").exists() and (tmp_path / "t.csv").exists()
    assert main(["schedule", "--load-csv", str(tmp_path / "t.csv")]) == 0
    assert "bubble rate 0.0000" in capsys.readouterr().out
    assert main(["schedule", "--schedule", "zb-v", "--stages", "6", "--chunks", "3"]) == 2
    assert "zb-v places exactly 2 stages per rank" in capsys.readouterr().err


# Data parallelism: the REDUCE action, lowering with reductions, reduction costs, and timing them.


def _reduce_positions(lowered):
    return {a.stage: (rank, i) for rank, acts in enumerate(lowered.actions) for i, a in enumerate(acts)
            if a.kind == "R"}


def test_reduce_action_text_round_trip():
    assert Action.parse("1R") == Action(1, "R", 0) and str(Action(12, "R", 0)) == "12R"
    for text in ("1R0", "R", "1RR"):
        with pytest.raises(ScheduleError, match="cannot parse action"):
            Action.parse(text)
    lowered = lower(generate("zb-v", 4, 4), reduce=True)
    assert "3R" in lowered.text().split()
    assert Schedule.from_text(lowered.text(), lowered.placement, 4, "zb-v") == lowered


@pytest.mark.parametrize("name", SCHEDULES)
def test_lower_with_reduce_puts_one_reduction_per_stage_after_its_last_w(name):
    stages = 4 * default_chunks(name)
    schedule = generate(name, stages, 8)
    lowered = lower(schedule, reduce=True)
    check_deadlock_free(lowered)
    positions = _reduce_positions(lowered)
    assert sorted(positions) == list(range(stages))
    last_kind = "W" if schedule.split_backward else "BW"
    for stage, (rank, i) in positions.items():
        acts = lowered.actions[rank]
        assert rank == schedule.placement[stage]
        sent = acts[i - 1].kind == "SEND_B"  # a BW's gradient goes out first
        compute = acts[i - 2] if sent else acts[i - 1]
        assert compute.stage == stage and compute.kind == last_kind
        assert not sent or acts[i - 1] == Action(stage, "SEND_B", compute.microbatch)
        assert not any(a.stage == stage and a.kind in ("F", "B", "W", "BW") for a in acts[i:]), "compute after R"
    # without the reductions, the same lowering as before
    assert tuple(tuple(a for a in acts if a.kind != "R") for acts in lowered.actions) == lower(schedule).actions


def test_lower_with_reduce_small_cases():
    tail = lambda lowered, rank, n: " ".join(map(str, lowered.actions[rank][-n:]))  # noqa: E731
    h1 = lower(generate("zb-h1", 2, 3), reduce=True)
    assert tail(h1, 1, 6) == "1F2 1B2 1SEND_B2 1W1 1W2 1R" and tail(h1, 0, 4) == "0RECV_B2 0B2 0W2 0R"
    unsplit = lower(generate("1f1b", 2, 3), reduce=True)
    assert tail(unsplit, 1, 3) == "1BW2 1SEND_B2 1R" and tail(unsplit, 0, 3) == "0RECV_B2 0BW2 0R"
    forward_only = Schedule("forward", 2, (0, 1), ((Action(0, "F", 0), Action(0, "F", 1)),
                                                   (Action(1, "F", 0), Action(1, "F", 1))))
    assert lower(forward_only, reduce=True) == lower(forward_only)
    assert not _reduce_positions(lower(forward_only, reduce=True))


def test_a_reduction_before_its_stages_last_w_deadlocks():
    lowered = lower(generate("zb-h1", 2, 2), reduce=True)
    rank1 = [a for a in lowered.actions[1] if a.kind != "R"]
    rank1.insert(rank1.index(Action(1, "W", 1)), Action(1, "R", 0))
    broken = Schedule("x", 2, lowered.placement, (lowered.actions[0], tuple(rank1)))
    with pytest.raises(ScheduleError, match="lowered schedule deadlocks: rank 1 at 1R"):
        check_deadlock_free(broken)


def test_costs_reduction_times():
    assert Costs.uniform(3).reduce == (0.0,) * 3 and Costs.parse("F=1", 2).reduce == (0.0, 0.0)
    assert Costs.parse("F=1,R=0.5", 2).reduce == (0.5, 0.5) and Costs.parse("R=1:2", 2).reduce == (1.0, 2.0)
    with pytest.raises(ScheduleError, match="must not be negative"):
        Costs.uniform(2, reduce=-1.0)
    with pytest.raises(ScheduleError, match="reduction times for 1 stages, not 2"):
        Costs((1, 1), (1, 1), (1, 1), reduce=(1.0,))
    base = Costs.uniform(2)
    # ring all-reduce: 2(D-1)/D x bytes / bandwidth + 2(D-1) x latency
    assert base.with_reduction(1000, replicas=4, bandwidth=100, latency=0.5).reduce == (18.0, 18.0)
    assert base.with_reduction((1000, 2000), replicas=2, bandwidth=100).reduce == (10.0, 20.0)
    assert base.with_reduction(1000, replicas=1, bandwidth=100, latency=0.5).reduce == (0.0, 0.0)
    assert base.with_reduction(1000, 4, 100).f == base.f  # the rest is kept
    with pytest.raises(ScheduleError, match="param_bytes lists 3 values for 2 stages"):
        base.with_reduction((1, 2, 3), 2, 100)
    with pytest.raises(ScheduleError, match="replicas >= 1, bandwidth > 0"):
        base.with_reduction(1000, 0, 100)


def test_simulated_reductions_one_stage_per_rank():
    """1f1b, 2 ranks, 2 microbatches, F = 1, BW = 2: rank 1's last BW ends at 7, rank 0's at 9. With one stage per
    rank its last W is the rank's last compute, so overlapping and reducing after the rank's compute agree."""
    costs = Costs.uniform(2, reduce=1.0)
    for mode in ("overlap", "after"):
        t = simulate(generate("1f1b", 2, 2), costs, mode)
        assert t.makespan == 9 and t.reduce_start == {0: 9, 1: 7} and t.reduce_end == {0: 10, 1: 8}, mode
        assert t.step_time == 10 and t.exposed_reduction == 1
        assert t.summary()["step_time"] == 10 and t.summary()["exposed_reduction"] == 1
    t = simulate(generate("1f1b", 2, 2), costs, "none")
    assert t.reduce_start == {} and t.step_time == t.makespan == 9 and "step_time" not in t.summary()


def test_simulated_reductions_overlap_the_other_stage_of_a_rank():
    """zb-v, 2 ranks (stages 0, 3 on rank 0; 1, 2 on rank 1), 2 microbatches, F = B = W = 1. The stages' last W's
    end at 9 (stage 3), 14 (0), 11 (2) and 13 (1); rank 0 computes until 14, rank 1 until 13."""
    schedule = generate("zb-v", 4, 2)
    overlap = simulate(schedule, Costs.uniform(4, reduce=1.0))
    assert overlap.makespan == 14
    assert overlap.reduce_start == {3: 9, 0: 14, 2: 11, 1: 13} and overlap.reduce_end == {3: 10, 0: 15, 2: 12, 1: 14}
    assert overlap.step_time == 15 and overlap.exposed_reduction == 1
    after = simulate(schedule, Costs.uniform(4, reduce=1.0), "after")
    assert after.reduce_start == {3: 14, 0: 15, 2: 13, 1: 14} and after.reduce_end == {3: 15, 0: 16, 2: 14, 1: 15}
    assert after.step_time == 16 and after.exposed_reduction == 2
    # a rank's reductions share its one channel: stage 1's (ready at 13) waits for stage 2's (11 to 14)
    slow = simulate(schedule, Costs.uniform(4, reduce=3.0))
    assert slow.reduce_start == {3: 9, 0: 14, 2: 11, 1: 14} and slow.reduce_end == {3: 12, 0: 17, 2: 14, 1: 17}
    assert slow.exposed_reduction == 3
    assert [s for s, _, _ in slow.rank_reductions(1)] == [2, 1]
    # a lowered schedule (with its R actions) times the same
    lowered = simulate(lower(schedule, reduce=True), Costs.uniform(4, reduce=3.0))
    assert (lowered.start, lowered.reduce_start, lowered.reduce_end) == (slow.start, slow.reduce_start,
                                                                         slow.reduce_end)


@pytest.mark.parametrize("name", ["zb-h1", "zb-v", "1f1b"])
def test_zero_reduction_costs_change_nothing(name):
    stages = 8 if name == "zb-v" else 4
    schedule = generate(name, stages, 8)
    plain = simulate(schedule, Costs.uniform(stages), "none")
    t = simulate(schedule, Costs.uniform(stages))
    assert (t.start, t.end, t.makespan, t.bubble_rate) == (plain.start, plain.end, plain.makespan, plain.bubble_rate)
    assert t.step_time == t.makespan and t.exposed_reduction == 0 and not t.has_reduction
    assert set(t.summary()) == {"makespan", "bubble_rate", "peak_memory"}
    assert to_text(t) == to_text(plain)
    with pytest.raises(ScheduleError, match="reduction 'later': choose one of overlap, after, none"):
        simulate(schedule, Costs.uniform(stages), "later")


def test_pictures_draw_reductions_on_their_own_lane(tmp_path):
    timeline = simulate(generate("zb-v", 4, 2), Costs.uniform(4, reduce=3.0))
    text = to_text(timeline, width=34).splitlines()
    assert text[0].endswith("; step time 17, exposed reduction 3")
    assert [line[:9] for line in text[1:]] == ["rank  0 |", "      R |", "rank  1 |", "      R |"]
    # 2 columns per time unit: stage 3's reduction 9-12, stage 0's 14-17; stage 2's 11-14, stage 1's 14-17
    assert text[2] == "      R |" + "." * 18 + "R3rrrr" + "...." + "R0rrrr" + "|"
    assert text[4] == "      R |" + "." * 22 + "R2rrrr" + "R1rrrr" + "|"
    path = draw(timeline, tmp_path / "t.svg")
    assert "exposed reduction 3" in path.read_text()
