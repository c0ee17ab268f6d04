"""Start a model larger than one device: build it on the meta device, let each rank fill only its own stages.

    torchrun --nproc-per-node 2 examples/meta_init.py                       # each module's reset_parameters()
    torchrun --nproc-per-node 2 examples/meta_init.py --init ckpt/latest    # a zb / DCP checkpoint directory
    torchrun --nproc-per-node 2 examples/meta_init.py --init hf_dir         # a save_pretrained safetensors dir
    python examples/meta_init.py --save-safetensors hf_dir                  # write one to try the line above

No process ever allocates the whole model: `torch.device("meta")` builds shapes only, `zb.defer` makes storage-less
placeholders Dynamo can trace, and after planning each rank gives storage and values to the parameters its stages
read. The script prints, per rank, the bytes of parameters and buffers it holds next to the whole model's.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import zb  # noqa: E402
from examples.gpt import GPT, PRESETS  # noqa: E402
from zb.runtime.released import is_released  # noqa: E402


def held_mib(model: torch.nn.Module) -> float:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()] if not is_released(t)}
    return sum(storages.values()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--init", default="reset_parameters",
                        help="'reset_parameters', or a checkpoint / safetensors directory")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--save-safetensors", default=None, help="write a materialised model's safetensors here")
    args = parser.parse_args()
    config = PRESETS[args.preset]
    if args.save_safetensors:
        from safetensors.torch import save_file

        model = zb.initialize(GPT(config), "reset_parameters", seed=0)
        state = {k: v for k, v in model.state_dict().items() if k != "head.weight"}  # tied to tok_emb.weight
        pathlib.Path(args.save_safetensors).mkdir(parents=True, exist_ok=True)
        save_file(state, str(pathlib.Path(args.save_safetensors) / "model.safetensors"))
        print(f"wrote {len(state)} tensors to {args.save_safetensors}/model.safetensors")
        return

    with torch.device("meta"):
        model = GPT(config)
    whole = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    zb.defer(model)  # placeholders on the CPU (or this rank's GPU): no memory yet
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    step = torch.compile(model, backend="zb", options={"init": args.init, "microbatches": 4, "schedule": "zb-h1"})
    generator = torch.Generator().manual_seed(0)
    for number in range(1, args.steps + 1):
        ids = torch.randint(0, config.vocab_size, (8, config.block_size), generator=generator)
        loss = step(ids, torch.roll(ids, -1, 1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if rank == 0:
            print(f"step {number}: loss {loss.item():.4f}", flush=True)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    print(f"rank {rank}: holds {held_mib(model):.2f} MiB of the model's {whole:.2f} MiB of parameters", flush=True)


if __name__ == "__main__":
    main()
