"""Tier (c): pipelines against a single-process eager reference, in one process and under torchrun."""

import concurrent.futures
import copy
import os
import pathlib
import re
import socket
import subprocess
import sys

import pytest
import torch

import zb
from tests import models
from tests.helpers import assert_close
from zb.passes.keys import Kind, Role, act_key
from zb.passes.partition_stages import _module_paths, split_points_for
from zb.codegen import TensorSpec
from zb.runtime.executor import _checked
from zb.schedules import SCHEDULES

ROOT = pathlib.Path(__file__).resolve().parents[1]


def train_three_steps(factory, **options):
    """3 SGD steps with zb (in this process) and with eager; returns both models."""
    torch.manual_seed(0)
    model, args = factory()
    reference = copy.deepcopy(model)
    step = torch.compile(model, backend="zb", options={"compiler": "eager", **options})
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, reference)]
    for i in range(3):
        batch = [a if not a.is_floating_point() else a + 0.1 * i for a in args]
        loss, expected = step(*batch), reference(*batch)
        loss.backward()
        expected.backward()
        assert_close(loss.detach(), expected.detach(), f"loss of step {i}")
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            assert_close(p.grad, q.grad, f"step {i} grad of {name}")
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert_close(p.detach(), q.detach(), name)


@pytest.mark.parametrize("stages", [4, 8])
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("model", ["gpt", "mlp"])
def test_in_process_pipeline_matches_eager(model, schedule, stages):
    factory = {"gpt": models.gpt, "mlp": models.deep_mlp}[model]
    train_three_steps(factory, stages=stages, schedule=schedule, microbatches=8)


@pytest.mark.inductor
def test_in_process_pipeline_through_inductor():
    train_three_steps(models.gpt, stages=2, schedule="zb-h1", microbatches=4, compiler="inductor")


def test_split_points_choose_where_stages_begin():
    model, args = models.gpt()
    plan = zb.explain(model, *args, stages=2, split_points=["blocks.1"], microbatches=2)
    modules = [{p for n in stage.graph.graph.nodes for p in _module_paths(n)} for stage in plan.stages]
    assert "blocks.0" in modules[0] and "blocks.1" not in modules[0]
    assert "blocks.1" in modules[1] and "blocks.0" not in modules[1]
    first, second = plan.stages
    assert any(k is not None and k.is_(Kind.ACT, Role.GRAD) for k in zb.passes.plan.output_keys(second.backward_input))
    assert first.backward_input is None  # token ids need no gradient: stage 0's W holds its whole backward
    train_three_steps(models.gpt, stages=2, split_points=["blocks.1"], schedule="zb-h1", microbatches=2)


@pytest.mark.parametrize("options, message", [
    (dict(stages=2, split_points=["blocks.1", "ln_f"]), "split_points names 2 module\\(s\\) for 2 stages"),
    (dict(stages=2, split_points=["blocks.9"]), "split point 'blocks.9' names no module the model runs"),
    (dict(stages=3, schedule="zb-v"), "stages cannot be spread over ranks with 2 chunks"),
    (dict(stages=4, schedule="zb-h2", microbatches=2), "zb-h2 needs at least as many microbatches as ranks"),
    (dict(stages=4, schedule="interleaved-1f1b", microbatches=3), "microbatches divisible by the ranks"),
])
def test_impossible_pipelines_fail_before_running(options, message):
    model, args = models.gpt()
    with pytest.raises(Exception, match=message):
        torch.compile(model, backend="zb", options={"compiler": "eager", **options})(*args)


