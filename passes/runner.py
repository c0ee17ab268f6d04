"""Runs the ordered pass list: logs each pass and its time, verifies the plan after it, dumps graphs.

With ZB_DUMP_DIR=<dir> every pass writes `<dir>/NN_<pass>/stage<i>_<graph>.py` (readable graph code), and the
final pieces go to `<dir>/final/`. A failing pass raises `PassError` naming the pass and the passes before it.
"""

from __future__ import annotations

import logging
import os
import pathlib
import time
from collections.abc import Callable

from zb.passes.plan import PassRecord, Plan, input_keys, output_keys
from zb.passes.verify import verify_plan

from zb.core.errors import ZbError

log = logging.getLogger(__name__)

Pass = Callable[[Plan], Plan]


class PassError(ZbError):
    """A pass failed; the message names it and the passes that ran before it."""


def run_passes(plan: Plan, passes: list[Pass], dump_dir: str | None = None) -> Plan:
    dump_dir = dump_dir if dump_dir is not None else os.environ.get("ZB_DUMP_DIR")
    verify = os.environ.get("ZB_VERIFY", "0") not in ("", "0")
    done: list[str] = []
    for number, fn in enumerate(passes, start=1):
        name = fn.__name__
        start = time.perf_counter()
        try:
            plan = fn(plan)
            if verify:
                verify_plan(plan)
        except ZbError as e:
            if done:
                e.add_note(f"(raised by zb pass {name!r} after {done})")
            raise
        except Exception as e:
            raise PassError(f"pass {name!r} failed after {done}: {type(e).__name__}: {e}") from e
        seconds = time.perf_counter() - start
        plan.history.append(PassRecord(name, seconds))
        log.info("pass %s: %.0f ms", name, seconds * 1e3)
        if dump_dir:
            dump_plan(plan, pathlib.Path(dump_dir) / f"{number:02d}_{name}")
        done.append(name)
    return plan


def dump_plan(plan: Plan, directory: pathlib.Path) -> list[pathlib.Path]:
    """Write the whole model's torch-level graph and every graph of every stage as readable Python; returns the
    files written."""
    directory.mkdir(parents=True, exist_ok=True)
    model = directory / "model_graph.py"
    model.write_text("# zb: the model's torch-level graph (one microbatch), before the cut into stages\n"
                     + plan.graph.print_readable(print_output=False))
    written = [model]
    for stage in plan.stages:
        for name, gm in stage.graphs().items():
            path = directory / f"stage{stage.index}_{name}.py"
            header = (f"# zb stage {stage.index} {name}\n# inputs: {[str(k) for k in input_keys(gm)]}\n"
                      f"# outputs: {[k if k is None else str(k) for k in output_keys(gm)]}\n")
            path.write_text(header + gm.print_readable(print_output=False))
            written.append(path)
    return written

