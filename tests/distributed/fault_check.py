"""Run on 2 ranks (tests.test_pipeline.launch, or torchrun): inject one fault into a zb pipeline and report how
every rank learns of it.

    python tests/distributed/fault_check.py MODE [--rank K]

MODE is where rank K (default 1) fails, in the second training step of a 2-stage MLP (zb-h1, 4 microbatches):
  F, B, W      an exception inside that piece (forward, input gradient, weight gradient)
  update       an exception while the fused optimizer update is applied (options["optimizer"])
  rollback     an exception while post-validation rolls an optimistic update back (max_grad_norm between rank
               1's own gradient norm and the global one: rank 1 updates at once and rolls back in the next
               step's warm-up, so steps 2 and 3 are the failing call)
  migrate      an exception while parameters move between ranks after a re-cut (rebalance=True, the stages
               re-cut after the first step: that step is the failing call)
  killed       the process exits in the middle of the forward
  stalled      the process stops answering (sleeps) in the middle of the forward: the timeout path
  mismatched   its batch differs from its peer's
  short-batch  its batch has 6 rows, which 4 microbatches do not divide (a data loader's last batch)
  checkpoint   an exception after it wrote its shard of a checkpoint (zb.save_checkpoint after the second step,
               a good one saved after the first): the write is interrupted mid-way, and `state` means the previous
               checkpoint still loads, with the first step's count and values

The failing rank prints `injected at TIME` (time.time()) at the fault. Every surviving rank prints one line
    fault MODE rank R error ERRORTYPE after SECONDS s at TIME: MESSAGE
then calls the pipeline again and prints
    next MODE rank R ERRORTYPE after SECONDS s
and `state MODE rank R intact` if the parameters and their .grad are as the last completed step left them; when
the next call refused, a second model compiled on the same process group is called too: `another MODE rank R
RESULT`. Then it destroys the process group, prints `exit MODE rank R` and exits normally (exit code 0): the
shutdown must not abort on the abandoned step's operations.
The timeout option is 60 s (4 s for `stalled`), so an error within a few seconds came through zb's failure key
(runtime/comm.py `Failures`), not through the timeout.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import shutil
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import zb  # noqa: E402
from tests import models  # noqa: E402

MODES = ("F", "B", "W", "update", "rollback", "migrate", "killed", "stalled", "mismatched", "short-batch",
         "checkpoint")
PIECES = {"F": "forward", "B": "backward_input", "W": "backward_weight"}
STALLED_TIMEOUT = 4.0


class Injected(RuntimeError):
    pass


def injected() -> None:
    """The moment of the fault, on the clock every rank of this machine shares."""
    sys.stdout.write(f"injected at {time.time():.3f}\n")
    sys.stdout.flush()


def inject(mode: str, armed: list[bool]) -> None:
    """Patch the place where `mode` fails; it fires only while armed[0] is set."""
    from zb.runtime.executor import StepExecutor
    from zb.runtime.optimizer import OptimizerStep

    def fail(where: str):
        injected()
        if mode == "killed":
            os._exit(3)
        if mode == "stalled":
            time.sleep(STALLED_TIMEOUT * 4)
            os._exit(0)
        raise Injected(f"injected failure in {where}")

    if mode in PIECES or mode in ("killed", "stalled"):
        original = StepExecutor._run
        piece = PIECES.get(mode, "forward")

        def run(self, s, mb, name):
            if armed[0] and name == piece and mb == 1:
                fail(f"stage {s} {name} of microbatch {mb}")
            return original(self, s, mb, name)

        StepExecutor._run = run
    elif mode in ("update", "rollback"):
        method = "_apply" if mode == "update" else "_restore"
        original = getattr(OptimizerStep, method)

        def patched(self, *args, **kwargs):
            if armed[0]:
                fail(f"the optimizer's {method}")
            return original(self, *args, **kwargs)

        setattr(OptimizerStep, method, patched)
    elif mode == "migrate":
        import zb.adapt

        original = zb.adapt.migrate

        def migrate(*args, **kwargs):
            if armed[0]:
                fail("parameter migration")
            return original(*args, **kwargs)

        zb.adapt.migrate = migrate
    elif mode == "checkpoint":
        from torch.distributed.checkpoint import FileSystemWriter

        original = FileSystemWriter.write_data

        def write_data(self, plan, planner):
            written = original(self, plan, planner)  # this rank's shard is on disk; the rest never comes
            if armed[0]:
                fail("writing its checkpoint shard")
            return written

        FileSystemWriter.write_data = write_data


def between_norms(model, args, options: dict) -> float:
    """A max_grad_norm between rank 1's own gradient norm and the global one: rank 1 (the last, which knows only
    its own norm when its stage is done) updates optimistically, and rolls back once rank 0's global norm says
    clip, in the next step's warm-up."""
    import copy
    import math

    from zb.codegen import build_program
    from zb.pipeline import Pipeline

    plan = zb.explain(model, *args, **{k: v for k, v in options.items() if k != "optimizer"})
    read = build_program(plan, {}).readers(Pipeline(plan.options).schedule_for(True).placement)
    mine = {spec.name for i, spec in enumerate(plan.inputs) if spec.kind == "parameter" and 1 in read.get(i, ())}
    reference = copy.deepcopy(model)
    reference(*args).backward()
    squares = {n: float(p.grad.square().sum()) for n, p in reference.named_parameters()}
    return (math.sqrt(sum(v for n, v in squares.items() if n in mine)) + math.sqrt(sum(squares.values()))) / 2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("--rank", type=int, default=None)
    a = parser.parse_args()
    if a.rank is None:
        a.rank = 1
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model, args = models.deep_mlp()
    options = {"schedule": "zb-h1", "compiler": "eager", "microbatches": 4,
               "timeout": STALLED_TIMEOUT if a.mode == "stalled" else 60.0}
    if a.mode in ("update", "rollback"):
        options["optimizer"] = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        if a.mode == "rollback":
            options["max_grad_norm"] = between_norms(model, args, options)
    if a.mode == "migrate":
        from tests.distributed.pipeline_check import force_recut

        options["rebalance"] = True
        force_recut()
    armed = [False]
    if rank == a.rank:
        inject(a.mode, armed)
    step = torch.compile(model, backend="zb", options=options)

    def one_step(batch):
        loss = step(*batch)
        if "optimizer" not in options:
            loss.backward()

    if a.mode != "migrate":  # a re-cut (and its migration) comes right after the first step: that one fails
        one_step(args)  # a healthy first step
    saved = pathlib.Path(f"/tmp/zb-fault-{os.environ['MASTER_PORT']}") / "checkpoint"
    if a.mode == "checkpoint":
        zb.save_checkpoint(saved, model)
    dist.barrier()
    kept = {n: (p.detach().clone(), None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()
            if not zb.runtime.released.is_released(p)}
    batch = list(args)
    if rank == a.rank:
        armed[0] = True
        if a.mode == "mismatched":
            batch = [t + 1 if t.is_floating_point() else t for t in batch]
        elif a.mode == "short-batch":
            batch = [t[:6] for t in batch]
        if a.mode in ("mismatched", "short-batch"):
            injected()
    start = time.perf_counter()
    try:
        one_step(batch)
        if a.mode == "rollback":
            one_step(list(args))
        if a.mode == "checkpoint":
            zb.save_checkpoint(saved, model)
    except Exception as e:  # noqa: BLE001  (what every rank raises is the point)
        seconds = time.perf_counter() - start
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        sys.stdout.write(f"fault {a.mode} rank {rank} error {type(e).__name__} after {seconds:.2f} s at "
                         f"{time.time():.3f}: {first}\n")
    else:
        sys.stdout.write(f"fault {a.mode} rank {rank} no error\n")
    sys.stdout.flush()
    if a.mode == "migrate" or "optimizer" in options:
        pass  # a re-cut or an optimizer step changes parameters by design before the fault: not compared
    elif a.mode == "checkpoint":  # the previous checkpoint loads: the first step's, with its values
        from zb.checkpoint import read_manifest

        fresh = models.deep_mlp()[0]
        zb.load_checkpoint(saved, fresh)
        step_count = read_manifest(saved)["step"]
        values = dict(fresh.named_parameters())
        if step_count == 1 and all(torch.equal(values[n].detach(), kept[n][0]) for n in kept):
            sys.stdout.write(f"state {a.mode} rank {rank} intact\n")
    else:
        intact = all(torch.equal(p.detach(), kept[n][0]) and (
            (p.grad is None) == (kept[n][1] is None) and (p.grad is None or torch.equal(p.grad, kept[n][1])))
            for n, p in model.named_parameters() if n in kept)
        if intact:
            sys.stdout.write(f"state {a.mode} rank {rank} intact\n")
    armed[0] = False
    start = time.perf_counter()
    try:
        one_step(list(args))
        sys.stdout.write(f"next {a.mode} rank {rank} ran\n")
        sys.stdout.flush()
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=20))  # the last sends land before exiting
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        sys.stdout.write(f"next {a.mode} rank {rank} {type(e).__name__} after {time.perf_counter() - start:.2f} s: "
                         f"{first}\n")
        # Another compiled model on the same process group refuses too: the abandoned step's operations are there.
        torch._dynamo.reset()
        other, other_args = models.mlp()
        try:
            loss = torch.compile(other, backend="zb", options={"compiler": "eager", "timeout": 60.0})(*other_args)
            loss.backward()
            sys.stdout.write(f"another {a.mode} rank {rank} ran\n")
        except Exception as e:  # noqa: BLE001
            sys.stdout.write(f"another {a.mode} rank {rank} {type(e).__name__}\n")
    sys.stdout.flush()
    if a.mode == "checkpoint" and rank == 0:
        shutil.rmtree(saved.parent, ignore_errors=True)
    # and a normal exit: nothing may abort in the shutdown (runtime/comm_threads.py `_settle`)
    dist.destroy_process_group()
    sys.stdout.write(f"exit {a.mode} rank {rank}\n")
    sys.stdout.flush()


