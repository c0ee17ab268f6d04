"""What each pipeline rank holds: a Hugging Face Llama trained with zb on 2 and 4 ranks.

    .venv/bin/python bench/rank_memory.py [--ranks 2,4] [--layers 8]

The model: LlamaForCausalLM, hidden 256, 8 layers, vocabulary 32000 (random weights, nothing downloaded). Three
ways to start it, each trained for 2 steps (zb-h1, 2 x ranks microbatches, compiler="eager") under torchrun:

  * materialised, release=False: every rank builds the whole model and keeps it (zb before option release);
  * materialised, released: every rank builds the whole model; after the first call it frees what it does not own;
  * meta + init: built on the meta device, zb.defer, each rank fills its own stages (option init).

Per rank: the bytes of parameters and buffers the process holds after training, the bytes its own stages read
(what it must hold), their ratio, and the process's peak RSS (ru_maxrss).
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


def worker(mode: str, layers: int) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    import transformers

    sys.path.insert(0, str(ROOT))
    import zb
    from zb.runtime.released import is_released

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=4, vocab_size=32000,
                                      max_position_embeddings=128)
    config._attn_implementation = "sdpa"
    config.use_cache = False
    options = {"schedule": "zb-h1", "microbatches": 2 * world, "compiler": "eager", "timeout": 300.0}
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
    step = torch.compile(lambda ids, labels: F.cross_entropy(model(input_ids=ids).logits.flatten(0, 1),
                                                              labels.flatten()), backend=backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):
        ids = torch.randint(0, 32000, (4 * world, 64), generator=generator)  # 2 samples per microbatch
        step(ids, torch.roll(ids, -1, 1)).backward()
        optimizer.step()
        optimizer.zero_grad()
    tensors = [*model.parameters(), *model.buffers()]
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if not is_released(t)}
    whole = {id(t): t.numel() * t.element_size() for t in tensors}
    runner = backend.runners[0]
    readers = runner.program.readers(runner.schedule.placement)
    own = {id(t): t.numel() * t.element_size() for i, t in runner.state.items() if rank in readers.get(i, set())}
    result = {"rank": rank, "held": sum(held.values()), "own": sum(own.values()), "whole": sum(whole.values()),
              "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    everyone: list = [None] * world
    dist.all_gather_object(everyone, result)
    if rank == 0:
        print("RESULT " + json.dumps(everyone), flush=True)
    dist.destroy_process_group()


def run(mode: str, ranks: int, layers: int) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
                          "--master-port", str(port), __file__, "--worker", mode, "--layers", str(layers)],
                         env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, check=False)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{mode} on {ranks} ranks failed:\n{out.stderr[-4000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", default="2,4")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.layers)
        return
    mib = 2**20
    print("| ranks | start | rank | held (MiB) | own stages (MiB) | held / own | whole model (MiB) | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for ranks in [int(r) for r in args.ranks.split(",")]:
        for mode in MODES:
            for r in run(mode, ranks, args.layers):
                print(f"| {ranks} | {mode} | {r['rank']} | {r['held'] / mib:.1f} | {r['own'] / mib:.1f} | "
                      f"{r['held'] / r['own']:.2f} | {r['whole'] / mib:.1f} | {r['rss'] / mib:.0f} |", flush=True)


if __name__ == "__main__":
    main()
