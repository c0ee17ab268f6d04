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
from tests.distributed.release_check import held_bytes, own_bytes, train_next_to_eager  # noqa: E402
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
