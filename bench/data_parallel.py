"""Step time of 2 replicas x 2 pipeline ranks: zb's data parallelism vs torch.distributed.pipelining + DDP.

    OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc-per-node 4 bench/data_parallel.py [--steps 8] [--compiler inductor]

One model (the example GPT, `small` preset, untied head as in bench/pipeline.py), one global batch, the same
microbatches per replica, in one run. Global rank g is pipeline rank g % 2 of replica g // 2, and each rank is
handed its replica's half of the global batch, as a data loader sharded by replica would.

- zb: torch.compile(model, backend="zb", options={"data_parallel": 2, ...}) with schedules 1f1b, zb-h1 and
  zb-auto; loss.backward() (gradients summed over the replicas inside the schedule) and torch.optim.SGD outside.
- torch: bench/pipeline.py's hand-cut `Part` stages, each wrapped in DistributedDataParallel over its replica
  group, under Schedule1F1B; the (dp, pp) groups come from init_device_mesh("cpu", (2, 2)). It is the baseline.
- zb with options["optimizer"] = AdamW (the call is the whole step), optimizer state unsharded and sharded over
  the replicas (shard_optimizer): their step time, and the bytes of optimizer.state on each rank after one step.

Before timing, the first step's global loss of every configuration (same weights, same batch) must equal
torch's within 1e-4: the table compares one computation. Every configuration takes 3 warm-up steps, then one
step each, round after round; each ratio is the median over --steps rounds of that round's ratio to torch
(bench/pipeline.py's method). The configurations differ in the update they run (SGD outside, AdamW inside).
Caveat: 4 processes on a 2-core machine oversubscribe the CPU (each runs at about half speed, and the OS
decides who waits), so absolute times are inflated and move 10-30% between runs: compare within one run.
Prints two tables on rank 0.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench.pipeline import WARMUP, Part, loss_fn, one_step, ratio, timed_together  # noqa: E402
from examples.gpt import GPT, PRESETS  # noqa: E402

REPLICAS, STAGES = 2, 2
TIMEOUT = 120.0  # seconds zb waits for a peer rank: a stuck rank fails the run instead of hanging it
LOSS_TOLERANCE = 1e-4
BASELINE = "torch PP+DDP Schedule1F1B"


def torch_pp_ddp(config, x, y, microbatches: int, mesh):
    """One torch training step: this rank's stage, DDP over its replica group, 1F1B over its pipeline group.
    The stage holds DDP back (no_sync) until the last microbatch's backward, which all-reduces the gradients."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B
    from torch.nn.parallel import DistributedDataParallel

    stage_index = mesh["pp"].get_local_rank()
    torch.manual_seed(0)
    model = GPT(config)
    per = config.n_layer // STAGES
    part = Part(model, slice(stage_index * per, (stage_index + 1) * per), stage_index == 0,
                stage_index == STAGES - 1)
    ddp = DistributedDataParallel(part, process_group=mesh["dp"].get_group())
    stage = PipelineStage(ddp, stage_index, STAGES, torch.device("cpu"), group=mesh["pp"].get_group())
    schedule = Schedule1F1B(stage, microbatches, loss_fn=loss_fn)  # loss_fn is a mean, as DDP's average needs
    optimizer = torch.optim.SGD(ddp.parameters(), lr=1e-3)

    def step():
        losses: list = []
        schedule.step(*((x,) if stage.is_first else ()), target=y if stage.is_last else None, losses=losses)
        optimizer.step()
        optimizer.zero_grad()
        # the replica's loss (mean of its microbatches' means) on the last stage; every replica's share of the
        # global mean elsewhere is 0, so a sum over all ranks of loss / REPLICAS is the global loss
        return torch.stack(losses).mean().detach() / REPLICAS if losses else torch.zeros(())

    return step, optimizer


