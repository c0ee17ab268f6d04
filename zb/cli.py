"""The `zb` command line (also `python -m zb`).

    zb inspect MODULE:FACTORY [--microbatches N] [--compiler eager|inductor] [--out DIR] [--emit triton]
    zb check MODULE:FACTORY [zb options] [--optimizer sgd|adam|adamw]
    zb schedule --schedule zb-h2 --stages 4 --microbatches 8 --costs F=1,B=1,W=1,comm=0 [--memory-limit 2p]
                [--chunks 2] [--out timeline.svg] [--csv out.csv] [--json] [--lowered]
                [--data-parallel 8 --param-bytes 375e6 [--bandwidth 25] [--latency 10] [--time-unit ms]]
                [--exact [--time-limit 10]]

MODULE is a dotted module name or a path to a .py file; FACTORY() returns (model, example_args). `inspect`
runs every zb pass on the model (nothing is compiled or trained), prints the plan's summary and writes each
stage's graphs as readable Python files under --out (with --emit triton, also the Triton code Inductor
generates for each piece). `check` compiles the model and runs every piece (each stage's F, B, W, each fused
attention, the fused optimizer update) against eager PyTorch in float64, prints one row per piece and exits 1 if
any is outside its dtype's tolerance. `schedule` generates a pipeline schedule, times it with the
simulator and prints a text timeline and a summary (makespan, bubble rate, peak memory per rank, and the longest
rank span: how far it is above the lower bound any schedule of that placement has); with --data-parallel (or R= in
--costs) also each stage's gradient reduction over the replicas, the step time and the reduction time the pipeline
does not hide. With --exact the plan is the exact solver's for the same placement and memory limit (CP-SAT, needs
`pip install 'zb[exact]'`): optimal, or the best found in --time-limit seconds and the solver's bound.
"""

from __future__ import annotations

import argparse
import importlib
import json
import importlib.util
import pathlib
import sys
from typing import Any
from collections.abc import Callable

from zb.core.errors import ZbError
from zb.schedules.actions import ScheduleError
from zb.core.options import Options


# Options that take an object (a process group, an optimizer, a device mesh) exist only inside a program: no flag
# for them (`check` has its own --optimizer, a choice of optimizer class).
NOT_ON_THE_COMMAND_LINE = ("group", "optimizer", "mesh")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="zb", description="zero-bubble pipeline parallelism for torch.compile", allow_abbrev=False
    )
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser(
        "inspect", help="run the zb passes on a model and show what they built", allow_abbrev=False
    )
    inspect.add_argument("target", metavar="MODULE:FACTORY", help="FACTORY() returns (model, example_args)")
    inspect.add_argument("--out", default="zb-inspect", help="directory for the graph files (default: %(default)s)")
    inspect.add_argument("--emit", choices=("triton",), default=None,
                         help="also write the Triton code Inductor generates for every piece (works without a GPU: "
                         "the code is generated, not run), and zb's own Triton kernels")
    _add_option_flags(inspect)
    inspect.set_defaults(run=_inspect)
    check = commands.add_parser(
        "check", help="run every compiled piece against eager PyTorch (float64) and report the errors",
        allow_abbrev=False,
    )
    check.add_argument("target", metavar="MODULE:FACTORY", help="FACTORY() returns (model, example_args)")
    check.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), default=None,
                       help="also check zb's fused update for this optimizer against torch.optim")
    _add_option_flags(check)
    check.set_defaults(run=_check)
    _add_schedule_command(commands)
    _add_checkpoint_command(commands)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ZbError, ScheduleError) as e:
        print(f"zb: error: {e}", file=sys.stderr)
        return 2


def _add_option_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("zb options (as in torch.compile(..., options={...}))")
    for name, default, doc in Options.describe():
        if name in NOT_ON_THE_COMMAND_LINE:
            continue
        group.add_argument(f"--{name.replace('_', '-')}", dest=f"option_{name}", metavar="VALUE",
                           help=f"{doc} (default: {default!r})")


def _options_from(args: argparse.Namespace) -> dict[str, Any]:
    """The zb options given as flags, converted and validated (ZbOptionError for a malformed or wrong value), so a
    bad flag fails before the model is built."""
    options = {}
    for name, _, _ in Options.describe():
        if name in NOT_ON_THE_COMMAND_LINE:
            continue
        text = getattr(args, f"option_{name}", None)
        if text is not None:
            options[name] = Options.parse_cli_value(name, text)
    Options.from_dict(options)
    return options


