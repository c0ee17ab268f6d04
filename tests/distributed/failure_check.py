"""Run under torchrun: failure behaviour of a zb pipeline.

    torchrun --nproc-per-node 2 tests/distributed/failure_check.py bad-stages
    torchrun --nproc-per-node 2 tests/distributed/failure_check.py peer-dies
    torchrun --nproc-per-node 2 tests/distributed/failure_check.py raise-in all_reduce

bad-stages: an impossible placement fails on every rank with the same ZbOptionError, before any communication.
peer-dies: rank 1 exits in the middle of a step; rank 0 raises ZbError naming the failure (within the
'timeout' option) instead of hanging. Each surviving rank prints `caught: <message>`.
raise-in METHOD: rank 1 raises the first time it enters that method of zb's communication module (a collective,
a control message, posting or waiting for boundary tensors) and then stays alive without taking part; rank 0,
waiting for it in the same exchange, must raise a ZbError naming rank 1 within the 'timeout' option (3 s here,
not the process group's default of minutes). Rank 0 prints `caught on rank 0 after <seconds> s: <message>`.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from tests import models  # noqa: E402
from zb import ZbError  # noqa: E402


def main() -> None:
    mode = sys.argv[1]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same model and batch on every rank: a pipeline runs one batch
    model, args = models.deep_mlp()
    if mode == "bad-stages":
        step = torch.compile(model, backend="zb", options={"stages": 3, "compiler": "eager", "microbatches": 4})
        try:
            step(*args)
        except Exception as e:  # noqa: BLE001  (Dynamo wraps errors raised while compiling)
            if "needs 3 ranks, but the process group has 2" not in str(e):
                raise
            print(f"caught on rank {rank}: {type(e).__name__}", flush=True)
            return
        raise SystemExit("no error for stages=3 on 2 ranks")
    if mode == "peer-dies":
        options = {"schedule": "1f1b", "compiler": "eager", "microbatches": 4, "timeout": 20.0}
        step = torch.compile(model, backend="zb", options=options)
        step(*args).backward()  # one healthy step
        if rank == 1:
            os._exit(0)  # dies before the next step's first receive
        try:
            step(*args)
        except ZbError as e:
            print(f"caught on rank {rank}: {e}", flush=True)
            sys.exit(0)  # a normal shutdown, clean after the failure (runtime/comm_threads.py `_settle`)
        raise SystemExit("rank 0 finished a step without its peer")


    if mode == "raise-in":
        raise_in(sys.argv[2], model, args, rank)


TIMEOUT = 3.0
# The options under which each method of DistributedComm is called in the first steps of a 2-stage pipeline.
RAISE_IN = {
    "post": {},  # a batch of boundary tensors' sends and receives
    "arrived": {},  # waiting for a received boundary tensor
    "broadcast": {},  # the loss, from the last stage's rank
    "all_reduce": {"optimizer": "sgd", "post_validation": False},  # the global gradient norm
    "send_control": {"optimizer": "sgd"},  # post-validation's partial norm, from the last rank down
    "all_gather_object": {"profile": True},  # every rank's timings
    "broadcast_object": {"schedule": "zb-auto"},  # rank 0's re-planned schedule after step 2
    "barrier": {"rebalance": True},  # before the measured first step
}


def raise_in(method: str, model, args, rank: int) -> None:
    from zb.runtime.comm import DistributedComm

    options = {"schedule": "1f1b", "compiler": "eager", "microbatches": 4, "timeout": TIMEOUT, **RAISE_IN[method]}
    if options.get("optimizer") == "sgd":
        options["optimizer"] = torch.optim.SGD(model.parameters(), lr=0.01)
    if rank == 1:
        def injected(*_, **__):
            raise RuntimeError(f"injected failure in DistributedComm.{method}")

        setattr(DistributedComm, method, injected)
    step = torch.compile(model, backend="zb", options=options)
    for _ in range(4):
        start = time.perf_counter()
        try:
            loss = step(*args)
            if "optimizer" not in options:
                loss.backward()
        except ZbError as e:
            print(f"caught on rank {rank} after {time.perf_counter() - start:.1f} s: {e}", flush=True)
            sys.exit(0)  # a normal shutdown, clean after the failure (runtime/comm_threads.py `_settle`)
        except RuntimeError as e:
            if rank != 1 or "injected failure" not in str(e):
                raise
            print(f"raised on rank 1: {e}", flush=True)
            time.sleep(TIMEOUT + 6)  # alive but silent: rank 0 must give up by its own timeout
            os._exit(0)
    raise SystemExit(f"rank {rank} finished every step though rank 1 raised in {method}")


if __name__ == "__main__":
    main()
