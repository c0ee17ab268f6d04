"""Run under torchrun: eager's semantics across pipeline ranks.

    torchrun --nproc-per-node 2 tests/distributed/semantics_check.py

Cases (each prints `ok <case>` on rank 0):
  token-mean: a token-mean cross entropy over padded targets (microbatches with different token counts), an extra
              output, and an unbatched [1, L] position argument: loss, extra output and every gradient a rank
              owns equal eager's on the whole batch.
  input-grad: an input with requires_grad=True that stages on both ranks read: its gradient on every rank that
              reads it equals eager's (the ranks' parts summed).
  one-batch:  rank 1 is handed another batch than rank 0: every rank raises the same ZbError before any piece runs.
  dropout:    a dropout mask drawn on each rank's stage: no two microbatches or stages share a mask, though both
              ranks were seeded alike, and the same seed gives the same masks again.
"""

from __future__ import annotations

import copy
import os
import pathlib
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from tests.helpers import assert_owned_grads  # noqa: E402
from zb import ZbError  # noqa: E402

OPTIONS = {"schedule": "zb-h1", "microbatches": 4, "compiler": "eager", "timeout": 60.0}


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.pos = nn.Embedding(11, 16), nn.Embedding(6, 16)
        self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(4))
        self.head = nn.Linear(16, 11)

    def forward(self, x, position, y):
        h = self.emb(x) + self.pos(position)
        for block in self.blocks:
            h = torch.tanh(block(h))
        logits = self.head(h)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten()), logits.pow(2).mean().detach()


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x, y):
        return F.mse_loss(self.second(torch.tanh(self.first(x))) + x, y)


def token_mean(rank: int) -> None:
    torch.manual_seed(0)
    model = Tokens()
    reference = copy.deepcopy(model)
    x, y = torch.randint(0, 11, (8, 6)), torch.randint(0, 11, (8, 6))
    y[0, :], y[1, 2:], y[5, 3:] = -100, -100, -100
    position = torch.arange(6)[None]
    got = torch.compile(model, backend="zb", options=OPTIONS)(x, position, y)
    want = reference(x, position, y)
    got[0].backward()
    want[0].backward()
    for j in range(2):
        torch.testing.assert_close(got[j].detach(), want[j].detach(), rtol=1e-5, atol=1e-6,
                                   msg=lambda m, j=j: f"output {j} on rank {rank}: {m}")
    assert_owned_grads(model, reference, f"rank {rank}")


def input_grad(rank: int) -> None:
    torch.manual_seed(0)
    model = Residual()
    reference = copy.deepcopy(model)
    x, y = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16)
    x_ref = x.detach().clone().requires_grad_()
    options = {**OPTIONS, "split_points": ["second"]}
    torch.compile(model, backend="zb", options=options)(x, y).backward()
    reference(x_ref, y).backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"x.grad on rank {rank}: {m}")
    assert_owned_grads(model, reference, f"rank {rank}")


def one_batch(rank: int) -> None:
    torch.manual_seed(0)
    model = Residual()
    x, y = torch.randn(8, 16), torch.randn(8, 16)
    if rank == 1:
        x = x + 1  # a data loader sharded by pipeline rank
    try:
        torch.compile(model, backend="zb", options=OPTIONS)(x, y)
    except ZbError as e:
        assert "argument 'x' differs between rank 0 and rank 1" in str(e), str(e)
        return
    raise AssertionError(f"rank {rank} ran a step on another batch than its peer")


class Dropped(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        early = F.dropout(torch.ones_like(x), 0.5)
        h = torch.tanh(self.first(x * early))
        h = self.second(h)
        late = F.dropout(torch.ones_like(h), 0.5)
        return (h * late).pow(2).mean(), early, late


def dropout(rank: int) -> None:
    def masks(seed):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = Dropped()
        step = torch.compile(model, backend="zb", options={**OPTIONS, "split_points": ["second"]})
        torch.manual_seed(seed)  # the same on both ranks
        _, early, late = step(torch.randn(8, 16))
        return early, late

    early, late = masks(1)
    chunks = [*early.chunk(4), *late.chunk(4)]
    same = [(i, j) for i in range(8) for j in range(i + 1, 8) if torch.equal(chunks[i], chunks[j])]
    assert not same, f"rank {rank}: microbatch masks repeated (early 0-3, late 4-7): {same}"
    again = masks(1)
    assert torch.equal(again[0], early) and torch.equal(again[1], late), "the same seed gave other masks"


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for case in (token_mean, input_grad, one_batch, dropout):
        torch._dynamo.reset()
        case(rank)
        dist.barrier()
        if rank == 0:
            print(f"ok {case.__name__}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("ZB_VERIFY", "1")
    main()
