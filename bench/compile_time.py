"""Compile time of zb: per pipeline rank against the number of ranks, and against the model's depth.

    .venv/bin/python bench/compile_time.py [--part ranks,depth] [--ranks 1,2,4] [--rank-layers 8]
        [--layers 4,8,16,32,64] [--inductor-layers 4,8,16] [--depth-configs zb-inductor,inductor,zb-eager]

Part "ranks": a Hugging Face LlamaForCausalLM (random weights, hidden 256, 8 layers, vocabulary 4096) trained with
zb (compiler="inductor", schedule zb-h1, microbatches = 2 x ranks, 2 samples of 64 tokens per microbatch) under
torchrun with 1, 2 and 4 processes, one stage per rank. Each rank compiles only its own stages with Inductor
(codegen/inductor.py, compile_plan(stages=...)). Per rank, in seconds:
  * start-up CPU: torch.compile's first use in the process, on a tiny function, measured before the model (the
    one-time set-up of Dynamo and Inductor, which every process pays whatever it compiles);
  * the first call (forward + backward): its wall time and CPU time (the process's own and that of the compiler
    processes it waited for: g++), split into "plan" (zb's re-trace at microbatch size and its passes, timed by
    wrapping CompiledGraph.build_plan), "codegen" (Inductor compiling this rank's pieces, timed by wrapping
    codegen.inductor.compile_piece) and the rest (Dynamo's trace at full batch, running the step, waiting);
  * zb's own record, plan.history (wall seconds): its passes, and "codegen";
  * the second call (with option release, on by default, Dynamo traces again and zb may build another plan: the
    number of plans and pieces built in it are given) and the third call (a step without compilation).
Part "depth": the same Llama at several depths in one process, first call (forward + backward) with zb on 2 stages
(both compiled in this process; zb-h1, 4 microbatches) with compiler inductor next to torch.compile's default
Inductor backend on the same loss (at 4, 8, 16 layers by default: --inductor-layers 4,8,16,32,64 adds minutes per
depth on a 2-core machine), and zb with compiler="eager" (4 to 64 layers) to show the passes' own scaling.

Every measurement runs in a fresh process with its own empty Inductor cache (TORCHINDUCTOR_CACHE_DIR, one per
rank) and TORCHINDUCTOR_COMPILE_THREADS=1 (compilation happens in the measured process and the g++ processes it
waits for, so the CPU time counts all of it; also what 2 cores shared by 4 ranks call for).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import socket
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
VOCAB = 4096
DEPTH_CONFIGS = ("zb-inductor", "inductor", "zb-eager")


def llama(layers: int):
    import torch
    import transformers

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from rank_memory import llama_config

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config(layers, VOCAB))
    model.train()
    return model


def cpu_seconds() -> float:
    """CPU time of this process and of the child processes it has waited for (Inductor's g++ runs)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed_call(step, ids, barrier=None) -> tuple[float, float]:
    if barrier is not None:
        barrier()
    wall, cpu = time.perf_counter(), cpu_seconds()
    step(ids, torch_roll(ids)).backward()
    return time.perf_counter() - wall, cpu_seconds() - cpu


def torch_roll(ids):
    import torch

    return torch.roll(ids, -1, 1)


def startup() -> tuple[float, float]:
    """Wall and CPU seconds of torch.compile's first use in this process, on a tiny function: Dynamo's and
    Inductor's one-time set-up (with an empty cache Inductor also builds its C++ prelude). Every process pays it
    once, whatever it compiles; measured first so that the first call's figures are the model's own."""
    import torch

    wall, cpu = time.perf_counter(), cpu_seconds()
    torch.compile(lambda x: (x * 2).sin())(torch.randn(8, 8))
    return time.perf_counter() - wall, cpu_seconds() - cpu


def instrument() -> list[dict]:
    """Record the wall and CPU time of each plan build (zb's re-trace at microbatch size and its passes) and of each
    piece Inductor compiles, by wrapping the two functions (zb's source is not changed)."""
    import zb.backend
    import zb.codegen.inductor as inductor

    events: list[dict] = []

    def timed(kind, fn, describe):
        def wrapper(*args, **kwargs):
            wall, cpu = time.perf_counter(), cpu_seconds()
            out = fn(*args, **kwargs)
            events.append({"kind": kind, "what": describe(args), "wall": time.perf_counter() - wall,
                           "cpu": cpu_seconds() - cpu})
            return out
        return wrapper

    graph = zb.backend.CompiledGraph
    graph.build_plan = timed("plan", graph.build_plan, lambda args: "")
    inductor.compile_piece = timed("piece", inductor.compile_piece, lambda args: f"{args[2]}:{args[1]}")
    return events


def breakdown(backend, events: list[dict], plans_before: int = 0, events_before: int = 0) -> dict:
    """zb's own record (plan.history, wall seconds) of the plans built since `plans_before`, and the CPU seconds of
    the instrumented events since `events_before`."""
    history = [r for plan in backend.plans[plans_before:] for r in plan.history]
    new = events[events_before:]
    return {"passes": sum(r.seconds for r in history if r.name != "codegen"),
            "codegen": sum(r.seconds for r in history if r.name == "codegen"),
            "plans": len(backend.plans) - plans_before,
            "plan_cpu": sum(e["cpu"] for e in new if e["kind"] == "plan"),
            "pieces": len([e for e in new if e["kind"] == "piece"]),
            "codegen_cpu": sum(e["cpu"] for e in new if e["kind"] == "piece"),
            "piece_cpu": {e["what"]: round(e["cpu"], 2) for e in new if e["kind"] == "piece"}}


def loss_of(model):
    import torch.nn.functional as F

    return lambda ids, labels: F.cross_entropy(model(input_ids=ids).logits.flatten(0, 1), labels.flatten())


def ranks_worker(layers: int) -> None:
    """One rank of the torchrun pipeline (part "ranks")."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(os.environ["ZB_BENCH_CACHE"], f"rank{os.environ['RANK']}")
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(ROOT))
    import zb

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = llama(layers)
    backend = zb.ZbBackend({"schedule": "zb-h1", "microbatches": 2 * world, "compiler": "inductor",
                            "timeout": 1200.0})
    events = instrument()
    start_wall, start_cpu = startup()
    step = torch.compile(loss_of(model), backend=backend)
    generator = torch.Generator().manual_seed(1)
    batch = [torch.randint(0, VOCAB, (4 * world, 64), generator=generator) for _ in range(2)]
    first_wall, first_cpu = timed_call(step, batch[0], dist.barrier)
    first = breakdown(backend, events)
    plans, seen = len(backend.plans), len(events)
    second_wall, second_cpu = timed_call(step, batch[1], dist.barrier)
    second = breakdown(backend, events, plans, seen)
    third_wall, _ = timed_call(step, batch[0], dist.barrier)
    runner = backend.runners[0]
    own = [s for s, r in enumerate(runner.schedule.placement) if r == rank]
    result = {"rank": rank, "stages": own, "num_stages": len(runner.schedule.placement), "start_wall": start_wall,
              "start_cpu": start_cpu, "first_wall": first_wall, "first_cpu": first_cpu, **first,
              "second_wall": second_wall, "second_cpu": second_cpu,
              "second_plans": second["plans"], "second_pieces": second["pieces"], "third_wall": third_wall}
    everyone: list = [None] * world
    dist.all_gather_object(everyone, result)
    if rank == 0:
        print("RESULT " + json.dumps(everyone), flush=True)
    dist.destroy_process_group()


def depth_worker(layers: int, config: str) -> None:
    """One single-process first call (part "depth")."""
    import torch

    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(1)
    model = llama(layers)
    result: dict = {"start_wall": 0.0, "start_cpu": 0.0}
    if config != "zb-eager":
        result["start_wall"], result["start_cpu"] = startup()
    if config == "inductor":
        step = torch.compile(loss_of(model))
    else:
        import zb

        backend = zb.ZbBackend({"schedule": "zb-h1", "stages": 2, "microbatches": 4,
                                "compiler": config.removeprefix("zb-")})
        events = instrument()
        step = torch.compile(loss_of(model), backend=backend)
    ids = torch.randint(0, VOCAB, (8, 64), generator=torch.Generator().manual_seed(1))
    wall, cpu = timed_call(step, ids)
    if config != "inductor":
        result.update(breakdown(backend, events))
    second, _ = timed_call(step, ids)
    result.update(first_wall=wall, first_cpu=cpu, second_wall=second)
    print("RESULT " + json.dumps(result), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(command: list[str], what: str) -> object:
    with tempfile.TemporaryDirectory(prefix="zb-bench-inductor-") as cache:
        env = dict(os.environ, OMP_NUM_THREADS="1", TORCHINDUCTOR_COMPILE_THREADS="1", ZB_BENCH_CACHE=cache,
                   TORCHINDUCTOR_CACHE_DIR=cache)
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{what} failed:\n{out.stdout[-2000:]}\n{out.stderr[-6000:]}")
    return json.loads(line[len("RESULT "):])


def part_ranks(ranks: list[int], layers: int) -> None:
    print(f"Llama hidden 256, {layers} layers, vocabulary {VOCAB}; zb-h1, compiler inductor, microbatches = 2 x ranks, "
          f"one stage per rank; {os.cpu_count()} cores, 1 thread per rank; seconds")
    print("| ranks | rank | stage | start-up CPU | first call wall | first call CPU | plan CPU | "
          "codegen CPU (pieces) | other CPU | zb passes (history) | codegen (history) | start-up + first call CPU | "
          "second call wall / CPU (plans, pieces built) | third call wall |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    worst: dict = {}
    pieces = []
    for n in ranks:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port",
                   str(free_port()), __file__, "--worker", "ranks", "--rank-layers", str(layers)]
        started, load = time.perf_counter(), os.getloadavg()[0]
        rows = launch(command, f"{n} ranks")
        elapsed = time.perf_counter() - started
        for r in rows:
            r["other_cpu"] = r["first_cpu"] - r["plan_cpu"] - r["codegen_cpu"]
            r["cold_cpu"] = r["start_cpu"] + r["first_cpu"]
            print(f"| {n} | {r['rank']} | {','.join(map(str, r['stages']))} of {r['num_stages']} | "
                  f"{r['start_cpu']:.1f} | {r['first_wall']:.1f} | {r['first_cpu']:.1f} | {r['plan_cpu']:.1f} | "
                  f"{r['codegen_cpu']:.1f} ({r['pieces']}) | {r['other_cpu']:.1f} | {r['passes']:.1f} | "
                  f"{r['codegen']:.1f} | {r['cold_cpu']:.1f} | {r['second_wall']:.1f} / {r['second_cpu']:.1f} "
                  f"({r['second_plans']}, {r['second_pieces']}) | {r['third_wall']:.2f} |", flush=True)
            pieces.append(f"  {n} ranks, rank {r['rank']}: " + ", ".join(f"{k} {v:.1f}"
                                                                         for k, v in r["piece_cpu"].items()))
        worst[n] = {k: max(r[k] for r in rows) for k in ("first_wall", "first_cpu", "plan_cpu", "codegen_cpu",
                                                         "cold_cpu")}
        print(f"|  | whole run {elapsed:.0f} s | load {load:.1f} before | | | | | | | | | | | |", flush=True)
    print("\ncodegen CPU seconds per piece (stage:piece):\n" + "\n".join(pieces))
    if 1 in worst:
        print("\nslowest rank against 1 rank (target at 4 ranks: <= 0.5x):")
        for n, w in worst.items():
            print(f"  {n} rank(s): first call wall {w['first_wall'] / worst[1]['first_wall']:.2f}x, "
                  f"first call CPU {w['first_cpu'] / worst[1]['first_cpu']:.2f}x "
                  f"(plan {w['plan_cpu'] / worst[1]['plan_cpu']:.2f}x, "
                  f"codegen {w['codegen_cpu'] / worst[1]['codegen_cpu']:.2f}x), "
                  f"start-up + first call CPU {w['cold_cpu'] / worst[1]['cold_cpu']:.2f}x")


def part_depth(layers: list[int], inductor_layers: list[int], configs: list[str]) -> None:
    names = {"zb-inductor": "zb 2 stages, inductor", "inductor": "torch.compile (inductor)",
             "zb-eager": "zb 2 stages, compiler=eager"}
    print(f"\nLlama hidden 256, vocabulary {VOCAB}, batch 8 x 64, one process, 1 thread; first call (forward + "
          f"backward); zb: zb-h1, 4 microbatches; times in seconds")
    print("| configuration | layers | start-up CPU | first call wall | wall per layer | first call CPU | "
          "CPU per layer | plan CPU | codegen CPU (pieces) | zb passes (history) | codegen (history) | "
          "second call wall |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for config in configs:
        for n in layers if config == "zb-eager" else inductor_layers:
            r = launch([sys.executable, __file__, "--worker", "depth", "--depth-config", config,
                        "--rank-layers", str(n)], f"{config} at {n} layers")
            zb = [f"{r['plan_cpu']:.1f}", f"{r['codegen_cpu']:.1f} ({r['pieces']})", f"{r['passes']:.1f}",
                  f"{r['codegen']:.1f}"] if "passes" in r else ["-"] * 4
            print(f"| {names[config]} | {n} | {r['start_cpu']:.1f} | {r['first_wall']:.1f} | "
                  f"{r['first_wall'] / n:.2f} | "
                  f"{r['first_cpu']:.1f} | {r['first_cpu'] / n:.2f} | {' | '.join(zb)} | {r['second_wall']:.2f} |",
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", default="ranks,depth", help="ranks, depth or both (comma-separated)")
    parser.add_argument("--ranks", default="1,2,4", help="pipeline ranks for part ranks")
    parser.add_argument("--rank-layers", type=int, default=8, help="layers of the model in part ranks")
    parser.add_argument("--layers", default="4,8,16,32,64", help="depths for part depth, compiler eager")
    parser.add_argument("--inductor-layers", default="4,8,16",
                        help="depths for part depth with Inductor (zb and torch.compile; 32 and 64 take minutes each)")
    parser.add_argument("--depth-configs", default=",".join(DEPTH_CONFIGS),
                        help=f"configurations for part depth ({', '.join(DEPTH_CONFIGS)})")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--depth-config", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "ranks":
        ranks_worker(args.rank_layers)
        return
    if args.worker == "depth":
        depth_worker(args.rank_layers, args.depth_config)
        return
    parts = args.part.split(",")
    configs = args.depth_configs.split(",")
    unknown = [p for p in parts if p not in ("ranks", "depth")] + [c for c in configs if c not in DEPTH_CONFIGS]
    if unknown:
        parser.error(f"unknown part(s) or configuration(s): {unknown}")
    import torch

    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, no GPU used")
    if "ranks" in parts:
        part_ranks([int(r) for r in args.ranks.split(",")], args.rank_layers)
    if "depth" in parts:
        part_depth([int(n) for n in args.layers.split(",")], [int(n) for n in args.inductor_layers.split(",")],
                   configs)


if __name__ == "__main__":
    main()
