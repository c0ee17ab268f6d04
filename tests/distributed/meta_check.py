"""Run under torchrun: a GPT built on the meta device, each rank filling only its own stages' tensors.

    torchrun --nproc-per-node 2 tests/distributed/meta_check.py [--init reset_parameters|callable|state_dict]

zb.defer + option 'init'; 3 SGD steps next to an eager reference given the same values (zb.initialize, or the same
state dict); the losses and this rank's gradients equal eager's; each rank holds exactly its own stages' bytes;
after training zb.full_state_dict equals the reference's parameters. Prints `ok meta <rank> <held> <own> <total>`.
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
from tests.distributed.release_check import held_bytes  # noqa: E402
from tests.test_meta import init_gpt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--init", default="reset_parameters", choices=["reset_parameters", "callable", "state_dict"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
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
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, reference)]
    for i in range(3):
        generator = torch.Generator().manual_seed(100 + i)
        batch = [torch.randint(0, 256, (8, 16), generator=generator) for _ in range(2)]
        loss = step(*batch)
        loss.backward()
        expected = reference(*batch)
        expected.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            if p.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=f"grad of {name}")
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    runner = backend.runners[0]
    readers = runner.program.readers(runner.schedule.placement)
    own = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for i, t in runner.state.items()
           if rank in readers.get(i, set())}
    held = held_bytes(model)
    assert held == sum(own.values()) < total, (rank, held, sum(own.values()), total)
    full = zb.full_state_dict(model)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(full[key], value, rtol=1e-5, atol=1e-6, msg=key)
    print(f"ok meta {rank} {held} {sum(own.values())} {total}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
