"""Run under torchrun: each pipeline rank frees the parameters and buffers only other ranks read (option release).

    torchrun --nproc-per-node 2 tests/distributed/release_check.py [--no-release]

Trains the test GPT for 3 SGD steps (zb-h1, 4 microbatches) next to an eager reference and checks: the losses and
this rank's gradients equal eager's; after the first step the bytes of the model's parameters and buffers this
process holds equal the bytes of those its stages read (all of them with --no-release); reading a released
parameter outside zb is a ZbError naming its owner; evaluation under torch.no_grad through the compiled function,
zb.full_state_dict, model.state_dict(), and a checkpoint saved and loaded back keep working; the class change of
the released tensors costs Dynamo one re-trace and zb at most one more plan; and, for a model whose balanced cuts
move with the sequence length, other lengths keep the first pipeline's cuts (eager's gradients, nothing needed that
was released). Prints `ok release <rank> <held> <own>`.
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import sys
import tempfile

import torch
import torch.distributed as dist

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import zb  # noqa: E402
from tests import models  # noqa: E402
from tests.helpers import assert_close, assert_owned_grads  # noqa: E402
from zb.backend import CompiledGraph  # noqa: E402
from zb.runtime.released import is_released  # noqa: E402


def train_next_to_eager(step, model, reference, shape: tuple[int, ...], steps: int = 3) -> torch.optim.Optimizer:
    """`steps` SGD steps (momentum) of `step` and of the eager `reference` on the same random token batches: equal
    losses, and each rank's gradients equal eager's (tests.helpers.assert_owned_grads). Returns `model`'s
    optimizer."""
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, reference)]
    for i in range(steps):
        generator = torch.Generator().manual_seed(100 + i)
        step_next_to_eager(step, model, reference, [torch.randint(0, 256, shape, generator=generator)
                                                    for _ in range(2)], f"step {i}")
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    return optimizers[0]


def step_next_to_eager(step, model, reference, batch, what: str, eager=None) -> None:
    """One call of `step` and of `eager` (default: `reference` itself) on `batch`, both backward: equal losses, and
    this rank's gradients equal eager's."""
    loss = step(*batch)
    loss.backward()
    expected = (eager or reference)(*batch)
    expected.backward()
    assert_close(loss, expected, f"loss of {what}")
    assert_owned_grads(model, reference, what)


def own_bytes(backend, model: torch.nn.Module, rank: int) -> int:
    """The bytes of the model's parameters and buffers that this rank's stages read (its share)."""
    runner = backend.runners[0]
    readers = runner.program.readers(runner.schedule.placement)
    state = {id(t) for t in [*model.parameters(), *model.buffers()]}
    own = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for i, t in runner.state.items()
           if rank in readers.get(i, set()) and id(t) in state}
    return sum(own.values())


def held_bytes(model: torch.nn.Module) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()] if not is_released(t)}
    return sum(storages.values())


def pooled_at_lengths(lengths, **options):
    """tests.models.Pooled trained with zb (release on) next to eager at each sequence length in turn; returns
    (backend, model, reference)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = models.Pooled()
    reference = copy.deepcopy(model)
    backend = zb.ZbBackend({"schedule": "zb-h1", "microbatches": 4, "compiler": "eager", "timeout": 120.0,
                            **options})
    step = torch.compile(model, backend=backend)
    for length in lengths:
        generator = torch.Generator().manual_seed(length)
        batch = [torch.randint(0, 256, (8, length), generator=generator), torch.randn(8, 32, generator=generator)]
        for m in (model, reference):
            m.zero_grad(set_to_none=True)
        step_next_to_eager(step, model, reference, batch, f"length {length}")
    return backend, model, reference


def changing_lengths(rank: int, symbolic: bool) -> None:
    """With release, sequence lengths 16, 2, 8, 12 (whose balanced cuts differ for this model: tests.models.Pooled)
    keep the first pipeline's cuts: eager's losses and gradients, and each rank still holds only its own stages'
    tensors. One pipeline per length with option symbolic_sizes=False; else the static first one and one with the
    length symbolic, traced at 2, serving 8 and 12."""
    backend, model, reference = pooled_at_lengths((16, 2, 8, 12), symbolic_sizes=symbolic)
    cuts = {plan.cuts for plan in backend.plans}
    assert len(backend.plans) == (2 if symbolic else 4) and len(cuts) == 1, [p.cuts for p in backend.plans]
    assert all(graph.symbolic_failed is None for graph in backend.graphs)
    assert held_bytes(model) == own_bytes(backend, model, rank) < held_bytes(reference)


