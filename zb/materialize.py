"""Models built on the meta device: each rank gives values only to the parameters and buffers its stages read.

    with torch.device("meta"):
        model = GPT(config)                       # no memory: shapes and dtypes only
    zb.defer(model, device="cuda")                # placeholders Dynamo can trace, still no memory
    step = torch.compile(model, backend="zb", options={"init": "reset_parameters", ...})
    loss = step(x, y)                             # plan on the placeholders, then fill this rank's own

`defer` turns every meta parameter and buffer into a placeholder on `device`: the object's storage is empty and it
is a released tensor (runtime/released.py) whose owner is "not materialised yet", so Dynamo traces the model as
if it were real (a meta tensor next to a real input is a device mismatch in Dynamo's tracing), and reading one
outside zb is an error. At its first call zb plans the pipeline on them (planning never reads values), then each
process gives storage and values to the placeholders its stages read (and to those no stage reads), from option
`init`:

  * "reset_parameters": every module that directly holds such a tensor calls its own `reset_parameters()`;
  * a callable `init(module)`, called the same way (a Hugging Face model's `model._init_weights`, or your own);
  * a state dict (name -> tensor, the model's `state_dict()` names): only the held entries are copied;
  * a directory: a `torch.distributed.checkpoint` one (zb's own checkpoints included; keys `name` or
    `model.name`), read with DCP for the held keys only; or a Hugging Face `save_pretrained` one (`*.safetensors`,
    with `model.safetensors.index.json` when sharded), each held tensor read lazily with `safetensors.safe_open`
    from the one file that has it. `READ` lists the keys this process read (tests check it).

Each module is initialised under its own seed, derived from option `init_seed` and the module's name, so a module
gets the same values whatever the number of ranks or stages (and `zb.initialize(model, init, seed)` gives a
materialised model the same values, for a reference). The placeholders other ranks read stay released.
"""

from __future__ import annotations

import json
import os
import pathlib
import zlib
from collections.abc import Callable, Iterable
from typing import Any

import torch

from zb.core import torch_internals
from zb.core.errors import ZbOptionError
from zb.runtime.released import is_deferred, is_released, release, restore, user_code, zb_internal

DEFERRED = "nobody yet (the model was built on the meta device and not materialised)"

WAYS = ("options={'init': 'reset_parameters'} (each module's own reset_parameters()), options={'init': fn} "
        "(fn(module) for every module holding tensors, e.g. a Hugging Face model's model._init_weights), "
        "options={'init': state_dict} (a dict of the model's state_dict() names to tensors), or options={'init': "
        "path} (a torch.distributed.checkpoint or zb checkpoint directory, or a Hugging Face save_pretrained "
        "directory of safetensors files)")

READ: list[str] = []  # the keys the last materialisation read from a checkpoint or safetensors directory


