"""The runtime's activation memory and measured costs against the schedule simulator."""

import json

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


@pytest.mark.parametrize("schedule", ["v-half", "v-min"])
def test_v_half_and_v_min_hold_what_the_simulator_predicts_and_less_than_1f1b(schedule):
    """On a real 4-rank pipeline (8 stages in a V, in one process): the runtime's activation accounting equals
    the simulator's prediction, under the controllable-memory bound ((p+2)/2 and (p+4)/3 of a rank's M_B), and below
    what 1F1B holds on 4 stages of the same model."""
    runner = _runner(schedule, stages=8)
    predicted = simulate(runner.schedule, runner.modelled_costs()).peak_memory
    measured = [runner.executor.peak_memory[r] for r in range(4)]
    for rank, (m, p) in enumerate(zip(measured, predicted)):
        assert m == pytest.approx(p, rel=0.10), f"rank {rank}: runtime held {m} bytes, simulator predicts {p}"
    costs = runner.modelled_costs()
    per_rank = max(costs.mem_b[r] + costs.mem_b[7 - r] for r in range(4))  # one microbatch on both its stages
    bound = {"v-half": (4 + 2) / 2, "v-min": (4 + 4) / 3}[schedule]
    assert max(measured) <= bound * per_rank * 1.05
    one_f_one_b = _runner("1f1b")
    assert max(measured) < max(one_f_one_b.executor.peak_memory.values())


def test_planned_memory_matches_the_allocator_under_torchrun():
    """The plan's peak per rank (runtime/memory.py: activations, boundary tensors, gradients, the running piece)
    against the CPU allocator's measured peak (torch profiler memory events), 2 ranks over gloo, compiler eager."""
    from tests.test_pipeline import ROOT, launch

    schedules = ["1f1b", "zb-h1", "zb-v"]
    result = launch(2, ROOT / "tests/distributed/memory_check.py", *schedules)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [json.loads(line[len("memory "):]) for line in result.stdout.splitlines() if line.startswith("memory ")]
    assert sorted((r["schedule"], r["rank"]) for r in rows) == sorted((s, k) for s in schedules for k in (0, 1)), rows
    for row in rows:
        assert row["planned"] == pytest.approx(row["measured"], rel=0.10), \
            f"the allocator held {row['measured']} bytes at most, the plan says {row['planned']}: {row}"


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "zb-h1", "zb-v"])
def test_boundary_memory_does_not_grow_with_the_microbatches(schedule):
    """Receives are posted just in time and sends dropped once complete, so the boundary tensors a rank holds at
    once stay the same from 8 to 32 microbatches (posting every receive at the step's start held all of them)."""
    boundary = {}
    for microbatches in (8, 32):
        torch.manual_seed(0)
        model, args = models.gpt()
        args = [torch.cat([a] * (microbatches // 8)) for a in args]  # the same microbatch size
        backend = zb.ZbBackend({"stages": 2, "schedule": schedule, "microbatches": microbatches,
                                "compiler": "eager"})
        torch.compile(model, backend=backend)(*args).backward()
        (runner,) = backend.runners
        planned = runner.planned_memory()
        boundary[microbatches] = [planned[r].most["boundary"] for r in sorted(planned)]
        one = max(sum(s.nbytes for s in stage.receives_forward)
                  for stage in runner.program.stages)
        assert all(b > 0 for b in boundary[microbatches])
    assert boundary[32] == boundary[8], boundary
    assert max(boundary[32]) <= 8 * one, (boundary, one)


def test_a_pieces_working_memory_is_what_the_allocator_holds():
    """codegen/memory.py walks a graph freeing each value after its last reader: views and getitem own nothing,
    an output that is an input's view is that input's storage."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from tests.distributed.memory_check import allocator_peak
    from zb.codegen.memory import piece_memory

    def f(x, w):
        h = (x @ w).relu()  # 2 allocations, the first freed after relu
        normed = torch.nn.functional.layer_norm(h, (64,))  # a multi-output op (with mean and rstd)
        view = normed.view(-1).t() if normed.dim() == 1 else normed.transpose(0, 1)
        return view * 2, x.view(-1), h.sum()

    x, w = torch.randn(256, 64), torch.randn(64, 64)
    gm = make_fx(f)(x, w)
    memory = piece_memory(gm)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        outputs = gm(x, w)
    assert memory.outputs[1] == ("input", 0)
    assert memory.outputs[0][0] == memory.outputs[2][0] == "new"
    assert memory.peak == pytest.approx(allocator_peak(prof), rel=0.02), (memory, allocator_peak(prof))
    del outputs


def _tensors_in(value, depth=4):
    """The tensors reachable from `value` through containers and plain objects' attributes."""
    if isinstance(value, torch.Tensor):
        return [value]
    if depth == 0:
        return []
    if isinstance(value, dict):
        value = list(value.values())
    elif not isinstance(value, (list, tuple, set)):
        value = list(getattr(value, "__dict__", {}).values())
    return [t for v in value for t in _tensors_in(v, depth - 1)]


@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_between_steps_the_runner_holds_no_gradient_activation_or_batch(schedule):
    # Gradients live in what the step hands to backward, then in .grad: a copy kept by the runner or its executor
    # (the last step's gradients, its microbatch slices) would be a second gradient-sized buffer on every rank.
    runner = _runner(schedule, steps=2)
    params = {id(p) for p in runner.state.values()}
    held = [t for t in _tensors_in(runner.executor) + _tensors_in(runner.last_grads) if id(t) not in params]
    assert runner.last_grads is None
    assert sum(t.numel() for t in held if t.numel() > 1) == 0, [tuple(t.shape) for t in held]


def test_between_steps_replicas_in_one_process_hold_no_partial_gradient_sum():
    runner = _runner("zb-h1", steps=2, data_parallel=2, microbatches=4)
    held = _tensors_in(runner.data_parallel.reduction) + _tensors_in(runner.executor)
    params = {id(p) for p in runner.state.values()}
    assert sum(t.numel() for t in held if id(t) not in params and t.numel() > 1) == 0


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_a_step_holds_one_copy_of_the_gradients(compiler):
    """Each W adds its parameters' gradients into the step's sums as it makes them (codegen/accumulate.py), so a
    step with microbatches holds the sums and at most one parameter's fresh gradient beside them. Returned from W,
    every microbatch after the first held a second copy of all its stage's gradients (here 2x the sums)."""
    from tests.distributed.memory_check import allocator_peak
    from zb.passes.keys import PieceName

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(512, 512, bias=False) for _ in range(4)])
    reference = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(8, 512)
    backend = zb.ZbBackend({"stages": 1, "microbatches": 4, "compiler": compiler})
    step = torch.compile(lambda x: model(x).square().mean(), backend=backend)
    step(x).backward()  # compiles
    model.zero_grad(set_to_none=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = step(x)
    (runner,) = backend.runners
    weight = runner.program.stages[0].pieces[PieceName.BACKWARD_WEIGHT]
    assert [spec.key.index for spec in weight.sums] == [runner.program.inputs.index(s) for s in runner.program.inputs
                                                        if not s.batched and s.requires_grad]
    sums = sum(p.numel() * p.element_size() for p in model.parameters())
    assert allocator_peak(prof) < 1.5 * sums, (allocator_peak(prof), sums)
    loss.backward()
    eager = torch.func.functional_call(model, dict(zip([n for n, _ in model.named_parameters()],
                                                       [r.requires_grad_() for r in reference])), (x,))
    grads = torch.autograd.grad(eager.square().mean(), reference)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
