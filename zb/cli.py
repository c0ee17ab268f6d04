"""The `zb` command line (also `python -m zb`).

    zb inspect MODULE:FACTORY [--microbatches N] [--compiler eager|inductor] [--out DIR]

MODULE is a dotted module name or a path to a .py file; FACTORY() returns (model, example_args). `inspect`
runs every zb pass on the model (nothing is compiled or trained), prints the plan's summary and writes each
stage's graphs as readable Python files under --out.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import pathlib
import sys
from typing import Any
from collections.abc import Callable

from zb.errors import ZbError
from zb.options import Options


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
    _add_option_flags(inspect)
    args = parser.parse_args(argv)
    try:
        return _inspect(args)
    except ZbError as e:
        print(f"zb: error: {e}", file=sys.stderr)
        return 2


def _add_option_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("zb options (as in torch.compile(..., options={...}))")
    for name, default, doc in Options.describe():
        group.add_argument(f"--{name.replace('_', '-')}", dest=f"option_{name}", metavar="VALUE",
                           help=f"{doc} (default: {default!r})")


def _options_from(args: argparse.Namespace) -> dict[str, Any]:
    options = {}
    for name, _, _ in Options.describe():
        text = getattr(args, f"option_{name}")
        if text is not None:
            options[name] = Options.parse_cli_value(name, text)
    return options


def _inspect(args: argparse.Namespace) -> int:
    import zb
    from zb.passes import dump_plan

    factory = load_factory(args.target)
    model, example_args = factory()
    plan = zb.explain(model, *example_args, **_options_from(args))
    print(plan.summary())
    written = dump_plan(plan, pathlib.Path(args.out))
    print(f"wrote {len(written)} graph files to {args.out}/: " + ", ".join(p.name for p in written))
    return 0


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