def parse(stdout: str) -> dict[int, dict]:
    """Per rank, from a run's output: error type, seconds and message of the failing call (None if it returned),
    seconds from the fault to that error (`after_fault`), the next call's result ("ran" or the error type) and
    seconds, and whether the state was intact."""
    ranks: dict[int, dict] = {}
    times = [float(line.split()[2]) for line in stdout.splitlines() if line.startswith("injected at ")]
    fault = min(times) if times else None
    for line in stdout.splitlines():
        words = line.split()
        if len(words) < 4 or words[0] not in ("fault", "next", "state", "another") or words[2] != "rank":
            continue
        entry = ranks.setdefault(int(words[3]), {"error": None, "seconds": None, "message": "", "next": None,
                                                 "next_seconds": None, "intact": False, "after_fault": None,
                                                 "another": None})
        if words[0] == "fault" and words[4] == "error":
            entry["error"], entry["seconds"] = words[5], float(words[7])
            entry["after_fault"] = float(words[10].rstrip(":")) - fault if fault is not None else None
            entry["message"] = line.split(": ", 1)[1] if ": " in line else ""
        elif words[0] == "next":
            entry["next"] = words[4]
            entry["next_seconds"] = float(words[6]) if words[4] != "ran" else None
        elif words[0] == "state":
            entry["intact"] = True
        elif words[0] == "another":
            entry["another"] = words[4]
    return ranks


if __name__ == "__main__":
    main()