def test_boundary_mismatch_names_the_stages():
    spec = [TensorSpec(act_key("h"), (2, 4), torch.float32, torch.device("cpu"))]
    with pytest.raises(zb.ZbError, match=r"stage 1 sent act:h as torch.float32\[2, 3\] but stage 2 expects"):
        _checked({act_key("h"): torch.zeros(2, 3)}, spec, 1, 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(ranks: int, script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
               "--master-port", str(_free_port()), str(ROOT / "tests" / "distributed" / script), *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def launch(ranks: int, script: pathlib.Path, *args: str, cwd: pathlib.Path = ROOT,
           timeout: int = 600) -> subprocess.CompletedProcess:
    """Start `ranks` processes of `script` with torchrun's environment variables but without its agent, and wait
    for all of them. For tests where a rank dies on purpose: torchrun's agent sends SIGTERM to the others as soon as
    one exits non-zero, which races the survivors' own error report (seen in CI: the survivor was killed before it
    printed). Returns one CompletedProcess: the outputs joined in rank order, the first non-zero exit code."""
    port = str(_free_port())
    processes = []
    for rank in range(ranks):
        env = dict(os.environ, OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks),
                   LOCAL_WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        processes.append(subprocess.Popen([sys.executable, str(script), *args], cwd=cwd, env=env, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=timeout))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    codes = [process.returncode for process in processes]
    return subprocess.CompletedProcess(processes[0].args, next((c for c in codes if c != 0), 0),
                                       "".join(out for out, _ in outputs), "".join(err for _, err in outputs))


@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize("model", ["gpt", "mlp"])
def test_torchrun_pipeline_matches_eager(model, ranks):
    """The GPT runs with the default options; the MLP with rebalance=True, its stages always re-cut after step 1,
    moving parameters (and that step's gradients) between ranks."""
    out = torchrun(ranks, "pipeline_check.py", "--model", model, *(["--recut"] if model == "mlp" else []))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    assert [line.split()[1] for line in out.stdout.splitlines() if line.startswith("ok ")] == list(SCHEDULES)


def test_torchrun_zb_auto_choosing_the_v_placement_replans_on_it():
    """With 2 microbatches on 2 ranks zb-auto places the GPT in a V (4 stages); its re-plan after step 2 keeps that
    placement (it once planned one stage per rank over 4 ranks there and hung)."""
    out = torchrun(2, "pipeline_check.py", "--model", "gpt", "--schedules", "zb-auto", "--microbatches", "2")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    assert "ok zb-auto (gpt, 2 ranks, 2 microbatches, placement (0, 1, 1, 0))" in out.stdout, out.stdout


@pytest.mark.parametrize("ranks", [2, 4])
def test_torchrun_optimizer_post_validation_matches_synchronous_training(ranks):
    """options["optimizer"] across processes: 20 steps with clipping and non-finite steps (tests/optim_check.py);
    float16 loss scaling inside the step (option grad_scaler) against eager's GradScaler; scalers that differ."""
    cases = ["adamw:zb-h1:1", "sgd:zb-v:1", "adam:1f1b:0", "adamw:zb-auto:1", "scaled:zb-v:1", "scaled:1f1b:0",
             "mismatched:1f1b:1"]
    out = torchrun(ranks, "optimizer_check.py", "--cases", ",".join(cases))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    assert [line.split()[1] for line in out.stdout.splitlines() if line.startswith("ok ")] == cases


@pytest.mark.inductor
def test_torchrun_pipeline_through_inductor():
    out = torchrun(2, "pipeline_check.py", "--model", "gpt", "--schedules", "zb-h1,zb-v", "--compiler", "inductor")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]


def test_torchrun_bad_placement_fails_on_every_rank():
    out = torchrun(2, "failure_check.py", "bad-stages")
    assert out.returncode == 0, out.stderr[-4000:]
    # Both ranks write to the same pipe, so one rank's line may land in the middle of the other's.
    assert sorted(re.findall(r"caught on rank (\d+)", out.stdout)) == ["0", "1"], out.stdout


def test_torchrun_dead_peer_is_an_error_not_a_hang():
    out = torchrun(2, "failure_check.py", "peer-dies", timeout=240)
    assert "caught on rank 0: pipeline peer rank 1 failed" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]
    assert out.returncode == 0 and "terminate called" not in out.stderr, out.stderr[-4000:]  # a clean shutdown


