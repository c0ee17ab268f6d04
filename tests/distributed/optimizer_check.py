"""Run under torchrun: options["optimizer"] across processes against synchronous single-process training.

    torchrun --nproc-per-node 4 tests/distributed/optimizer_check.py --cases adamw:zb-h1:1,sgd:1f1b:0

Each case is optimizer:schedule:post_validation. Every rank trains the zb pipeline and, itself, the reference
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
from tests.optim_check import assert_same_training, train_both  # noqa: E402
from zb.runtime.optimizer import history  # noqa: E402
from zb.runtime.released import is_released  # noqa: E402


def check(kind: str, schedule: str, post_validation: bool, rank: int, world: int) -> None:
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