def defer(model: torch.nn.Module, device: str | torch.device | None = None) -> torch.nn.Module:
    """Replace `model`'s meta parameters and buffers by storage-less placeholders on `device` (default: the current
    CUDA device if there is one, else the CPU); returns the model. Shared (tied) tensors stay shared."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    made: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, tensor in _own(module):
            if not tensor.is_meta:
                continue
            if id(tensor) not in made:
                made[id(tensor)] = _placeholder(tensor, device)
            setattr(module, name, made[id(tensor)])  # the same parameter or buffer slot, the new tensor
    return model


def _placeholder(meta: torch.Tensor, device: torch.device) -> torch.Tensor:
    value = torch.empty_strided(meta.shape, meta.stride(), dtype=meta.dtype, device=device)
    if isinstance(meta, torch.nn.Parameter):
        value = torch.nn.Parameter(value, requires_grad=meta.requires_grad)
    release(value, DEFERRED)
    value._zb_deferred = True
    return value


def materialize(modules: Iterable[torch.nn.Module], held: set[int], init: Any, seed: int) -> int:
    """Give storage and values to the deferred tensors of `modules` whose id is in `held` (this process's); the
    others stay released. Returns how many were filled. Raises ZbOptionError without a way to initialise."""
    filled = 0
    for model in modules:
        names = _names(model)
        todo = [t for t in names if is_deferred(t) and id(t) in held]
        if not todo:
            continue
        if init is None:
            raise ZbOptionError(f"the model was built on the meta device and zb does not know how to give its "
                                f"{len(todo)} parameters and buffers values; pass {WAYS}")
        if isinstance(init, dict) or isinstance(init, (str, os.PathLike)) and init != "reset_parameters":
            computed = _non_persistent(model)  # not in any state dict: computed by the model (rotary frequencies)
            stored = [t for t in todo if id(t) not in computed]
            if isinstance(init, dict):
                _load(stored, names, init)
            else:
                _load_directory(stored, names, pathlib.Path(init))
            rest = [t for t in todo if id(t) in computed]
            if rest:
                _compute(model, rest, names, seed)
        elif init == "reset_parameters" or callable(init):
            _run_init(model, {id(t) for t in todo}, init, seed)
            _check_written(todo, names)
        else:
            raise ZbOptionError(f"option 'init' takes 'reset_parameters', a callable or a state dict, got "
                                f"{type(init).__name__}; the ways are: {WAYS}")
        for tensor in todo:
            if hasattr(tensor, "_zb_deferred"):  # (restore already dropped it)
                del tensor._zb_deferred
        filled += len(todo)
    return filled


def _non_persistent(model: torch.nn.Module) -> set[int]:
    return {id(t) for m in model.modules() for n, t in m.named_buffers(recurse=False, remove_duplicate=False)
            if n in torch_internals.non_persistent_buffers(m)}


def _compute(model: torch.nn.Module, rest: list[torch.Tensor], names: dict[torch.Tensor, list[str]],
             seed: int) -> None:
    """Non-persistent buffers (no state dict has them): the model's own per-module init computes them, as
    Hugging Face's loading does (`_init_weights`); without one, an error that says what to pass."""
    function = getattr(model, "_init_weights", None)
    if not callable(function):
        raise ZbOptionError(f"the model's non-persistent buffers {[names[t][0] for t in rest][:6]} are in no state "
                            "dict or checkpoint, and the model has no _init_weights(module) to compute them; load "
                            "the weights with options={'init': fn}, fn(module) computing them as __init__ does")
    _run_init(model, {id(t) for t in rest}, function, seed)
    _check_written(rest, names)


def initialize(model: torch.nn.Module, init: Any = "reset_parameters", seed: int = 0) -> torch.nn.Module:
    """Give a materialised model the values `materialize` gives a deferred one with the same `init` and seed (a
    reference model for comparison, or a single-process run)."""
    _run_init(model, {id(t) for t in _names(model)}, init, seed)
    return model


def _names(model: torch.nn.Module) -> dict[torch.Tensor, list[str]]:
    """Each parameter and buffer (tied ones once) -> its state_dict() names."""
    found: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        found.setdefault(id(tensor), (tensor, []))[1].append(name)
    return {tensor: names for tensor, names in found.values()}


def _run_init(model: torch.nn.Module, todo: set[int], init: Any, seed: int) -> None:
    missing = []
    for qualname, module in model.named_modules():
        direct = [t for _, t in _own(module)]
        if not any(id(t) in todo for t in direct):
            continue
        function: Callable | None = init if callable(init) else getattr(module, "reset_parameters", None)
        if function is None:
            missing.append(qualname or type(module).__name__)
            continue
        others = [t for t in direct if is_released(t) and id(t) not in todo]  # another rank's, same module
        # Values the module already has (loaded from a state dict, say) are put back after its init ran.
        kept = [(t, t.detach().clone()) for t in direct if not is_released(t) and id(t) not in todo]
        for tensor in direct:
            if is_released(tensor):
                restore(tensor)
        devices = sorted({t.device.index or 0 for t in direct if t.device.type == "cuda"})
        fresh = [t for t in direct if id(t) in todo or any(t is o for o in others)]
        exact = [t for t in fresh if not (t.is_floating_point() or t.is_complex())]
        runs = [0, 1] if exact else [None]  # integer / bool tensors: run twice from two fillings, must agree
        seen = []
        for filling in runs:
            for tensor in fresh:
                _poison(tensor, filling)
            with torch.random.fork_rng(devices=devices), torch.no_grad(), user_code():
                torch.manual_seed(seed * 1_000_003 + zlib.crc32(qualname.encode()))
                function(module) if callable(init) else function()
            seen.append([t.detach().clone() for t in exact])
        unwritten = [qualname + "." + _local_name(module, t) for i, t in enumerate(exact)
                     if id(t) in todo and not torch.equal(seen[0][i], seen[-1][i])]
        if unwritten:
            raise ZbOptionError(f"option 'init' left {unwritten} without values: a model built on the meta device "
                                "has no values until init writes them (masks and index buffers included)")
        with torch.no_grad():
            for tensor, value in kept:
                tensor.copy_(value)
        for tensor in others:
            release(tensor, DEFERRED)
    if missing:
        raise ZbOptionError(f"option init='reset_parameters', but these modules hold parameters or buffers and have "
                            f"no reset_parameters(): {missing[:5]}{' ...' if len(missing) > 5 else ''}; pass "
                            "options={'init': fn} with fn(module) initialising every module, or a state dict")


def _poison(tensor: torch.Tensor, filling: int | None) -> None:
    """Fresh storage holds whatever memory held: NaN instead (floating point), so that a value init does not write
    is seen; integer and bool tensors get `filling` (0 or 1: two runs of init must agree)."""
    with torch.no_grad():
        if tensor.is_floating_point() or tensor.is_complex():
            tensor.fill_(float("nan"))
        elif filling is not None:
            tensor.fill_(filling)


def _local_name(module: torch.nn.Module, tensor: torch.Tensor) -> str:
    return next(n for n, t in _own(module) if t is tensor)


def _own(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The module's own parameters, then its own buffers (not its children's), by name; tied ones each time."""
    return [*module.named_parameters(recurse=False, remove_duplicate=False),
            *module.named_buffers(recurse=False, remove_duplicate=False)]


def _check_written(todo: list[torch.Tensor], names: dict[torch.Tensor, list[str]]) -> None:
    unwritten = [names[t][0] for t in todo if (t.is_floating_point() or t.is_complex()) and bool(t.isnan().any())]
    if unwritten:
        raise ZbOptionError(f"option 'init' left {len(unwritten)} tensors of this rank's stages without values "
                            f"(or set NaN): {unwritten[:6]}{' ...' if len(unwritten) > 6 else ''}; a model built on "
                            "the meta device has no values until init writes them (norm weights, rotary buffers "
                            "included)")


def _keys(todo: list[torch.Tensor], names: dict[torch.Tensor, list[str]], available: dict[str, tuple],
          what: str) -> dict[int, str]:
    """Each held tensor's key among `available` (key -> (shape, dtype)): every one present, with its shape and
    dtype, or a ZbOptionError listing what is missing or wrong (before anything is loaded)."""
    found, missing, wrong = {}, [], []
    for tensor in todo:
        key = next((n for n in names[tensor] if n in available), None)
        if key is None:
            missing.append(names[tensor][0])
            continue
        shape, dtype = available[key]
        if tuple(shape) != tuple(tensor.shape) or dtype != tensor.dtype:
            wrong.append(f"{key}: {dtype}{list(shape)} for {tensor.dtype}{list(tensor.shape)}")
        found[id(tensor)] = key
    if missing or wrong:
        raise ZbOptionError(f"{what} given as option 'init' cannot fill this rank's stages: "
                            + (f"missing {missing}" if missing else "")
                            + ("; " if missing and wrong else "") + (f"wrong shape or dtype: {wrong}" if wrong else "")
                            + ". Nothing was loaded.")
    return found


def _load(todo: list[torch.Tensor], names: dict[torch.Tensor, list[str]], state: dict[str, Any]) -> None:
    """Copy each held tensor's entry of `state` (under any of its names)."""
    keys = _keys(todo, names, {k: (v.shape, v.dtype) for k, v in state.items() if isinstance(v, torch.Tensor)},
                 "the state dict")
    with zb_internal(), torch.no_grad():
        for tensor in todo:
            restore(tensor)
            tensor.copy_(state[keys[id(tensor)]])


def _load_directory(todo: list[torch.Tensor], names: dict[torch.Tensor, list[str]], path: pathlib.Path) -> None:
    READ.clear()
    if not path.is_dir():
        raise ZbOptionError(f"option 'init' names {path}, which is not a directory; {WAYS}")
    if (path / ".metadata").exists():
        _load_dcp(todo, names, path)
    elif list(path.glob("*.safetensors")):
        _load_safetensors(todo, names, path)
    else:
        raise ZbOptionError(f"option 'init' names {path}, which holds neither a torch.distributed.checkpoint "
                            "(.metadata) nor safetensors files (*.safetensors)")


def _load_dcp(todo: list[torch.Tensor], names: dict[torch.Tensor, list[str]], path: pathlib.Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    prefix = "model." if (path / "zb.json").exists() else ""  # zb's checkpoints keep the model under model.<name>
    available = {k[len(prefix):]: (m.size, m.properties.dtype) for k, m in metadata.items()
                 if isinstance(m, TensorStorageMetadata) and k.startswith(prefix)}
    keys = _keys(todo, names, available, f"the checkpoint {path}")
    with zb_internal():
        for tensor in todo:
            restore(tensor)
        state = {prefix + keys[id(t)]: t.detach() for t in todo}
        dcp.load(state, checkpoint_id=str(path), no_dist=True)  # this rank's keys only, no collective
    READ.extend(sorted(state))


def _load_safetensors(todo: list[torch.Tensor], names: dict[torch.Tensor, list[str]], path: pathlib.Path) -> None:
    try:
        from safetensors import safe_open
    except ImportError:
        raise ZbOptionError(f"option 'init' names {path}, a directory of safetensors files; reading them needs the "
                            "safetensors package: pip install safetensors (or zb[safetensors])") from None

    index = path / "model.safetensors.index.json"
    if index.exists():
        files = json.loads(index.read_text())["weight_map"]
    else:
        files = {}
        for file in sorted(path.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as reader:
                files.update({k: file.name for k in reader.keys()})
    available = {}
    for file in sorted(set(files.values())):  # headers only: names, shapes, dtypes
        with safe_open(str(path / file), framework="pt") as reader:
            for key in reader.keys():
                if files.get(key) == file:
                    piece = reader.get_slice(key)
                    available[key] = (piece.get_shape(), _DTYPES.get(piece.get_dtype()))
    keys = _keys(todo, names, available, f"the safetensors in {path}")
    by_file: dict[str, list[torch.Tensor]] = {}
    for tensor in todo:
        by_file.setdefault(files[keys[id(tensor)]], []).append(tensor)
    with zb_internal(), torch.no_grad():
        for file, tensors in sorted(by_file.items()):
            with safe_open(str(path / file), framework="pt", device=str(tensors[0].device)) as reader:
                for tensor in tensors:
                    restore(tensor)
                    tensor.copy_(reader.get_tensor(keys[id(tensor)]))
                    READ.append(keys[id(tensor)])


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
