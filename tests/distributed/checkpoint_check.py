"""Run under torchrun (or alone): train, save and resume with zb.save_checkpoint / zb.load_checkpoint.

    torchrun --nproc-per-node 2 tests/distributed/checkpoint_check.py --schedule zb-h1 --steps 6 --save-at 3 \
        --save DIR --out RESULT.pt
    torchrun --nproc-per-node 2 tests/distributed/checkpoint_check.py --schedule 1f1b --load DIR --steps 6 \
        --out RESULT.pt

Trains the GPT tiny (tied head) with SGD (momentum) for steps [start, --steps), the batch of step i drawn from a
generator seeded with i, so a resumed run sees the batches the uninterrupted one saw (with --replicas D,
replica d takes its D-th of those rows). --save-at K saves after step K (a list: 2,4); --load DIR loads before
the first step and starts at the checkpoint's step. --inside runs the optimizer inside zb (options["optimizer"],
post-validation, max_grad_norm; --shard shards its state over the replicas). --die-in-save makes the last rank
exit in the middle of writing the last checkpoint (the others must fail within the timeout, and the previous
checkpoint stay loadable). On a pipeline rank, model.state_dict() must hold only the rank's own, current entries.
Rank 0 writes RESULT.pt: {"losses": {step: loss}, "state": the full model state dict at the end, "start": step}.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

import torch
import torch.distributed as dist

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import zb  # noqa: E402
from tests import models  # noqa: E402


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    return tuple(torch.randint(0, 256, (models.BATCH, 16), generator=generator) for _ in range(2))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--schedule", default="zb-h1")
    parser.add_argument("--stages", type=int, default=None)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--save-at", default="", help="steps after which to save, e.g. 2,4")
    parser.add_argument("--save", default=None)
    parser.add_argument("--load", default=None)
    parser.add_argument("--inside", action="store_true")
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    parser.add_argument("--die-in-save", action="store_true")
    parser.add_argument("--replicas", type=int, default=1, help="data-parallel replicas (each takes its rows)")
    parser.add_argument("--shard", action="store_true", help="shard_optimizer (with --inside and --replicas)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    torch.manual_seed(0)
    model, _ = models.gpt()
    optimizer = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9) if args.optimizer == "sgd"
                 else torch.optim.AdamW(model.parameters(), lr=1e-2))
    options = {"schedule": args.schedule, "microbatches": 4, "compiler": "eager", "timeout": 30.0}
    if args.stages:
        options["stages"] = args.stages
    if args.inside:
        options.update(optimizer=optimizer, max_grad_norm=1.0, shard_optimizer=args.shard)
    if args.replicas > 1:
        options["data_parallel"] = args.replicas
    replica = rank // ((dist.get_world_size() if distributed else 1) // args.replicas) if distributed else 0
    step_fn = torch.compile(model, backend="zb", options=options)
    start = 0
    if args.load:
        start = zb.load_checkpoint(args.load, model, optimizer)["step"]
    losses = {}
    for step in range(start, args.steps):
        rows = batch(step)
        if distributed and args.replicas > 1:  # this replica's part of the global batch
            rows = [r.chunk(args.replicas)[replica] for r in rows]
        loss = step_fn(*rows)
        if not args.inside:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses[step] = loss.item()
        saves = [int(k) for k in args.save_at.split(",") if k]
        if step + 1 in saves:
            if args.die_in_save and step + 1 == saves[-1]:
                die_in_the_middle_of_writing(rank)
            zb.save_checkpoint(args.save, model, optimizer, step=step + 1)
    zb.synchronize(optimizer)
    state = zb.full_state_dict(model)
    own = model.state_dict()  # on a pipeline rank: only what this rank's stages own, never stale values
    if distributed and dist.get_world_size() // args.replicas > 1:
        assert 0 < len(own) < len(state), f"rank {rank}: model.state_dict() has {len(own)} of {len(state)} entries"
    for key, value in own.items():
        assert torch.equal(value, state[key]), f"rank {rank}: model.state_dict()[{key!r}] is stale"
    if rank == 0:
        torch.save({"losses": losses, "state": state, "start": start,
                    "optimizer": zb.full_optimizer_state_dict(optimizer)["state"] if not distributed else None},
                   args.out)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


def die_in_the_middle_of_writing(rank: int) -> None:
    """The last rank exits once it has written part of its data: a crash during the save."""
    from torch.distributed.checkpoint import FileSystemWriter

    if rank != dist.get_world_size() - 1:
        return
    original = FileSystemWriter.write_data

    def write_then_die(self, plan, planner):
        original(self, plan, planner)
        os._exit(1)

    FileSystemWriter.write_data = write_then_die


if __name__ == "__main__":
    main()
