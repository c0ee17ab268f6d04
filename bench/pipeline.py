"""Step time of a 2-rank pipeline: zb's schedules vs torch.distributed.pipelining, and vs one process.

    OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc-per-node 2 bench/pipeline.py [--steps 10] [--compiler inductor]

One model (the example GPT, `small` preset, untied head so torch's stages need no weight sync), one batch,
the same microbatches, one thread per rank, in one run. torch.distributed.pipelining gets hand-cut stage modules:
two stages for Schedule1F1B, four (two per rank) for ScheduleInterleavedZeroBubble and, in a V, for
ScheduleZBVZeroBubble. The reference is single-process eager PyTorch on one thread (measured on rank 0 while
rank 1 waits): a perfect 2-rank pipeline takes half its time. Every configuration first takes 3 warm-up steps
(zb compiles, re-cuts and re-plans there); then the configurations take one step each, round after round (a
slow spell of the machine falls on all of them alike), and each ratio is the median over --steps rounds of that
round's ratio (the machine's speed may drift between rounds).
Prints a table on rank 0. With --profile, zb's steps are traced (profile=True; the trace's all-gather adds to
their step time) and a second table gives each rank's busy and idle time in the last step.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from examples.gpt import GPT, PRESETS  # noqa: E402
from zb.passes.partition_stages import split_points_for  # noqa: E402
from zb.schedules import SCHEDULES  # noqa: E402

WARMUP = 3
TORCH_SCHEDULES = ("Schedule1F1B", "ScheduleInterleavedZeroBubble", "ScheduleZBVZeroBubble")


class Part(nn.Module):
    """Layers [first, last) of the GPT as one pipeline stage for torch.distributed.pipelining."""

    def __init__(self, model: GPT, blocks: slice, first: bool, last: bool):
        super().__init__()
        self.first, self.last = first, last
        self.tok_emb, self.pos_emb = (model.tok_emb, model.pos_emb) if first else (None, None)
        self.blocks = nn.ModuleList(model.blocks[blocks])
        self.ln_f, self.head = (model.ln_f, model.head) if last else (None, None)

    def forward(self, x):
        if self.first:
            x = self.tok_emb(x) + self.pos_emb(torch.arange(x.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x)) if self.last else x


def loss_fn(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def one_step(step) -> float:
    dist.barrier()
    start = time.perf_counter()
    step()
    dist.barrier()
    return time.perf_counter() - start


def timed_together(steps: dict, rounds: int) -> dict:
    """Each configuration's step times, its steps interleaved round by round: a slow spell of the machine (common
    on shared cores) then falls on every configuration alike instead of on whichever ran at the time."""
    times: dict = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name].append(one_step(step))
    return times


def ratio(times: list[float], baseline: list[float]) -> float:
    """Median over rounds of one round's time against the baseline's time in the same round: robust to the
    machine's speed drifting between rounds, which a ratio of two medians is not."""
    return statistics.median(t / b for t, b in zip(times, baseline))


def torch_pipelining(kind: str, config, x, y, microbatches: int, rank: int) -> float:
    from torch.distributed.pipelining import (
        PipelineStage, Schedule1F1B, ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble,
    )

    torch.manual_seed(0)
    model = GPT(config)
    n = 2 if kind == "Schedule1F1B" else 4
    per = config.n_layer // n
    placement = {"Schedule1F1B": [0, 1], "ScheduleInterleavedZeroBubble": [0, 1, 0, 1],
                 "ScheduleZBVZeroBubble": [0, 1, 1, 0]}[kind]
    parts = {s: Part(model, slice(s * per, (s + 1) * per), s == 0, s == n - 1) for s in range(n)}
    stages = [PipelineStage(parts[s], s, n, torch.device("cpu")) for s in range(n) if placement[s] == rank]
    cls = {"Schedule1F1B": Schedule1F1B, "ScheduleInterleavedZeroBubble": ScheduleInterleavedZeroBubble,
           "ScheduleZBVZeroBubble": ScheduleZBVZeroBubble}[kind]
    schedule = cls(stages[0] if kind == "Schedule1F1B" else stages, microbatches, loss_fn=loss_fn)
    has_first = any(s.is_first for s in stages)
    has_last = any(s.is_last for s in stages)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        schedule.step(*((x,) if has_first else ()), target=y if has_last else None)
        optimizer.step()
        optimizer.zero_grad()

    return step


