"""What each pipeline rank holds: a Hugging Face Llama trained with zb on 2 and 4 ranks, next to
torch.distributed.pipelining with each rank building only its own stage.

    .venv/bin/python bench/rank_memory.py [--ranks 2,4] [--layers 8] [--hidden 256] [--compiler eager]
        [--schedule zb-h1] [--zero-grad none|keep] [--allocator fixed|glibc] [--modes kept,released,meta]

The model: LlamaForCausalLM, hidden 256 (--hidden), 8 layers, vocabulary 32000 (random weights, nothing
downloaded). Every
configuration trains it for 2 steps under torchrun with gloo (2 x ranks microbatches of 2 samples x 64 tokens,
cross-entropy loss, torch.optim.SGD with momentum 0.9, so the optimizer state is one momentum buffer per trained
parameter). The zb runs (schedule zb-h1, compiler="eager" by default, as torch.distributed.pipelining runs eager
modules) start in three ways:

  * materialised, release=False: every rank builds the whole model and keeps it (zb before option release);
  * materialised, released: every rank builds the whole model; after the first call it frees what it does not own;
  * meta + init: built on the meta device, zb.defer, each rank fills its own stages (option init).

The baseline, "torch PP, own stage": torch.distributed.pipelining the torchtitan way. Each rank builds the model
on the meta device, deletes the decoder layers (and embedding, final norm, head) outside its stage, calls
to_empty(device="cpu") and the model's _init_weights, wraps what is left in a PipelineStage and trains it with
Schedule1F1B. Each rank holds the modules zb's stages hold on the same rank (read from the meta + init run: the
embedding, each decoder layer, the norm and the head go to the rank holding most of their bytes, as zb may cut
inside a layer), so the two hold nearly the same parameters; a rank whose zb stage holds no parameter (only the
loss) gets an empty torch stage and no optimizer.

Between steps the loop calls `optimizer.zero_grad()` (PyTorch's default, set_to_none=True: gradients exist from
the step to the optimizer's update, as in torchtitan); `--zero-grad keep` keeps them (set_to_none=False) in both
runs. `--allocator fixed` (the default) starts every process with MALLOC_MMAP_THRESHOLD_=131072, so that glibc
maps each large tensor on its own and returns it when freed: RSS then follows the bytes the process holds. With
`--allocator glibc` (glibc's dynamic threshold) freed heap stays in RSS in patterns that differ from run to run
(up to 0.1x of the ratio between two runs of the same configuration, measured).

Per rank (MiB): the bytes of parameters and buffers the process holds after training ("held"), the bytes its own
stages read (what it must hold), their ratio, the bytes of gradients and of optimizer state; then the process's
ru_maxrss (peak RSS) at four points: right after its imports and process group (Python, torch, transformers and,
for zb, zb: the model-independent baseline), when zb's first plan is built (Dynamo's trace, zb's re-trace and
passes), after the first training step, and after training; the model-dependent part (peak - imports) and zb's
peak RSS against the torch baseline's on the same rank.
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

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODES = ["materialised, release=False", "materialised, released", "meta + init"]
TORCH = "torch PP, own stage"
VOCAB = 32000


def maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def llama_config(layers: int, vocab: int = VOCAB, hidden: int = 256):
    """The benchmarks' Llama: `hidden` wide (MLP 2.6875 x hidden, 4 heads), `layers` decoder layers, SDPA
    attention, no KV cache (also bench/compile_time.py's)."""
    import transformers

    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 688 // 256,
                                      num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=4, vocab_size=vocab,
                                      max_position_embeddings=128)
    config._attn_implementation = "sdpa"
    config.use_cache = False
    return config


def batches(world: int) -> list:
    import torch

    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (4 * world, 64), generator=generator) for _ in range(2)]  # 2 per microbatch


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def state_bytes(optimizer) -> int:
    import torch

    return nbytes(v for s in optimizer.state.values() for v in s.values()
                  if isinstance(v, torch.Tensor) and v.dim() > 0)


def report(result: dict) -> None:
    import torch.distributed as dist

    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, result)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(everyone), flush=True)
    dist.destroy_process_group()


