"""The runtime's activation memory and measured costs against the schedule simulator."""

import pytest
import torch

import zb
from tests import models
from zb.adapt import REPLAN_AFTER
from zb.schedules import simulate


def _runner(schedule, steps=1, **options):
    torch.manual_seed(0)
    model, args = models.gpt()
    backend = zb.ZbBackend({"stages": 4, "schedule": schedule, "microbatches": 8, "compiler": "eager", **options})
    step = torch.compile(model, backend=backend)
    for _ in range(steps):
        step(*args).backward()
    (runner,) = backend.runners
    return runner


@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1", "zb-h2"])
def test_peak_memory_matches_the_simulator(schedule):
    runner = _runner(schedule)
    predicted = simulate(runner.schedule, runner.modelled_costs()).peak_memory
    measured = [runner.executor.peak_memory[r] for r in range(len(predicted))]
    assert all(p > 0 for p in predicted)
    for rank, (m, p) in enumerate(zip(measured, predicted)):
        assert m == pytest.approx(p, rel=0.10), f"rank {rank}: runtime held {m} bytes, simulator predicts {p}"


def test_zb_h2_holds_more_than_zb_h1_as_the_paper_says():
    h1, h2 = _runner("zb-h1"), _runner("zb-h2")
    assert h2.executor.peak_memory[0] > 1.5 * h1.executor.peak_memory[0]


def test_zb_auto_replans_with_measured_costs():
    runner = _runner("zb-auto", steps=REPLAN_AFTER)
    costs = runner.costs
    assert costs is not None and runner.schedule.name == "zb-auto"
    assert all(f > 0 for f in costs.f) and len(set(costs.f)) > 1  # real measurements, not the unit costs
    assert costs.mem_b == runner.modelled_costs().mem_b


def test_profile_gives_a_measured_timeline():
    runner = _runner("zb-h1", profile=True)
    timeline = runner.measured_timeline()
    assert set(timeline.start) == {a for acts in runner.schedule.actions for a in acts}
    assert 0 <= timeline.bubble_rate < 1


def test_measured_timeline_needs_profiling():
    # (the first step is measured for re-cutting unless rebalance is off)
    with pytest.raises(zb.ZbError, match="no step was profiled"):
        _runner("zb-h1", rebalance=False).measured_timeline()