def zb_step(schedule: str, config, x, y, microbatches: int, compiler: str, backends: dict, profile: bool):
    import zb

    torch.manual_seed(0)
    model = GPT(config)
    backend = backends[schedule] = zb.ZbBackend({"schedule": schedule, "microbatches": microbatches,
                                                 "compiler": compiler, "profile": profile})
    step_fn = torch.compile(model, backend=backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        step_fn(x, y).backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--compiler", default="inductor", choices=["inductor", "eager"])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--profile", action="store_true", help="trace zb's steps; print busy/idle time per rank")
    parser.add_argument("--verbose", action="store_true", help="log zb's decisions (re-cuts, re-plans)")
    parser.add_argument("--torch-schedules", default=",".join(TORCH_SCHEDULES),
                        help="torch.distributed.pipelining schedules to time (comma-separated)")
    parser.add_argument("--schedules", default=",".join(SCHEDULES), help="zb schedules to time (comma-separated)")
    args = parser.parse_args()
    unknown = [k for k in args.torch_schedules.split(",") if k not in TORCH_SCHEDULES]
    unknown += [k for k in args.schedules.split(",") if k not in SCHEDULES]
    if unknown:
        parser.error(f"unknown schedule(s) {unknown}; torch: {', '.join(TORCH_SCHEDULES)}; zb: {', '.join(SCHEDULES)}")
    if args.verbose:
        logging.basicConfig(format="%(name)s: %(message)s")
        logging.getLogger("zb").setLevel(logging.INFO)
    torch.set_num_threads(1)
    torch._dynamo.config.recompile_limit = 64  # one compiled GPT per zb schedule, all alive at once
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    config = PRESETS[args.preset].with_(tie_weights=False)
    torch.manual_seed(1)
    x = torch.randint(0, config.vocab_size, (args.batch, config.block_size))
    y = torch.randint(0, config.vocab_size, (args.batch, config.block_size))

    torch.manual_seed(0)
    eager = GPT(config)
    eager_opt = torch.optim.SGD(eager.parameters(), lr=1e-3)

    def eager_step():
        if rank == 0:
            eager(x, y).backward()
            eager_opt.step()
            eager_opt.zero_grad()

    steps = {"eager": eager_step}
    for kind in args.torch_schedules.split(","):
        steps[f"torch.distributed.pipelining {kind}"] = torch_pipelining(kind, config, x, y, args.microbatches, rank)
    backends: dict = {}
    for schedule in args.schedules.split(","):
        steps[f"zb {schedule} ({args.compiler})"] = zb_step(schedule, config, x, y, args.microbatches, args.compiler,
                                                            backends, args.profile)
    for name, step in steps.items():  # compile, re-cut, re-plan, warm caches
        for _ in range(WARMUP):
            one_step(step)
        if rank == 0:
            print(f"warmed up {name}", file=sys.stderr, flush=True)
    times = timed_together(steps, args.steps)
    ideal = [t / 2 for t in times.pop("eager")]
    medians = {name: statistics.median(values) for name, values in times.items()}
    if rank == 0:
        torch_best = min((name for name in medians if name.startswith("torch")), key=medians.get)
        zb_best = min((name for name in medians if name.startswith("zb")), key=medians.get)
        print(f"GPT {args.preset} (untied), batch {args.batch} x {config.block_size}, {args.microbatches} "
              f"microbatches, 2 ranks x 1 thread, torch {torch.__version__}, {args.steps} rounds")
        print("| configuration | step (ms, median) | vs torch's best | vs ideal (eager / 2) |")
        print("|---|---:|---:|---:|")
        print(f"| single process eager, 1 thread | {statistics.median(ideal) * 2e3:.1f} | | 2.00x |")
        for name, t in medians.items():
            print(f"| {name} | {t * 1e3:.1f} | {ratio(times[name], times[torch_best]):.2f}x | "
                  f"{ratio(times[name], ideal):.2f}x |")
        print(f"\nbest zb ({zb_best}) / best torch.distributed.pipelining ({torch_best}): "
              f"{ratio(times[zb_best], times[torch_best]):.2f}x (target <= 0.85x); best zb / ideal: "
              f"{ratio(times[zb_best], ideal):.2f}x (target <= 1.15x). Ratios: the median over rounds of each "
              f"round's ratio; as ratios of the medians instead: {medians[zb_best] / medians[torch_best]:.2f}x and "
              f"{medians[zb_best] / statistics.median(ideal):.2f}x.")
        if args.profile:
            print("\n| zb schedule | stages begin at | re-cut | rank | busy (ms) | idle in its span (ms) |\n"
                  "|---|---|---|---:|---:|---:|")
            for schedule, backend in backends.items():
                runner = backend.runners[0]
                timeline = runner.measured_timeline()
                where = ", ".join(split_points_for(backend.plans[-1])) or "-"
                recut = "yes" if backend.plans[-1].previous_cuts is not None else "no"
                for r in range(timeline.schedule.num_ranks):
                    busy, span = timeline.work(r), timeline.span(r)
                    print(f"| {schedule} | {where} | {recut} | {r} | {busy * 1e3:.1f} | {(span - busy) * 1e3:.1f} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    cache = pathlib.Path(__file__).resolve().parents[1] / ".cache" / "inductor"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache))
    main()