def test_torchrun_a_rank_raising_in_any_zb_exchange_fails_its_peer_within_the_timeout():
    """For every method of the communication module (collectives, control messages, sends and receives), rank 1
    raises inside it and then stays silent; rank 0 raises a ZbError naming rank 1 within the 'timeout' option
    (3 s) plus the rest of its step, not after the process group's default timeout. Runs three at a time."""
    from tests.distributed.failure_check import RAISE_IN, TIMEOUT

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        outs = dict(zip(RAISE_IN, pool.map(lambda m: torchrun(2, "failure_check.py", "raise-in", m, timeout=240),
                                           RAISE_IN)))
    for method, out in outs.items():
        found = re.search(r"caught on rank 0 after ([0-9.]+) s: (.*)", out.stdout)
        assert found, f"{method}: {out.stdout[-2000:]}{out.stderr[-4000:]}"
        assert "rank 1" in found.group(2), f"{method}: {found.group(2)}"
        assert float(found.group(1)) < TIMEOUT + 20, f"{method}: rank 0 took {found.group(1)} s"
        assert f"raised on rank 1: injected failure in DistributedComm.{method}" in out.stdout, method
        assert out.returncode == 0 and "terminate called" not in out.stderr, f"{method}: {out.stderr[-3000:]}"


def test_measured_stage_times_move_the_cuts():
    model, args = models.gpt()
    backend = zb.ZbBackend({"stages": 2, "microbatches": 2}, codegen=False)
    torch.compile(model, backend=backend)(*args)
    (plan,) = backend.plans
    refined = zb.passes.Plan(plan.graph, plan.inputs, plan.example_inputs, plan.num_outputs, True, plan.options,
                             num_stages=2, measured_stage_times=(3.0, 1.0), previous_cuts=plan.cuts)
    zb.passes.partition_stages(refined)
    assert refined.cuts[0] < plan.cuts[0]  # stage 0 measured slower: it gives nodes to stage 1
    even = zb.passes.Plan(plan.graph, plan.inputs, plan.example_inputs, plan.num_outputs, True, plan.options,
                          num_stages=2, measured_stage_times=(1.0, 3.0), previous_cuts=plan.cuts)
    zb.passes.partition_stages(even)
    assert even.cuts[0] > plan.cuts[0]


def _pretend_stage_0_is_slow(monkeypatch):
    """Once a step was measured, stage 0 reads as 3x each other stage (the re-cut then moves work off it)."""
    import zb.adapt
    from zb.runtime.runner import PipelineRunner

    monkeypatch.setattr(zb.adapt, "REBALANCE_ABOVE", 0.0)
    monkeypatch.setattr(PipelineRunner, "stage_times", lambda self: None if self.costs is None else tuple(
        3.0 if s == 0 else 1.0 for s in range(self.program.num_stages)))


def test_rebalanced_pipeline_still_matches_eager(monkeypatch):
    _pretend_stage_0_is_slow(monkeypatch)  # re-cut after the first measured step, always
    torch.manual_seed(0)
    model, args = models.deep_mlp()
    reference = copy.deepcopy(model)
    backend = zb.ZbBackend({"stages": 4, "schedule": "zb-h1", "microbatches": 8, "compiler": "eager",
                            "profile": True, "rebalance": True})
    step = torch.compile(model, backend=backend)
    for i in range(3):
        batch = [a + 0.1 * i for a in args]
        model.zero_grad()
        reference.zero_grad()
        step(*batch).backward()
        reference(*batch).backward()
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            assert_close(p.grad, q.grad, f"step {i} grad of {name}")
    (graph,) = backend.graphs
    assert graph.rebalanced and backend.plans[-1].previous_cuts is not None


@pytest.mark.parametrize("rebalance", [True, False])
def test_the_first_step_is_measured_for_rebalancing_unless_turned_off(monkeypatch, rebalance):
    _pretend_stage_0_is_slow(monkeypatch)
    backend = _two_steps_of_a_two_stage_mlp(rebalance=rebalance)
    assert (backend.plans[-1].previous_cuts is not None) == rebalance  # the second step ran on re-cut stages
    assert bool(backend.graphs[0].rebalanced) == rebalance


