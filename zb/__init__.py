"""zb: zero-bubble pipeline parallelism as a torch.compile backend.

    step = torch.compile(loss_fn, backend="zb", options={"microbatches": 4})
    loss = step(x, y); loss.backward(); opt.step(); opt.zero_grad()

    plan = zb.explain(loss_fn, x, y, microbatches=4)   # the graphs zb built, without running them
"""

from __future__ import annotations

from typing import Any

import torch

from zb.backend import ZbBackend, zb_backend
from zb.errors import ZbError, ZbOptionError, ZbUnsupportedError
from zb.options import Options
from zb.passes.plan import Plan
from zb.runtime.optimizer import history as step_history
from zb.runtime.optimizer import synchronize

__all__ = ["Options", "Plan", "ZbBackend", "ZbError", "ZbOptionError", "ZbUnsupportedError", "explain",
           "step_history", "synchronize", "zb_backend"]


def explain(model: Any, *example_inputs: Any, **options: Any) -> Plan:
    """Capture `model(*example_inputs)` and run every zb pass on it; returns the Plan (nothing is compiled).

    The model runs once eagerly (as traced by Dynamo) to capture its graph; no gradients are left behind.
    """
    backend = ZbBackend(options, codegen=False)
    compiled = torch.compile(model, backend=backend, dynamic=False)
    compiled(*example_inputs)
    plans = backend.plans
    if not plans:
        raise ZbError("Dynamo captured no graph: the model ran no tensor operations zb could compile")
    return plans[0]
