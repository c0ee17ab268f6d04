"""Run under torchrun: options["optimizer"] across processes against synchronous single-process training.

    torchrun --nproc-per-node 4 tests/distributed/optimizer_check.py --cases adamw:zb-h1:1,sgd:1f1b:0

Each case is optimizer:schedule:post_validation; optimizer "scaled" is SGD under float16 autocast with a
torch.amp.GradScaler (option grad_scaler, tests/optim_check.py train_scaled), against eager with its scaler: the
same skipped steps and, on every rank, the same scaler state after the run; "mismatched" builds the scalers
differently on the ranks, which every rank must refuse. Every rank trains the zb pipeline and, itself, the reference
(tests/optim_check.py: 20 steps, some clipped, some not, two with non-finite gradients). After
`zb.synchronize`, the parameters a rank updates (those it holds optimizer state for) and their optimizer state
must equal the reference within rtol 1e-5; the others must be untouched; every parameter must be updated on
some rank. Prints one `ok <case>` line per case on rank 0.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

import torch
import torch.distributed as dist

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests import models  # noqa: E402
from tests.optim_check import assert_same_scaling, assert_same_training, train_both, train_scaled  # noqa: E402
from zb.runtime.optimizer import history  # noqa: E402
from zb.runtime.released import is_released  # noqa: E402


def check_scaled(schedule: str, post_validation: bool, rank: int, world: int) -> None:
    torch._dynamo.reset()
    run = train_scaled({"schedule": schedule, "microbatches": 2 * world, "compiler": "eager", "timeout": 120.0,
                        "post_validation": post_validation})
    what = f"scaled {schedule} post_validation={post_validation} on rank {rank}"
    # A process without rank 0 learns a step's verdict (and updates its scale) when the next step begins.
    assert_same_scaling(run, what, validated_at_once=rank == 0)
    state = run.optimizer.state_dict()["state"]
    names = [n for n, _ in run.model.named_parameters()]
    assert_same_training(run.model, run.optimizer, run.reference, run.ref_optimizer, what,
                         owned={names[i] for i in state})


def check_mismatched_scalers(schedule: str, rank: int) -> None:
    """Scalers built differently on the ranks: every rank refuses the first step, naming option grad_scaler."""
    import zb

    torch._dynamo.reset()
    model = models.DeepMLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** (14 + rank))
    step = torch.compile(model, backend=zb.ZbBackend({"schedule": schedule, "microbatches": 4, "compiler": "eager",
                                                      "optimizer": optimizer, "grad_scaler": scaler}))
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            step(torch.randn(8, 16), torch.randn(8, 16))
    except zb.ZbError as e:
        assert "GradScalers differ" in str(e), e
    else:
        raise AssertionError("differently built scalers were not refused")


def check(kind: str, schedule: str, post_validation: bool, rank: int, world: int) -> None:
    if kind == "mismatched":
        return check_mismatched_scalers(schedule, rank)
    if kind == "scaled":
        return check_scaled(schedule, post_validation, rank, world)
    torch._dynamo.reset()
    torch.manual_seed(0)
    initial = {n: p.detach().clone() for n, p in models.DeepMLP().named_parameters()}
    model, opt, ref_model, ref_opt, did, _ = train_both(kind, {
        "schedule": schedule, "microbatches": 2 * world, "compiler": "eager", "timeout": 120.0,
        "post_validation": post_validation,
    })
    assert {"plain", "clipped", "skipped"} <= set(did), did
    state = opt.state_dict()["state"]  # validates this rank's last step
    names = [n for n, _ in model.named_parameters()]
    owned = {names[i] for i in state}
    what = f"{kind} {schedule} post_validation={post_validation} on rank {rank}"
    assert_same_training(model, opt, ref_model, ref_opt, what, owned=owned)
    for name, p in model.named_parameters():
        if name not in owned and not is_released(p):  # another rank's: released here (option release), or as it was
            torch.testing.assert_close(p.detach(), initial[name], rtol=0, atol=0,
                                       msg=lambda m, n=name: f"{what}: {n} is another rank's, yet changed: {m}")
    everyone: list = [None] * world
    dist.all_gather_object(everyone, owned)
    missing = set(names) - set().union(*everyone)
    assert not missing, f"{what}: no rank updated {sorted(missing)}"
    records = history(opt)
    assert [("skipped" if h.skipped else "clipped" if h.clipped else "plain") for h in records] == did, what
    rolled: list = [None] * world
    dist.all_gather_object(rolled, sum(h.rolled_back for h in records))
    if post_validation:
        assert sum(rolled) > 0, f"{what}: no early update was ever rolled back; the check tests nothing"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="adamw:zb-h1:1,sgd:zb-v:1,adam:1f1b:0")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for case in args.cases.split(","):
        kind, schedule, pv = case.split(":")
        check(kind, schedule, pv == "1", rank, world)
        dist.barrier()
        if rank == 0:
            print(f"ok {case} ({world} ranks)", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("ZB_VERIFY", "1")
    main()