def test_no_re_cut_when_it_would_not_speed_up_the_slowest_stage(monkeypatch):
    """Stages within 2% of each other: any other cut only moves the imbalance, so the stages stay."""
    import zb.adapt
    from zb.runtime.runner import PipelineRunner

    monkeypatch.setattr(zb.adapt, "REBALANCE_ABOVE", 0.0)
    monkeypatch.setattr(PipelineRunner, "stage_times", lambda self: None if self.costs is None else (1.0, 1.02))
    backend = _two_steps_of_a_two_stage_mlp(rebalance=True)
    assert backend.graphs[0].rebalanced and backend.plans[-1].previous_cuts is None


def _two_steps_of_a_two_stage_mlp(**options):
    torch.manual_seed(0)
    model, args = models.deep_mlp()
    backend = zb.ZbBackend({"stages": 2, "schedule": "1f1b", "microbatches": 4, "compiler": "eager", **options})
    step = torch.compile(model, backend=backend)
    for _ in range(2):
        step(*args).backward()
    return backend


def test_split_points_for_names_the_cut():
    model, args = models.gpt()
    plan = zb.explain(model, *args, stages=2, split_points=["blocks.1"], microbatches=2)
    assert split_points_for(plan) == ["blocks.1"]


@pytest.mark.parametrize("schedule", ["zb-h1", "zb-v"])
def test_pipeline_inference_runs_forwards_only(schedule):
    model, (idx, _) = models.gpt()
    step = torch.compile(model, backend="zb", options={"stages": 4, "schedule": schedule, "microbatches": 4,
                                                        "compiler": "eager"})
    with torch.no_grad():
        assert_close(step(idx), model(idx), "logits")
    assert all(p.grad is None for p in model.parameters())


def test_record_boundaries_describes_each_boundary():
    model, args = models.gpt()
    plan = zb.explain(model, *args, stages=3, schedule="zb-h1", microbatches=4)
    for before, after in zip(plan.stages, plan.stages[1:]):
        sent = {k: (shape, dtype) for k, shape, dtype in after.receives_forward}
        assert sent and all(k.is_(Kind.ACT) and shape[0] == 2 for k, (shape, _) in sent.items())
        assert set(sent) <= set(zb.passes.plan.output_keys(before.forward))  # it receives what the stage sends
        assert {k for k, _, _ in before.receives_backward} <= set(sent)  # gradients come back for those
    assert "stage 0 -> 1: act:" in plan.summary()


class ResidualToInput(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)

    def forward(self, x, y):
        h = torch.tanh(self.first(x))
        return torch.nn.functional.mse_loss(self.second(h) + x, y)  # x is read again by the second stage


def test_input_gradient_of_an_input_two_stages_read_is_the_sum_of_both():
    model = ResidualToInput()
    reference = copy.deepcopy(model)
    x, y = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16)
    x_ref = x.detach().clone().requires_grad_()
    step = torch.compile(model, backend="zb", options={"stages": 2, "schedule": "1f1b", "microbatches": 2,
                                                        "compiler": "eager", "split_points": ["second"]})
    step(x, y).backward()
    reference(x_ref, y).backward()
    assert_close(x.grad, x_ref.grad, "gradient of x (read by both stages)")


@pytest.mark.parametrize("compiler", ["eager", pytest.param("inductor", marks=pytest.mark.inductor)])
def test_a_cut_after_attention_passes_strided_boundary_values(monkeypatch, compiler):
    """A stage that ends at the attention operator sends its output in the kernel's [B, L, H, D] memory order and
    gets the gradient back in whatever order the next stage made it; each piece takes them in the layout it was
    traced with (codegen/inductor.py: CompiledPiece.layouts), on one rank and across ranks alike."""
    partition = sys.modules["zb.passes.partition_stages"]  # the module (the package exports the pass function)

    def after_attention(plan, compute, n, costs):
        first = next(i for i, node in enumerate(compute) if "zb_attention_site" in node.meta)
        return [first + 1]  # stage 1 begins right after the fused attention

    monkeypatch.setattr(partition, "_balanced_cuts", after_attention)
    train_three_steps(models.gpt, stages=2, schedule="zb-h1", microbatches=2, compiler=compiler)