def recut_then_other_lengths(rank: int) -> None:
    """Option release with rebalance: the re-cut after the first step (forced: stage 0 measured three times as slow)
    moves parameters between ranks, the ranks then hold their new stages' tensors, and the pipelines of later
    lengths keep the new cuts (no second re-cut: it would cut apart from what was released). Eager's gradients."""
    from tests.distributed.pipeline_check import force_recut

    force_recut()
    backend, model, reference = pooled_at_lengths((16, 16, 12, 12, 9), rebalance=True)
    cuts = {plan.cuts for plan in backend.plans if plan.measured_stage_times is not None}
    assert len(cuts) == 1, f"re-cut {len(cuts)} times: {cuts}"
    kept = {entry.plan.cuts for graph in backend.graphs for entry in graph.cache.entries.values()}
    assert kept == cuts, (kept, cuts)
    assert held_bytes(model) == own_bytes(backend, model, rank) < held_bytes(reference)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-release", action="store_true")
    parser.add_argument("--checkpoint", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    builds = []
    original = CompiledGraph.build_plan
    CompiledGraph.build_plan = lambda self, *a, **k: builds.append(1) or original(self, *a, **k)

    torch.manual_seed(0)
    model, batch = models.gpt()
    reference = copy.deepcopy(model)
    total = held_bytes(model)
    backend = zb.ZbBackend({"schedule": "zb-h1", "microbatches": 4, "compiler": "eager", "timeout": 120.0,
                            "release": not args.no_release})
    step = torch.compile(model, backend=backend)
    optimizer = train_next_to_eager(step, model, reference, tuple(batch[0].shape))
    own = own_bytes(backend, model, rank)
    held = held_bytes(model)
    if args.no_release:
        assert held == total, (held, total)
    else:
        assert held == own < total, (rank, held, own, total)
        released = [(n, p) for n, p in model.named_parameters() if is_released(p)]
        assert released, "nothing was released"
        name, p = released[0]
        for touch in (lambda: p + 1, lambda: p.sum(), lambda: copy.deepcopy(model), lambda: str(p)):
            try:
                touch()
            except zb.ZbError as e:
                assert f"pipeline rank {1 - rank}" in str(e), str(e)
            else:
                raise AssertionError(f"reading the released {name} raised nothing")
    # The release changes the tensors' class, Dynamo's type guard fails and it traces again; that graph's code
    # equals the first one's (zb/dynamo.py keeps its microbatch re-traces out of Dynamo's size record, so the
    # new trace stays static), and it finds its pipeline in the shared plan cache: zb plans once.
    assert len(builds) == 1, f"zb planned {len(builds)} times"

    with torch.no_grad():  # evaluation through the compiled function
        generator = torch.Generator().manual_seed(7)
        batch = [torch.randint(0, 256, tuple(a.shape), generator=generator) for a in batch]
        torch.testing.assert_close(step(*batch), reference(*batch), rtol=1e-5, atol=1e-6)
    full = zb.full_state_dict(model)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(full[key], value, rtol=1e-5, atol=1e-6, msg=key)
    own_state = model.state_dict()
    assert 0 < len(own_state) < len(full), (len(own_state), len(full))

    with tempfile.TemporaryDirectory() as scratch:
        path = args.checkpoint or scratch
        obj = [path]
        dist.broadcast_object_list(obj)
        zb.save_checkpoint(obj[0] + "/ck", model, optimizer)
        zb.load_checkpoint(obj[0] + "/ck", model, optimizer)
        dist.barrier()
    for key, value in zb.full_state_dict(model).items():
        torch.testing.assert_close(value, full[key], rtol=0, atol=0, msg=key)
    if not args.no_release:
        changing_lengths(rank, symbolic=False)
        changing_lengths(rank, symbolic=True)
        recut_then_other_lengths(rank)
    sys.stdout.write(f"ok release {rank} {held} {own} {total}\n")  # one write: the ranks share the pipe
    sys.stdout.flush()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