def zb_worker(mode: str, layers: int, hidden: int, compiler: str, schedule: str, keep: bool) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    import transformers

    sys.path.insert(0, str(ROOT))
    import zb
    import zb.backend
    from zb.passes.partition_stages import split_points_for
    from zb.runtime.released import is_released

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    imports = maxrss()
    rank, world = dist.get_rank(), dist.get_world_size()
    config = llama_config(layers, hidden=hidden)
    options = {"schedule": schedule, "microbatches": 2 * world, "compiler": compiler,
               "timeout": float(os.environ.get("ZB_BENCH_TIMEOUT", "600"))}
    torch.manual_seed(0)
    if mode == "meta + init":
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(config)
        zb.defer(model, "cpu")
        options["init"] = model._init_weights
    else:
        model = transformers.LlamaForCausalLM(config)
        options["release"] = mode != "materialised, release=False"
    model.train()
    backend = zb.ZbBackend(options)
    planned: list[int] = []  # ru_maxrss when each plan is built: the peak of tracing and planning
    build_plan = zb.backend.CompiledGraph.build_plan

    def recording(*args, **kwargs):
        out = build_plan(*args, **kwargs)
        planned.append(maxrss())
        return out

    zb.backend.CompiledGraph.build_plan = recording
    step = torch.compile(lambda ids, labels: F.cross_entropy(model(input_ids=ids).logits.flatten(0, 1),
                                                              labels.flatten()), backend=backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    steps = []  # ru_maxrss after each step
    for ids in batches(world):
        step(ids, torch.roll(ids, -1, 1)).backward()
        optimizer.step()
        grads = nbytes(p.grad for p in model.parameters() if p.grad is not None)  # (before zero_grad)
        optimizer.zero_grad(set_to_none=not keep)
        steps.append(maxrss())
    tensors = [*model.parameters(), *model.buffers()]
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if not is_released(t)}
    runner = backend.runners[0]
    readers = runner.program.readers(runner.schedule.placement)
    mine = {id(t) for i, t in runner.state.items() if rank in readers.get(i, set())}
    names = {id(p): n for n, p in model.named_parameters()}
    report({"rank": rank, "held": sum(held.values()), "own": nbytes(t for i, t in runner.state.items()
                                                                     if id(t) in mine),
            "whole": nbytes(tensors), "grads": grads,
            "state": state_bytes(optimizer), "imports": imports, "rss": maxrss(), "planned": planned[0],
            "steps": steps,
            "owned_bytes": {names[i]: t.numel() * t.element_size() for i, t in
                            ((id(t), t) for t in runner.state.values()) if i in mine and i in names},
            "split_points": split_points_for(backend.plans[-1])})



def torch_worker(layers: int, hidden: int, parts: list[dict], keep: bool) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn as nn
    import torch.nn.functional as F
    import transformers
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    imports = maxrss()
    rank, world = dist.get_rank(), dist.get_world_size()
    part = parts[rank]
    lo, hi = part["layers"]

    class Stage(nn.Module):
        """This rank's part of the Llama: embedding, decoder layers [lo, hi), final norm, head, each if it holds it."""

        def __init__(self, causal_lm):
            super().__init__()
            self.model, self.lm_head = causal_lm.model, causal_lm.lm_head

        def forward(self, x):
            if part["embed"] or hi > lo or part["norm"]:
                x = self.model(**{"input_ids" if part["embed"] else "inputs_embeds": x}).last_hidden_state
            return self.lm_head(x) if part["head"] else x

    torch.manual_seed(0)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(llama_config(layers, hidden=hidden))
    model.model.layers = nn.ModuleList(model.model.layers[lo:hi])  # forward iterates layers[:num_hidden_layers]
    if not part["embed"]:
        model.model.embed_tokens = None
    if not part["norm"]:
        model.model.norm = nn.Identity()
    if not part["head"]:
        model.lm_head = None
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.apply(model._init_weights)  # also computes the rotary frequencies (a non-persistent buffer)
    model.train()
    stage = PipelineStage(Stage(model), rank, world, torch.device("cpu"))
    schedule = Schedule1F1B(stage, 2 * world, loss_fn=lambda logits, labels: F.cross_entropy(
        logits.flatten(0, 1), labels.flatten()))
    parameters = list(model.parameters())
    optimizer = torch.optim.SGD(parameters, lr=0.01, momentum=0.9) if parameters else None  # a loss-only stage
    steps = []
    for ids in batches(world):
        if rank == 0:
            schedule.step(ids)
        elif rank == world - 1:
            schedule.step(target=torch.roll(ids, -1, 1))
        else:
            schedule.step()
        if optimizer is not None:
            optimizer.step()
            grads = nbytes(p.grad for p in parameters if p.grad is not None)  # (before zero_grad)
            optimizer.zero_grad(set_to_none=not keep)
        steps.append(maxrss())
    tensors = [*parameters, *model.buffers()]
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    report({"rank": rank, "held": sum(held.values()), "own": nbytes(parameters), "whole": None,
            "grads": grads if optimizer is not None else 0,
            "state": state_bytes(optimizer) if optimizer is not None else 0, "imports": imports, "rss": maxrss(),
            "planned": None, "steps": steps})


def stage_parts(zb_rows: list[dict], layers: int) -> list[dict]:
    """What each rank holds in zb's cut, in whole modules for torch: the embedding, each decoder layer, the final
    norm and the head go to the rank holding most of their bytes (zb may cut inside a layer)."""
    def owner(prefix: str) -> int:
        share = [sum(b for n, b in r["owned_bytes"].items() if n.startswith(prefix)) for r in zb_rows]
        if not any(share):
            raise SystemExit(f"no rank of the zb run reports {prefix}* as its own")
        return share.index(max(share))

    embed, norm, head = owner("model.embed_tokens."), owner("model.norm."), owner("lm_head.")
    layer = [owner(f"model.layers.{k}.") for k in range(layers)]
    order = [embed, *layer, norm, head]
    if order != sorted(order):
        raise SystemExit(f"zb's stages do not hold the modules in order: {order}")
    return [{"embed": embed == r, "layers": [sum(o < r for o in layer), sum(o <= r for o in layer)],
             "norm": norm == r, "head": head == r} for r in range(len(zb_rows))]


