"""Run under torchrun: train with zb over the process group and compare with single-process eager training.

    torchrun --nproc-per-node 2 tests/distributed/pipeline_check.py --model gpt --schedules 1f1b,zb-h1

For each schedule: 3 optimizer steps on the same data; every step's loss must equal the eager reference's, and
afterwards every parameter (and the gradient of each parameter this rank owns) must equal the reference's within
rtol 1e-5 (parameters of other ranks' stages get no gradient on this rank, so they are not stepped here).
Each rank computes the reference itself. Prints one `ok <schedule>` line per schedule on rank 0;
exits non-zero with the first difference otherwise.
"""

from __future__ import annotations

import argparse
import copy
import os
import pathlib
import sys

import torch
import torch.distributed as dist

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import zb  # noqa: E402
from tests import models  # noqa: E402
from zb.pipeline import Pipeline  # noqa: E402
from zb.adapt import moves  # noqa: E402
from zb.codegen import build_program  # noqa: E402
from zb.runtime.released import is_released  # noqa: E402
from zb.schedules import SCHEDULES  # noqa: E402

FACTORIES = {"gpt": models.gpt, "mlp": models.deep_mlp}


def check(schedule: str, factory, microbatches: int, compiler: str, rank: int, recut: bool = False) -> tuple:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, args = factory()
    reference = copy.deepcopy(model)
    options = {"schedule": schedule, "microbatches": microbatches, "compiler": compiler, "timeout": 120.0,
               "rebalance": recut}
    backend = zb.ZbBackend(options)
    if recut:
        before = scramble_unread_parameters(model, args, options, rank)
    step = torch.compile(model, backend=backend)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, reference)]
    for i in range(3):
        torch.manual_seed(100 + i)
        batch = [a + 0 if not a.is_floating_point() else torch.randn_like(a) for a in args] if i else list(args)
        loss = step(*batch)
        loss.backward()
        expected = reference(*batch)
        expected.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, i=i: f"{schedule}: loss of step {i} on rank {rank}: {m}")
        owned = {n for n, p in model.named_parameters() if p.grad is not None}
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, owned)
        missing = {n for n, _ in model.named_parameters()} - set().union(*everyone)
        if missing:
            raise AssertionError(f"{schedule}: no rank got a gradient for {sorted(missing)}")
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            if name in owned:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6,
                                           msg=lambda m, n=name: f"{schedule}: grad of {n} on rank {rank}: {m}")
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
    if recut:
        after = backend.plans[-1]
        if after.cuts == before.cuts:
            raise AssertionError(f"{schedule}: the stages were not re-cut (cuts {after.cuts})")
        placement = backend.runners[0].schedule.placement
        moved = moves(build_program(before, {}), placement, build_program(after, {}), placement)
        if not moved:
            raise AssertionError(f"{schedule}: the re-cut {before.cuts} -> {after.cuts} moved no parameter")
        # Option release (on by default) with the re-cut: each rank holds exactly what its new stages read.
        read = build_program(after, {}).readers(placement)
        parameters = dict(model.named_parameters())
        wrong = [spec.name for index, spec in enumerate(after.inputs) if spec.kind == "parameter"
                 and is_released(parameters[spec.name]) != (rank not in read.get(index, set()))]
        if wrong:
            raise AssertionError(f"{schedule}: after the re-cut rank {rank} holds what it does not read or lacks "
                                 f"what it reads: {wrong}")
    # Parameters of other ranks' stages get no gradient here, so this rank's optimizer leaves them alone.
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if name in owned:
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6,
                                       msg=lambda m, n=name: f"{schedule}: {n} after 3 steps on rank {rank}: {m}")
    return backend.runners[-1].schedule.placement


def scramble_unread_parameters(model, args, options: dict, rank: int):
    """Overwrite, on this rank, every parameter its stages do not read before the re-cut: a rank that gains a
    stage part must then get the values from the rank that had it, or training goes wrong. Returns the plan."""
    plan = zb.explain(model, *args, **{**options, "compiler": "eager"})
    placement = Pipeline(plan.options).schedule_for(True).placement
    read = build_program(plan, {}).readers(placement)
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for index, spec in enumerate(plan.inputs):
            if spec.kind == "parameter" and rank not in read.get(index, set()):
                parameters[spec.name].normal_(mean=3.0)
    return plan


def force_recut() -> None:
    """Re-cut after the first step whatever it measured, as if stage 0 took three times as long as each other
    stage: stage 0 gives operations (and parameters) to stage 1, on the other rank."""
    import zb.adapt
    from zb.runtime.runner import PipelineRunner

    zb.adapt.REBALANCE_ABOVE = 0.0
    zb.adapt.RECUT_GAIN = -1.0
    PipelineRunner.stage_times = lambda self: None if self.costs is None else tuple(
        3.0 if s == 0 else 1.0 for s in range(self.program.num_stages))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=sorted(FACTORIES), default="gpt")
    parser.add_argument("--schedules", default=",".join(SCHEDULES))
    parser.add_argument("--compiler", default="eager")
    parser.add_argument("--microbatches", type=int, default=None, help="default: 2 x the world size")
    parser.add_argument("--recut", action="store_true", help="re-cut the stages after the first step (moving "
                        "parameters between ranks) and check that training still equals eager")
    args = parser.parse_args()
    if args.recut:
        force_recut()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    microbatches = args.microbatches or 2 * world
    for schedule in args.schedules.split(","):
        placement = check(schedule, FACTORIES[args.model], microbatches, args.compiler, rank, args.recut)
        dist.barrier()
        if rank == 0:
            print(f"ok {schedule} ({args.model}, {world} ranks, {microbatches} microbatches, placement {placement}"
                  f"{', re-cut after step 1' if args.recut else ''})", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("ZB_VERIFY", "1")
    main()