def _inspect(args: argparse.Namespace) -> int:
    import zb
    from zb.passes import dump_plan

    options = _options_from(args)
    factory = load_factory(args.target)
    model, example_args = factory()
    plan = zb.explain(model, *example_args, **options)
    print(plan.summary())
    written = dump_plan(plan, pathlib.Path(args.out))
    print(f"wrote {len(written)} graph files to {args.out}/: " + ", ".join(p.name for p in written))
    if args.emit == "triton":
        from zb.codegen.emit import emit_plan

        emitted = emit_plan(plan, pathlib.Path(args.out))
        print(f"wrote {len(emitted)} Triton files to {args.out}/: "
              + ", ".join(f"{p.name} ({n} kernels)" for p, n in emitted))
    return 0


def _check(args: argparse.Namespace) -> int:
    from zb.check import check, format_table

    options = _options_from(args)
    factory = load_factory(args.target)
    model, example_args = factory()
    rows = check(model, example_args, options, optimizer=args.optimizer)
    print(format_table(rows))
    return 0 if all(r.passed for r in rows) else 1


def _add_schedule_command(commands) -> None:
    from zb.schedules import SCHEDULES

    schedule = commands.add_parser(
        "schedule", help="generate, simulate and draw a pipeline schedule (no torch needed)", allow_abbrev=False
    )
    schedule.add_argument("--schedule", choices=SCHEDULES, default="zb-h1")
    schedule.add_argument("--stages", type=int, default=4, help="pipeline stages in all (ranks = stages / chunks)")
    schedule.add_argument("--ranks", type=int, default=None,
                          help="with zb-auto: the number of ranks, zb-auto choosing the placement (one stage per "
                          "rank, V or interleaved); --costs then give one stage per rank (halved for two)")
    schedule.add_argument("--microbatches", type=int, default=8)
    schedule.add_argument("--chunks", type=int, default=None,
                          help="stages per rank: 2 for zb-v, >= 2 for interleaved-1f1b, else 1 (the default)")
    schedule.add_argument("--costs", default="F=1,B=1,W=1,comm=0",
                          help="per-stage times and memory: F=,B=,W=,comm=,MB=,MW=, and R= (the gradient reduction) "
                          "(a:b:c for one value per stage)")
    schedule.add_argument("--memory-limit", default=None, help="zb-auto's per-rank limit: '1p', '2p' or a number")
    schedule.add_argument("--load-csv", metavar="FILE", help="read the schedule from a torch-format CSV instead")
    schedule.add_argument("--out", metavar="FILE", help="write the timeline picture (.png or .svg)")
    schedule.add_argument("--csv", metavar="FILE", help="write the schedule as torch.distributed.pipelining CSV")
    schedule.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    schedule.add_argument("--width", type=int, default=100, help="columns of the text timeline")
    schedule.add_argument("--lowered", action="store_true",
                          help="also print the lowered schedule (sends, receives, and R: a stage's gradient reduction)")
    schedule.add_argument("--exact", action="store_true",
                          help="solve for the shortest schedule of the same placement within --memory-limit (default "
                          "2p) with OR-Tools CP-SAT (pip install 'zb[exact]'; small pipelines) and print it with its "
                          "status: optimal, or the best found and the solver's bound")
    schedule.add_argument("--time-limit", type=float, default=10.0, metavar="S",
                          help="seconds the exact solver may search (default: %(default)s)")
    reduction = schedule.add_argument_group(
        "data parallelism", "each stage's gradients are all-reduced over D replicas, in a ring: 2(D-1)/D x bytes / "
        "bandwidth + 2(D-1) x latency (or give that time per stage as R= in --costs)")
    reduction.add_argument("--data-parallel", type=int, default=1, metavar="D", help="pipeline replicas (default 1)")
    reduction.add_argument("--param-bytes", metavar="BYTES",
                           help="gradient bytes of each stage (a:b:c for one value per stage)")
    reduction.add_argument("--bandwidth", type=float, default=25.0, metavar="GB/S",
                           help="all-reduce bandwidth per GPU in GB/s (default: %(default)s)")
    reduction.add_argument("--latency", type=float, default=10.0, metavar="US",
                           help="latency of one ring step in us (default: %(default)s)")
    reduction.add_argument("--time-unit", choices=tuple(TIME_UNITS), default="ms",
                           help="the unit of the times in --costs (default: %(default)s)")
    reduction.add_argument("--reduction", choices=("overlap", "after", "none"), default="overlap",
                           help="when reductions run: as each stage's last W ends (zb), after the rank's last "
                           "compute (data parallelism after the pipeline), or not at all (default: %(default)s)")
    schedule.set_defaults(run=_schedule)


TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}  # seconds per unit


def _reduction_costs(costs, args: argparse.Namespace):
    """`costs` with --data-parallel's all-reduce times, converted to the unit of --costs."""
    if args.data_parallel < 1:
        raise ScheduleError(f"--data-parallel must be at least 1, got {args.data_parallel}")
    if args.data_parallel == 1:
        return costs
    if args.param_bytes is None:
        raise ScheduleError("--data-parallel needs --param-bytes (the gradient bytes of each stage)")
    if any(costs.reduce):
        raise ScheduleError("give the reduction time either as R= in --costs or by --data-parallel's model, not both")
    try:
        sizes = tuple(float(v) for v in args.param_bytes.split(":"))
    except ValueError:
        raise ScheduleError(f"--param-bytes {args.param_bytes!r}: give a number or one per stage (a:b:c)") from None
    unit = TIME_UNITS[args.time_unit]
    return costs.with_reduction(sizes[0] if len(sizes) == 1 else sizes, args.data_parallel,
                                args.bandwidth * 1e9 * unit, args.latency * 1e-6 / unit)


def _schedule(args: argparse.Namespace) -> int:
    import json

    from zb.schedules import Costs, draw, from_csv, generate, lower, simulate, to_csv, to_text, validate
    from zb.schedules.bound import lower_bound

    decision = None
    if args.load_csv:
        plan = from_csv(args.load_csv)
        validate(plan)
    elif args.ranks is not None:
        if args.schedule != "zb-auto":
            raise ZbError(f"--ranks lets zb-auto choose the placement; for {args.schedule} give --stages (and "
                          "--chunks)")
        from zb.schedules import choose_placement

        per_rank = Costs.parse(args.costs, args.ranks)
        decision = choose_placement(args.ranks, args.microbatches, per_rank, args.memory_limit)
        plan = decision.schedule
    else:
        costs = Costs.parse(args.costs, args.stages)
        limit = args.memory_limit if args.schedule == "zb-auto" or not args.exact else None
        plan = generate(args.schedule, args.stages, args.microbatches, costs, limit, args.chunks)
    placed = per_rank.split(decision.chunks) if decision and decision.chunks > 1 else (
        per_rank if decision else Costs.parse(args.costs, plan.num_stages))
    costs = _reduction_costs(placed, args)
    exact = _solve_exactly(plan, costs, args) if args.exact else None
    if exact:
        requested = simulate(plan, costs)
        requested = (plan.name, max(requested.span(r) for r in range(plan.num_ranks)))
        plan = exact.schedule
    timeline = simulate(plan, costs, args.reduction)
    span = max(timeline.span(r) for r in range(plan.num_ranks))
    bound = lower_bound(plan.placement, plan.num_microbatches, costs)
    lowered = lower(plan, reduce=any(costs.reduce)) if args.lowered else None
    if args.out:
        draw(timeline, args.out)
    if args.csv:
        to_csv(plan, args.csv)
    if args.json:
        extra = {"lowered": lowered.as_lists()} if lowered else {}
        if exact:
            extra["exact"] = {"status": exact.status, "longest_span": exact.value, "bound": exact.bound,
                              "time_limit": args.time_limit}
        print(json.dumps({**timeline.summary(), "longest_span": span, "lower_bound": bound,
                          "schedule": plan.as_lists(), **extra}))
        return 0
    print(to_text(timeline, args.width))
    if decision:
        print(f"placement: {decision.placement}, {decision.chunks} stage(s) per rank ({decision.reason})")
    print(f"makespan {timeline.makespan:g}, bubble rate {timeline.bubble_rate:.4f}, peak memory per rank "
          f"{[round(p, 6) for p in timeline.peak_memory]}")
    print(f"longest rank span {span:g} (the step time), within {_percent(span, bound)} of the lower bound {bound:g}")
    if exact:
        print(_exact_line(exact, args.time_limit) + f"; {requested[0]}'s is {requested[1]:g}")
    if timeline.has_reduction:
        line = (f"gradient reduction per stage {[round(r, 6) for r in costs.reduce]} ({args.reduction}): step time "
                f"{timeline.step_time:g}, exposed reduction {timeline.exposed_reduction:g}")
        if args.reduction == "overlap":
            after = simulate(plan, costs, "after")
            line += (f"; reducing after each rank's last compute instead: step time {after.step_time:g}, exposed "
                     f"{after.exposed_reduction:g}")
        print(line)
    if lowered:
        print(lowered.text())
    for path in filter(None, (args.out, args.csv)):
        print(f"wrote {path}")
    return 0