def run(args: list[str], ranks: int, what: str, allocator: str) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if allocator == "fixed":
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
                          "--master-port", str(port), __file__, *args],
                         env=env, capture_output=True, text=True, check=False)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{what} on {ranks} ranks failed:\n{out.stderr[-4000:]}")
    return json.loads(line[len("RESULT "):])


def describe(part: dict) -> str:
    lo, hi = part["layers"]
    names = ["embedding"] if part["embed"] else []
    names += [f"layers {lo}-{hi - 1}"] if hi > lo else []
    names += [n for n in ("norm", "head") if part[n]]
    return " + ".join(names) or "nothing (the loss)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", default="2,4")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--zero-grad", default="none", choices=["none", "keep"],
                        help="between steps: zero_grad() (none) or zero_grad(set_to_none=False) (keep)")
    parser.add_argument("--allocator", default="fixed", choices=["fixed", "glibc"],
                        help="fixed: MALLOC_MMAP_THRESHOLD_=131072 (RSS follows the bytes held); glibc: its default")
    parser.add_argument("--modes", default="kept,released,meta", help="the zb starts to run, comma-separated: "
                        "kept (materialised, release=False), released (materialised, released), meta (meta + init; "
                        "always runs: it tells torch's stages what to hold)")
    parser.add_argument("--compiler", default="eager", choices=["eager", "inductor"], help="zb's compiler")
    parser.add_argument("--schedule", default="zb-h1", help="zb's schedule (the torch baseline runs Schedule1F1B)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--parts", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    keep = args.zero_grad == "keep"
    if args.worker == TORCH:
        torch_worker(args.layers, args.hidden, json.loads(args.parts), keep)
        return
    if args.worker:
        zb_worker(args.worker, args.layers, args.hidden, args.compiler, args.schedule, keep)
        return
    short = dict(zip(["kept", "released", "meta"], MODES))
    unknown = set(args.modes.split(",")) - set(short)
    if unknown:
        parser.error(f"--modes: unknown {sorted(unknown)}; choose from {list(short)}")
    modes = [short[m] for m in short if m in args.modes.split(",") or m == "meta"]
    import torch

    mib = 2**20
    print(f"Llama hidden {args.hidden}, {args.layers} layers, vocabulary {VOCAB}; 2 x ranks microbatches of 2 x 64 "
          f"tokens, SGD momentum 0.9, 2 steps, zero_grad(set_to_none={not keep}); zb compiler={args.compiler}, "
          f"schedule {args.schedule}; allocator {args.allocator}; torch {torch.__version__}, {os.cpu_count()} "
          f"cores; MiB")
    notes = []
    for ranks in [int(r) for r in args.ranks.split(",")]:
        print("\n| ranks | start | rank | held | own stages | held / own | grads | optimizer state | "
              "held + grads + state | RSS after imports | RSS peak by planned | by step 1 | peak RSS | "
              "peak - imports | peak RSS zb / torch |")
        print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        worker = ["--layers", str(args.layers), "--hidden", str(args.hidden), "--zero-grad", args.zero_grad,
                  "--compiler", args.compiler, "--schedule", args.schedule]
        results = {mode: run(["--worker", mode, *worker], ranks, mode, args.allocator) for mode in modes}
        parts = stage_parts(results["meta + init"], args.layers)
        results[TORCH] = run(["--worker", TORCH, *worker, "--parts", json.dumps(parts)], ranks, TORCH, args.allocator)
        for mode in [TORCH, *modes]:
            for r, base in zip(results[mode], results[TORCH]):
                total = r["held"] + r["grads"] + r["state"]
                versus = "" if mode == TORCH else f"{r['rss'] / base['rss']:.2f}x"
                ratio = f"{r['held'] / r['own']:.2f}" if r["own"] else "- (owns none)"
                planned = f"{r['planned'] / mib:.0f}" if r["planned"] else ""
                print(f"| {ranks} | {mode} | {r['rank']} | {r['held'] / mib:.1f} | {r['own'] / mib:.1f} | "
                      f"{ratio} | {r['grads'] / mib:.1f} | {r['state'] / mib:.1f} | "
                      f"{total / mib:.1f} | {r['imports'] / mib:.0f} | {planned} | {r['steps'][0] / mib:.0f} | "
                      f"{r['rss'] / mib:.0f} | {(r['rss'] - r['imports']) / mib:.0f} | {versus} |", flush=True)
        cut = ", ".join(results["meta + init"][0]["split_points"])
        notes.append(f"{ranks} ranks: zb's stages begin at {cut} (meta + init run; split_points_for, one name per "
                     f"module); the modules each rank holds, as given to torch: "
                     + "; ".join(f"rank {r}: {describe(part)}" for r, part in enumerate(parts)))
    print("\n" + "\n".join(notes))


if __name__ == "__main__":
    main()
