"""The caller's autocast state: part of a call's signature, applied by the passes op by op, off around the rest.

The passes make autocast's casts explicit in the graph (passes/autocast_regions.py), so the compiled pieces hold
them already: zb runs the passes, the compilers and the pieces with the caller's autocast off, lest it apply twice.
"""

from __future__ import annotations

import contextlib

import torch


def autocast_state() -> dict[str, tuple[bool, torch.dtype]]:
    """The autocast state here, per device type: (enabled, dtype); the dtype matters even while disabled (a region
    opened with dtype=None inside takes it)."""
    return {device: (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)) for device in ("cpu", "cuda")}


@contextlib.contextmanager
def no_autocast():
    """Autocast off for every device type that has it on (the caller's state comes back afterwards)."""
    with contextlib.ExitStack() as stack:
        for device, (enabled, _) in autocast_state().items():
            if enabled:
                stack.enter_context(torch.autocast(device, enabled=False))
        yield
