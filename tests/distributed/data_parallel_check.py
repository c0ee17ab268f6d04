"""Run under torchrun: D data-parallel replicas of a pipeline against single-process eager on the global batch.

    torchrun --nproc-per-node 4 tests/distributed/data_parallel_check.py --replicas 2 --cases gpt:zb-h1,mlp:1f1b

Global rank g is pipeline rank g % P of replica g // P (P = world / D, zb/pipeline.py). Every step draws one
global batch (the same on every rank); replica d is handed rows [d*B/D, (d+1)*B/D) of it, as a data loader
sharded by replica would. Each rank computes the eager reference itself, on the whole global batch.

Cases:
  model:schedule[:mesh][:m1]        3 steps of loss.backward() + SGD (momentum): the step's loss equals eager's
                                    global loss, the gradient of every parameter this rank's stages produce equals
                                    eager's, and after the steps so do those parameters (rtol 1e-5); with
                                    `mesh`, through a DeviceMesh the script builds and passes as option 'mesh';
                                    with `m1`, one microbatch per replica (else 2 per pipeline rank)
  loss:form:microbatches            tests/test_semantics.py's TokenNet on its padded batch (replica 0's rows hold
                                    far fewer tokens than replica 1's) with a loss form (LOSS_FORMS) or, for
                                    `extra`, a token mean returned with extra outputs: the loss, the scalar
                                    outputs (global), the per-sample output (this replica's rows) and the
                                    gradients equal eager's on the global batch
  autocast:schedule                 torch.autocast (bf16) inside the model: 3 SGD steps equal eager under the same
                                    autocast run microbatch by microbatch over the global batch
  policy:schedule                   options param_dtype=bf16: 3 SGD steps equal eager with a bf16 copy and float32
                                    sums over the global batch
  dead-rank                         the last rank exits after one step: every other rank raises a ZbError
  opt:kind:schedule:post:shard      options["optimizer"] + max_grad_norm (tests/optim_check.py's 20 steps, clipped
                                    and skipped ones), post-validation on/off, sharded optimizer state on/off:
                                    parameters and (on their owner) optimizer state equal synchronous training
  optgpt:kind:schedule:post:shard   the same with the GPT (tied head and embedding), 6 steps
  errors                            replicas built from different weights fail on every rank before any step;
                                    data_parallel not dividing the world size fails before any communication
Prints `ok <case>` per case on rank 0.
"""

from __future__ import annotations

import argparse
import copy
import os
import pathlib
import sys

import torch
import torch.distributed as dist

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import zb  # noqa: E402
from tests import models  # noqa: E402
from tests.helpers import assert_owned_grads  # noqa: E402
from tests.optim_check import MAX_NORM, OPTIMIZERS, RTOL, ATOL, batches, reference  # noqa: E402
from zb.runtime.optimizer import history  # noqa: E402
from zb.runtime.released import is_released  # noqa: E402

FACTORIES = {"gpt": models.gpt, "mlp": models.deep_mlp}
LOSS_FORMS = {"tokenmean": "token-mean cross entropy", "sum": "sum", "mean": "mean",
              "tokenmean+mean": "token mean plus a mean", "sumovercount": "sum over a token count",
              "sumoverbatch": "sum over the batch size, plus a regulariser"}


def part(tensor: torch.Tensor, replica: int, replicas: int) -> torch.Tensor:
    return tensor.chunk(replicas)[replica]


