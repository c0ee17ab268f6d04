"""Run under torchrun: failure behaviour of a zb pipeline.

    torchrun --nproc-per-node 2 tests/distributed/failure_check.py bad-stages
    torchrun --nproc-per-node 2 tests/distributed/failure_check.py peer-dies

bad-stages: an impossible placement fails on every rank with the same ZbOptionError, before any communication.
peer-dies: rank 1 exits in the middle of a step; rank 0 raises ZbError naming the failure (within the
'timeout' option) instead of hanging. Each surviving rank prints `caught: <message>`.
"""

from __future__ import annotations

import os
import pathlib
import sys

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
            os._exit(0)  # the group is broken: skip its shutdown
        raise SystemExit("rank 0 finished a step without its peer")


if __name__ == "__main__":
    main()