def _solve_exactly(plan, costs, args: argparse.Namespace):
    """The exact solver's schedule for the placement of `plan` (given to it as a warm start)."""
    from zb.schedules.exact import DEFAULT_LIMIT, solve

    if args.time_limit <= 0:
        raise ScheduleError(f"--time-limit must be positive, got {args.time_limit:g}")
    limit = DEFAULT_LIMIT if args.memory_limit is None else args.memory_limit
    return solve(plan.placement, plan.num_microbatches, costs, limit, args.time_limit, hint=plan)


def _exact_line(solution, time_limit: float) -> str:
    rounded = f" (costs rounded to {solution.tick:g})" if solution.rounded else ""
    if solution.status == "optimal":
        return f"exact: optimal, longest rank span {solution.value:g}{rounded}"
    return (f"exact: best found in {time_limit:g} s, longest rank span {solution.value:g}; the solver's bound "
            f"{solution.bound:g} (within {100 * solution.gap:.2f}%){rounded}")


def _percent(value: float, bound: float) -> str:
    return f"{100 * (value - bound) / bound:.2f}%" if bound else "0.00%"


def load_factory(target: str) -> Callable[[], tuple[Any, tuple]]:
    """'pkg.mod:fn' or 'path/to/file.py:fn' -> the function."""
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise ZbError(f"expected MODULE:FACTORY (for example examples.gpt:tiny_factory), got {target!r}")
    if module_name.endswith(".py") or "/" in module_name:
        path = pathlib.Path(module_name)
        if not path.exists():
            raise ZbError(f"no such file: {path}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
    else:
        sys.path.insert(0, str(pathlib.Path.cwd()))
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            raise ZbError(f"cannot import {module_name!r}: {e}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ZbError(f"{module_name} has no callable {attr!r}")
    return factory


def _add_checkpoint_command(commands) -> None:
    checkpoint = commands.add_parser(
        "checkpoint", help="list what a zb checkpoint holds: step, layout, tensors, bytes", allow_abbrev=False
    )
    checkpoint.add_argument("path", metavar="PATH", help="a directory written by zb.save_checkpoint")
    checkpoint.add_argument("--json", action="store_true", help="print it as JSON")
    checkpoint.set_defaults(run=_checkpoint)


def _checkpoint(args: argparse.Namespace) -> int:
    from zb.checkpoint import describe

    info = describe(args.path)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"{info['path']}: zb checkpoint at step {info['step']}, saved {info['saved']} by {info['world_size']} "
          f"process(es) in {info['seconds']} s")
    for layout in info["layouts"]:
        print(f"  pipeline: {layout['stages']} stages, schedule {layout['schedule']}, placement "
              f"{layout['placement']}, {layout['replicas']} replica(s)")
    print(f"  optimizer: {info['optimizer'] or '-'}; lr_scheduler: {info['lr_scheduler'] or '-'}; extra: "
          f"{', '.join(info['extra']) or '-'}")
    names = {"model": "model parameters and buffers", "optim": "optimizer state", "rng": "RNG states",
             "extra": "extra", "zb": "zb resume state", "lr_scheduler": "LR scheduler"}
    for kind, (count, size) in sorted(info["entries"].items()):
        print(f"  {names.get(kind, kind):<30} {count:5d} entries  {size / 2**20:10.2f} MiB")
    print(f"  on disk: {info['bytes_on_disk'] / 2**20:.2f} MiB")
    return 0