def zb_step(schedule: str, config, x, y, microbatches: int, compiler: str, adamw_shard: bool | None = None):
    """One zb training step; with adamw_shard None, loss.backward() and SGD outside as a user writes it, else
    options["optimizer"] = AdamW (the call is the whole step) with shard_optimizer = adamw_shard."""
    torch.manual_seed(0)
    model = GPT(config)
    options = {"schedule": schedule, "microbatches": microbatches, "compiler": compiler,
               "data_parallel": REPLICAS, "timeout": TIMEOUT}
    if adamw_shard is None:
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        options.update(optimizer=optimizer, shard_optimizer=adamw_shard)
    step_fn = torch.compile(model, backend="zb", options=options)

    def step():
        loss = step_fn(x, y)  # the global loss, on every rank
        if adamw_shard is None:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        # every rank's share of a sum over all ranks, as torch's step returns it
        return loss.detach() / dist.get_world_size()

    return step, optimizer


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.nbytes for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="timed rounds (one step per configuration each)")
    parser.add_argument("--batch", type=int, default=32, help="global batch (rows); each replica gets half")
    parser.add_argument("--microbatches", type=int, default=4, help="microbatches per replica")
    parser.add_argument("--compiler", default="inductor", choices=["inductor", "eager"])
    parser.add_argument("--preset", default="small")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch._dynamo.config.recompile_limit = 64  # one compiled GPT per zb configuration, all alive at once
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != REPLICAS * STAGES:
        raise SystemExit(f"run under torchrun --nproc-per-node {REPLICAS * STAGES}, not {world}")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (REPLICAS, STAGES), mesh_dim_names=("dp", "pp"))
    replica = mesh["dp"].get_local_rank()
    config = PRESETS[args.preset].with_(tie_weights=False)
    torch.manual_seed(1)
    x = torch.randint(0, config.vocab_size, (args.batch, config.block_size)).chunk(REPLICAS)[replica]
    y = torch.randint(0, config.vocab_size, (args.batch, config.block_size)).chunk(REPLICAS)[replica]

    steps = {BASELINE: torch_pp_ddp(config, x, y, args.microbatches, mesh)}
    for schedule in ("1f1b", "zb-h1", "zb-auto"):
        steps[f"zb {schedule}, SGD outside"] = zb_step(schedule, config, x, y, args.microbatches, args.compiler)
    for shard in (False, True):
        steps[f"zb zb-h1, AdamW inside, shard_optimizer={shard}"] = zb_step(
            "zb-h1", config, x, y, args.microbatches, args.compiler, adamw_shard=shard)
    first_loss, opt_bytes = {}, {}
    for name, (step, optimizer) in steps.items():  # compile, re-plan, warm caches
        loss = step()
        dist.all_reduce(loss)
        first_loss[name] = loss.item()
        opt_bytes[name] = [None] * world
        dist.all_gather_object(opt_bytes[name], state_bytes(optimizer))
        for _ in range(WARMUP - 1):
            one_step(step)
        if rank == 0:
            print(f"warmed up {name}", file=sys.stderr, flush=True)
    times = timed_together({name: step for name, (step, _) in steps.items()}, args.steps)
    medians = {name: statistics.median(values) for name, values in times.items()}
    worst = max(abs(loss - first_loss[BASELINE]) for loss in first_loss.values())
    if rank == 0:
        print(f"GPT {args.preset} (untied), global batch {args.batch} x {config.block_size}, {REPLICAS} replicas x "
              f"{STAGES} pipeline ranks, {args.microbatches} microbatches per replica, 1 thread per rank on "
              f"{os.cpu_count()} cores, zb compiler {args.compiler}, torch {torch.__version__}, {args.steps} rounds")
        print("first step's global loss (same weights, same batch): "
              + ", ".join(f"{name} {loss:.7f}" for name, loss in first_loss.items())
              + f"; largest difference to torch {worst:.1e} (tolerance {LOSS_TOLERANCE:g})")
        print(f"\n| configuration | step (ms, median) | vs {BASELINE} |\n|---|---:|---:|")
        for name, t in ((n, t) for n, t in medians.items() if "AdamW" not in n):
            print(f"| {name} | {t * 1e3:.1f} | {ratio(times[name], times[BASELINE]):.2f}x |")
        print("\n| zb zb-h1, AdamW inside | optimizer state per rank (bytes, ranks 0-3) | total | step (ms, median) "
              f"| vs {BASELINE} |\n|---|---|---:|---:|---:|")
        for name in (n for n in steps if "AdamW" in n):
            print(f"| {name.split(', ')[-1]} | {', '.join(str(b) for b in opt_bytes[name])} | "
                  f"{sum(opt_bytes[name])} | {medians[name] * 1e3:.1f} | "
                  f"{ratio(times[name], times[BASELINE]):.2f}x |")
    dist.destroy_process_group()
    if worst > LOSS_TOLERANCE:
        raise SystemExit(f"rank {rank}: the first step's losses differ by {worst:.2e} > {LOSS_TOLERANCE:g}: the "
                         "configurations do not compute the same thing")


if __name__ == "__main__":
    cache = pathlib.Path(__file__).resolve().parents[1] / ".cache" / "inductor"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache))
    main()
