"""Which source answers each aten op of real models in analyze_batch (zb's rules, DTensor's, the random-data
check), how many routing steps it recognised, and how long the pass takes: the table in docs/exactness.md.

    python bench/batch_rules.py
"""

from __future__ import annotations

import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import zb  # noqa: E402
from tests import hf_models  # noqa: E402


def main() -> None:
    families = {**hf_models.FAMILIES, **getattr(hf_models, "MOE_FAMILIES", {})}
    print("| model | zb's rules | DTensor | random-data check | routing steps | mixing (the loss's own) | time |")
    print("|---|---|---|---|---|---|---|")
    for name, build in families.items():
        torch._dynamo.reset()  # one compiled lambda per model: stay under Dynamo's recompile limit
        torch.manual_seed(0)
        model = build()
        ids, labels = hf_models.batch()
        backend = zb.ZbBackend({"stages": 2, "microbatches": 4, "compiler": "eager"}, codegen=False)
        torch.compile(lambda x, y, m=model: hf_models.loss_fn(m, x, y), backend=backend)(ids, labels)
        plan = backend.plans[0]
        count = {k.split(".", 1)[1]: v for k, v in plan.counters.items() if k.startswith("analyze_batch.")}
        seconds = next(r.seconds for r in plan.history if r.name == "analyze_batch")
        print(f"| {name} | {count.get('own', 0)} | {count.get('dtensor', 0)} | {count.get('empirical', 0)} | "
              f"{count.get('routing', 0)} | {count.get('mixing', 0)} | {seconds * 1e3:.0f} ms |")


if __name__ == "__main__":
    main()