def check_gradients(model_name: str, schedule: str, replicas: int, compiler: str, mesh: bool = False,
                    microbatches: int | None = None) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    replica = rank // (world // replicas)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, args = FACTORIES[model_name]()
    args = [torch.cat([a] * replicas) for a in args]  # the global batch: BATCH rows per replica
    reference_model = copy.deepcopy(model)
    options = {"schedule": schedule, "microbatches": microbatches or 2 * (world // replicas), "compiler": compiler,
               "timeout": 120.0, "data_parallel": replicas}
    if mesh:  # the user's own DeviceMesh instead of data_parallel
        from torch.distributed.device_mesh import init_device_mesh

        options.pop("data_parallel")
        options["mesh"] = init_device_mesh("cpu", (replicas, world // replicas), mesh_dim_names=("dp", "pp"))
    step = torch.compile(model, backend="zb", options=options)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, reference_model)]
    what = f"{model_name} {schedule} on rank {rank} (replica {replica})"
    owned: set[str] = set()
    for i in range(3):
        torch.manual_seed(100 + i)
        batch = [torch.randint_like(a, 0, 256) if not a.is_floating_point() else torch.randn_like(a) for a in args]
        loss = step(*[part(a, replica, replicas) for a in batch])
        loss.backward()
        expected = reference_model(*batch)
        expected.backward()
        torch.testing.assert_close(loss, expected, rtol=RTOL, atol=ATOL,
                                   msg=lambda m, i=i: f"{what}: loss of step {i}: {m}")
        owned = assert_owned_grads(model, reference_model, f"{what}, step {i}")
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
    for (name, p), q in zip(model.named_parameters(), reference_model.parameters()):
        if name in owned:
            torch.testing.assert_close(p.detach(), q.detach(), rtol=RTOL, atol=ATOL,
                                       msg=lambda m, n=name: f"{what}: {n} after 3 steps: {m}")


def check_autocast(schedule: str, replicas: int, policy: bool = False) -> None:
    """tests/test_precision.py's Net, with torch.autocast (bf16) inside its forward: the loss and this rank's
    gradients equal eager under the same autocast run microbatch by microbatch over the global batch (the same
    operations: replica d's m microbatches are the global batch's microbatches d*m .. d*m+m-1), for 3 SGD steps.
    With `policy`: no autocast, options param_dtype=bf16 (float32 sums over microbatches and replicas) against
    tests/test_precision.py's policy_reference on the global batch."""
    from tests.test_precision import Net, microbatched, policy_reference

    rank, world = dist.get_rank(), dist.get_world_size()
    replica = rank // (world // replicas)
    m = 2 * (world // replicas)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Net(inside=not policy)
    reference = copy.deepcopy(model)
    options = {"schedule": schedule, "microbatches": m, "compiler": "eager", "timeout": 120.0,
               "data_parallel": replicas}
    if policy:
        options["param_dtype"] = torch.bfloat16
    step = torch.compile(model, backend="zb", options=options)
    optimizers = [torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9) for net in (model, reference)]
    for i in range(3):
        generator = torch.Generator().manual_seed(100 + i)
        batch = [torch.randn(8 * replicas, 16, generator=generator) for _ in range(2)]
        loss = step(*[part(a, replica, replicas) for a in batch])
        loss.backward()
        if policy:  # the reference's gradients: the float32 sums of its bfloat16 copy's
            expected, sums = policy_reference(reference, batch, m * replicas)
            for p, g in zip(reference.parameters(), sums):
                p.grad = g
        else:
            expected = microbatched(reference, batch, m * replicas, False)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        assert_owned_grads(model, reference, f"{'policy' if policy else 'autocast'} {schedule} rank {rank}, step {i}")
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()


def check_loss(form: str, microbatches: int, replicas: int) -> None:
    """One step of TokenNet with a loss form on the padded batch: every replica's weighting is global."""
    import torch.nn.functional as F

    from tests.test_semantics import LOSSES, TokenNet, padded_batch

    def extra(o, y):
        ce = F.cross_entropy(o.flatten(0, 1), y.flatten())
        return ce, ce.detach() * 2, o.pow(2).mean(), (y != -100).sum(), o

    loss_fn = extra if form == "extra" else LOSSES[LOSS_FORMS[form]]
    rank, world = dist.get_rank(), dist.get_world_size()
    replica = rank // (world // replicas)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TokenNet()
    reference_model = copy.deepcopy(model)
    x, y = padded_batch()
    step = torch.compile(lambda x, y: loss_fn(model(x), y), backend="zb", options={
        "stages": world // replicas, "microbatches": microbatches, "compiler": "eager", "timeout": 120.0,
        "data_parallel": replicas})
    got = step(part(x, replica, replicas), part(y, replica, replicas))
    want = loss_fn(reference_model(x), y)
    got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
    got[0].backward()
    want[0].backward()
    what = f"loss {form}, microbatches={microbatches} on rank {rank} (replica {replica})"
    for j, (a, b) in enumerate(zip(got, want)):
        if b.dim() > 0:  # a per-sample output: this replica's rows
            b = part(b, replica, replicas)
        torch.testing.assert_close(a.detach(), b.detach(), rtol=RTOL, atol=ATOL,
                                   msg=lambda m, j=j: f"{what}: output {j}: {m}")
    assert_owned_grads(model, reference_model, what)


def check_optimizer(kind: str, schedule: str, post_validation: bool, shard: bool, replicas: int,
                    model_name: str = "mlp") -> None:
    """options["optimizer"] with replicas: tests/optim_check.py's 20 steps on a global batch of 8 rows per
    replica (some clipped, one with an inf, one with a NaN) against synchronous single-process training; for the
    GPT (its head tied to the embedding, on both pipeline ranks) 6 steps of random tokens, clipped."""
    rank, world = dist.get_rank(), dist.get_world_size()
    replica = rank // (world // replicas)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = models.DeepMLP() if model_name == "mlp" else models.gpt()[0]
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref_model = copy.deepcopy(model)
    if model_name == "mlp":
        data = batches(batch=8 * replicas)
    else:
        generator = torch.Generator().manual_seed(1)
        data = [tuple(torch.randint(0, 256, (8 * replicas, 16), generator=generator) for _ in range(2))
                for _ in range(6)]
    ref_optimizer = OPTIMIZERS[kind](ref_model.parameters())
    did = reference(ref_model, ref_optimizer, data, MAX_NORM)
    optimizer = OPTIMIZERS[kind](model.parameters())
    step = torch.compile(model, backend="zb", options={
        "schedule": schedule, "microbatches": 2 * (world // replicas), "compiler": "eager", "timeout": 120.0,
        "data_parallel": replicas, "optimizer": optimizer, "max_grad_norm": MAX_NORM,
        "post_validation": post_validation, "shard_optimizer": shard})
    for x, y in data:
        step(part(x, replica, replicas), part(y, replica, replicas))
    what = f"{kind} {schedule} post_validation={post_validation} shard={shard} on rank {rank} (replica {replica})"
    state, ref_state = optimizer.state_dict()["state"], ref_optimizer.state_dict()["state"]  # validates
    names = [n for n, _ in model.named_parameters()]
    stepped = {n for n, p in model.named_parameters()  # released here: another rank's (option release)
               if not is_released(p) and not torch.equal(p.detach(), initial[n])}
    for i, ((name, p), q) in enumerate(zip(model.named_parameters(), ref_model.parameters())):
        if name in stepped:
            torch.testing.assert_close(p.detach(), q.detach(), rtol=RTOL, atol=ATOL,
                                       msg=lambda m, n=name: f"{what}: parameter {n}: {m}")
        for key, value in state.get(i, {}).items():
            torch.testing.assert_close(value, ref_state[i][key], rtol=RTOL, atol=ATOL,
                                       msg=lambda m, n=name, k=key: f"{what}: optimizer state {k} of {n}: {m}")
    everyone: list = [None] * world
    dist.all_gather_object(everyone, (stepped, {names[i] for i in state}))
    pipeline = range(replica * (world // replicas), (replica + 1) * (world // replicas))
    assert set(names) == set().union(*(everyone[r][0] for r in pipeline)), f"{what}: a parameter never stepped"
    # Optimizer state of each parameter: on every pipeline rank that updates it (a tied weight: two), in one
    # replica with sharding, in every replica without.
    holders = [sum(names[i] in everyone[r][1] for r in range(world)) for i in range(len(names))]
    updaters = [sum(names[i] in everyone[r][0] for r in pipeline) for i in range(len(names))]
    expected = [n * (1 if shard else replicas) for n in updaters]
    assert holders == expected, f"{what}: optimizer state held {holders} times, expected {expected}"
    if shard:  # the gathered state is the whole state of this pipeline rank's parameters, as unsharded
        full = zb.full_optimizer_state_dict(optimizer)["state"]
        mine = {i for i, (n, _) in enumerate(model.named_parameters()) if n in stepped}
        assert set(full) == mine, f"{what}: gathered state for {sorted(full)}, this rank updates {sorted(mine)}"
        for i in mine:
            for key, value in ref_state[i].items():
                torch.testing.assert_close(full[i][key], value, rtol=RTOL, atol=ATOL,
                                           msg=lambda m, i=i, k=key: f"{what}: gathered {k} of {names[i]}: {m}")
    records = history(optimizer)
    assert [("skipped" if h.skipped else "clipped" if h.clipped else "plain") for h in records] == did, what
    rolled: list = [None] * world
    dist.all_gather_object(rolled, sum(h.rolled_back for h in records))
    if post_validation:
        assert sum(rolled) > 0, f"{what}: no early update was ever rolled back; the check tests nothing"


def check_errors(replicas: int) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    replica = rank // (world // replicas)
    torch._dynamo.reset()
    torch.manual_seed(replica)  # each replica builds its own weights: the classic mistake
    model, args = models.mlp()
    step = torch.compile(model, backend="zb", options={"compiler": "eager", "data_parallel": replicas,
                                                       "microbatches": 2, "timeout": 60.0})
    try:
        step(*args)
    except zb.ZbError as e:
        assert "replicas start from different weights" in str(e) and "manual_seed" in str(e), e
    else:
        raise AssertionError(f"rank {rank}: replicas with different weights trained")
    torch._dynamo.reset()
    step = torch.compile(model, backend="zb", options={"compiler": "eager", "data_parallel": world + 1})
    try:
        step(*args)
    except Exception as e:  # torch.compile wraps the backend's ZbOptionError
        assert f"data_parallel={world + 1} does not divide the world size {world}" in str(e), e
    else:
        raise AssertionError(f"rank {rank}: a data_parallel not dividing the world size ran")


def check_dead_rank(replicas: int) -> None:
    """The last rank exits after one healthy step; every other rank raises a ZbError within the timeout."""
    import time

    rank, world = dist.get_rank(), dist.get_world_size()
    replica = rank // (world // replicas)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, args = models.deep_mlp()
    step = torch.compile(model, backend="zb", options={"compiler": "eager", "data_parallel": replicas,
                                                       "microbatches": 4, "timeout": 10.0, "schedule": "zb-h1"})
    step(*[part(a, replica, replicas) for a in args]).backward()
    if rank == world - 1:
        os._exit(0)
    start = time.perf_counter()
    try:
        step(*[part(a, replica, replicas) for a in args]).backward()
    except zb.ZbError as e:
        print(f"caught on rank {rank} after {time.perf_counter() - start:.1f} s: {e}", flush=True)
        sys.exit(0)  # a normal shutdown, clean after the failure (runtime/comm_threads.py `_settle`)
    raise SystemExit(f"rank {rank} finished a step without rank {world - 1}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--cases", default="mlp:1f1b")
    parser.add_argument("--compiler", default="eager")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for case in args.cases.split(","):
        fields = case.split(":")
        if fields[0] == "errors":
            check_errors(args.replicas)
        elif fields[0] == "dead-rank":
            check_dead_rank(args.replicas)
        elif fields[0] in ("opt", "optgpt"):
            _, kind, schedule, post, shard = fields
            check_optimizer(kind, schedule, post == "1", shard == "1", args.replicas,
                            "gpt" if fields[0] == "optgpt" else "mlp")
        elif fields[0] in ("autocast", "policy"):
            check_autocast(fields[1], args.replicas, policy=fields[0] == "policy")
        elif fields[0] == "loss":
            check_loss(fields[1], int(fields[2]), args.replicas)
        else:
            check_gradients(fields[0], fields[1], args.replicas, args.compiler, mesh="mesh" in fields[2:],
                            microbatches=1 if "m1" in fields[2:] else None)
        dist.barrier()
        if rank == 0:
            print(f"ok {case} ({dist.get_world_size()} ranks, {args.replicas} replicas)", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("ZB_VERIFY", "1")
    main()
