"""Run under torchrun: a GPT built on the meta device, each rank filling only its own stages' tensors.

    torchrun --nproc-per-node 2 tests/distributed/meta_check.py [--init reset_parameters|callable|state_dict]
    torchrun --nproc-per-node 2 tests/distributed/meta_check.py --model llama --init safetensors --dir DIR

zb.defer + option 'init'; 3 SGD steps next to an eager reference given the same values (zb.initialize, or the same
state dict); the losses and this rank's gradients equal eager's; each rank holds exactly its own stages' bytes;
after training zb.full_state_dict equals the reference's parameters. Prints `ok meta <rank> <held> <own> <total>`.
With --model llama: a Hugging Face Llama (tests/hf_models.py) built on the meta device, its values read from the
reference's save_pretrained directory DIR (written by rank 0); each rank reads from the files exactly the tensors
its stages hold (`zb.materialize.READ`), and the rotary buffers (in no file) are computed by the model's
_init_weights as transformers' loading does.
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import sys

import torch
import torch.distributed as dist

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import zb  # noqa: E402
from examples.gpt import GPT, PRESETS  # noqa: E402
from tests.distributed.release_check import (  # noqa: E402
    held_bytes, own_bytes, step_next_to_eager, train_next_to_eager,
)
from tests.test_meta import init_gpt  # noqa: E402


def llama(rank: int, directory: str) -> None:
    from safetensors import safe_open

    import zb.materialize
    from tests import hf_models

    torch.manual_seed(0)
    reference = hf_models.FAMILIES["llama"]()
    if rank == 0:
        reference.save_pretrained(directory)
    dist.barrier()
    with torch.device("meta"):
        model = hf_models.FAMILIES["llama"]()
    zb.defer(model, "cpu")
    backend = zb.ZbBackend({"schedule": "zb-h1", "microbatches": 2, "compiler": "eager", "timeout": 120.0,
                            "init": directory})
    step = torch.compile(lambda ids, labels: hf_models.loss_fn(model, ids, labels), backend=backend)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, reference)]
    for i in range(3):
        step_next_to_eager(step, model, reference, hf_models.batch(), f"step {i}",
                           eager=lambda ids, labels: hf_models.loss_fn(reference, ids, labels))
        if i == 0:  # what the first call read from the files: exactly this rank's stages' stored tensors
            read = set(zb.materialize.READ)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    stored = set()
    for file in pathlib.Path(directory).glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as reader:
            stored |= set(reader.keys())
    names = {id(t): n for n, t in [*model.named_parameters(), *model.named_buffers()]}
    runner = backend.runners[0]
    readers = runner.program.readers(runner.schedule.placement)
    mine = {names[id(t)] for i, t in runner.state.items() if rank in readers.get(i, set()) and id(t) in names}
    assert read == mine & stored and read < stored, (rank, sorted(read ^ (mine & stored)))
    # Held: every parameter and buffer with values here, except those no stage of any rank reads (the rotary
    # embedding's original_inv_freq, kept for dynamic RoPE, a few bytes every rank keeps).
    read_anywhere = {id(runner.state[i]) for i in readers if i in runner.state}
    unread = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if id(t) not in read_anywhere]
    assert all("rotary" in n for n in unread), unread
    total, own = held_bytes(reference), own_bytes(backend, model, rank)
    held = held_bytes(model) - sum(t.untyped_storage().nbytes() for n, t in model.named_buffers() if n in unread)
    assert held == own < total, (rank, held, own, total, unread)
    sys.stdout.write(f"ok meta {rank} {held} {own} {total} read {len(read)} of {len(stored)}\n")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--init", default="reset_parameters",
                        choices=["reset_parameters", "callable", "state_dict", "safetensors"])
    parser.add_argument("--model", default="gpt", choices=["gpt", "llama"])
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if args.model == "llama":
        llama(rank, args.dir)
        dist.destroy_process_group()
        return
    config = PRESETS["tiny"]
    torch.manual_seed(5)
    reference = GPT(config)
    if args.init == "state_dict":
        init = copy.deepcopy(reference.state_dict())
    else:
        init = "reset_parameters" if args.init == "reset_parameters" else init_gpt
        zb.initialize(reference, init, seed=0)
    total = held_bytes(reference)
    with torch.device("meta"):
        model = GPT(config)
    zb.defer(model, "cpu")
    backend = zb.ZbBackend({"schedule": "zb-h1", "microbatches": 4, "compiler": "eager", "timeout": 120.0,
                            "init": init})
    step = torch.compile(model, backend=backend)
    train_next_to_eager(step, model, reference, (8, 16))
    own = own_bytes(backend, model, rank)
    held = held_bytes(model)
    assert held == own < total, (rank, held, own, total)
    full = zb.full_state_dict(model)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(full[key], value, rtol=1e-5, atol=1e-6, msg=key)
    sys.stdout.write(f"ok meta {rank} {held} {own} {total}\n")  # one write: the ranks share the pipe
    sys.stdout.flush()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
