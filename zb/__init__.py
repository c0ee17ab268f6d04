"""zb: zero-bubble pipeline parallelism as a torch.compile backend.

    step = torch.compile(loss_fn, backend="zb", options={"microbatches": 4})
    loss = step(x, y); loss.backward(); opt.step(); opt.zero_grad()

    plan = zb.explain(loss_fn, x, y, microbatches=4)   # the graphs zb built, without running them

The package is lazy: `import zb`, `import zb.schedules` and the `zb` command line load torch only when a name
that needs it is first used, so planning schedules and `zb --help` start instantly.
"""

from __future__ import annotations

import importlib
from typing import Any

from zb.core.errors import ZbError, ZbOptionError, ZbPeerError, ZbUnsupportedError

# name -> (module, attribute): loaded on first use.
_LAZY = {
    "Options": ("zb.core.options", "Options"),
    "Plan": ("zb.passes.plan", "Plan"),
    "ZbBackend": ("zb.backend", "ZbBackend"),
    "zb_backend": ("zb.backend", "zb_backend"),
    "explain": ("zb.backend", "explain"),
    "step_history": ("zb.runtime.optimizer", "history"),
    "synchronize": ("zb.runtime.optimizer", "synchronize"),
    "full_optimizer_state_dict": ("zb.runtime.optimizer", "full_state_dict"),
    "save_checkpoint": ("zb.checkpoint", "save_checkpoint"),
    "load_checkpoint": ("zb.checkpoint", "load_checkpoint"),
    "full_state_dict": ("zb.checkpoint", "full_state_dict"),
    "checkpoint_exists": ("zb.checkpoint", "checkpoint_exists"),
    "defer": ("zb.materialize", "defer"),
    "initialize": ("zb.materialize", "initialize"),
}

__all__ = ["Options", "Plan", "ZbBackend", "ZbError", "ZbOptionError", "ZbPeerError", "ZbUnsupportedError",
           "checkpoint_exists",
           "defer", "explain", "full_optimizer_state_dict", "full_state_dict", "load_checkpoint", "save_checkpoint",
           "initialize", "step_history", "synchronize", "zb_backend"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'zb' has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
