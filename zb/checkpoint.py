"""Checkpoints of zb training with torch.distributed.checkpoint (DCP): save in one layout, load in any other.

    zb.save_checkpoint("ckpt/step-100", model, optimizer, lr_scheduler=scheduler, data=generator.get_state())
    extra = zb.load_checkpoint("ckpt/step-100", model, optimizer, lr_scheduler=scheduler)
    (grad_scaler=scaler on both: the float16 loss scale and its growth tracker)

Called on every rank (or in one process). Each process writes what it owns, under the model's own names: the
parameters and buffers its stages read (and those no stage reads), and their optimizer state; DCP writes a key
that several processes hold (a tied weight, data-parallel replicas) once. Loading reads every key into the whole
model on every process, so any layout loads any checkpoint: other ranks, split points or schedule, replicas, one
process, or plain PyTorch (`full_state_dict` / `load_full`). The DCP keys, all flat:

    model.<name>             every parameter and persistent buffer (model.state_dict()'s names)
    optim.<name>.<state>     each parameter's optimizer state tensors (exp_avg, momentum_buffer, step, ...)
    optim.other.<name>       its non-tensor state values;  optim.groups: the param groups, by parameter name
    rng.<rank>               each global rank's RNG state (CPU, and CUDA where used); extra.<rank>: **extra
    lr_scheduler             the scheduler's state_dict;  zb.resume: each training step's count and schedule
    grad_scaler              the torch.amp.GradScaler's state_dict (after the settled steps' updates)
and `zb.json` (the manifest `zb checkpoint PATH` prints). A checkpoint is saved under `.<name>.partial` next to
PATH and moved to PATH only once complete; the previous one is kept as `.<name>.old` until then, so a crash in
the middle of a save leaves a checkpoint to load (`load_checkpoint` falls back to `.old` when PATH is missing).
Post-validated steps (of every optimizer zb runs) are settled before anything is saved or loaded, so the loss
scale saved is every rank's, and no pending update lands on loaded values.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import pathlib
import pickle
import shutil
import time
import warnings
import weakref
from typing import Any

import torch
import torch.distributed as dist

from zb.core.errors import ZbError
from zb.runtime.optimizer import settle
from zb.runtime.released import is_deferred, is_released
from zb.runtime.runner import LIVE
from zb.schedules import Schedule

log = logging.getLogger("zb")

FORMAT = "zb-checkpoint/1"
MANIFEST = "zb.json"
_FULL = [False]  # set while zb itself reads a model's whole state dict (the guard below lets it through)


# What this process owns ------------------------------------------------------------------------------------------
def _runners(tensors: dict[str, torch.Tensor]) -> list:
    """The live runners training any of a model's tensors (`_named_state(model)`)."""
    ids = {id(t) for t in tensors.values()}
    return [r for r in list(LIVE) if any(id(t) in ids for t in r.state.values())]


def _owned(tensors: dict[str, torch.Tensor]) -> set[int] | None:
    """Ids of a model's tensors (`_named_state(model)`) this process writes; None: all of them (no pipeline spans
    processes)."""
    runners = [r for r in _runners(tensors) if r.distributed and r.program.num_stages > 1]
    if not runners:
        return None
    managed = {id(t) for r in runners for t in r.state.values()}
    owned = {id(t) for t in tensors.values() if id(t) not in managed}  # zb never changes these
    for runner in runners:
        mine, nobody = runner.owned()
        owned |= mine | nobody
    return owned


def _named_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """model.state_dict()'s names -> the model's own tensors (tied names both present)."""
    _FULL[0] = True
    try:
        return {k: v for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)}
    finally:
        _FULL[0] = False


_GUARDED: weakref.WeakSet = weakref.WeakSet()


def guard(module: torch.nn.Module) -> None:
    """Make `module.state_dict()` on a pipeline rank return only what this rank owns: the other stages' values
    are stale here (their rank trains them), and a state dict must never carry them by accident."""
    if module in _GUARDED:
        return
    _GUARDED.add(module)
    module.register_state_dict_post_hook(_owned_only)


def _owned_only(module, state_dict, prefix, local_metadata) -> None:
    if _FULL[0] or prefix:
        return
    tensors = _named_state(module)
    owned = _owned(tensors)
    if owned is None:
        return
    stale = [k for k, t in tensors.items() if id(t) not in owned and k in state_dict]
    for key in stale:
        del state_dict[key]
    if stale and not getattr(module, "_zb_state_dict_said", False):
        module._zb_state_dict_said = True
        log.warning("zb: model.state_dict() on this pipeline rank holds only the %d of %d entries its stages own "
                    "(the others are trained on other ranks); use zb.save_checkpoint or zb.full_state_dict(model)",
                    len(tensors) - len(stale), len(tensors))


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's current state dict (on CPU) on every process: each rank's own entries gathered. Call it
    on every rank; in one process it is `model.state_dict()`."""
    tensors = _named_state(model)
    owned = _owned(tensors)
    mine = {k: t.detach().cpu().clone() for k, t in tensors.items() if owned is None or id(t) in owned}
    if owned is None:
        return mine
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    merged: dict[str, torch.Tensor] = {}
    for theirs in everyone:
        merged.update(theirs)
    return {k: merged[k] for k in tensors}


# Saving ----------------------------------------------------------------------------------------------------------
def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    *, lr_scheduler: Any = None, grad_scaler: Any = None, **extra: Any) -> pathlib.Path:
    """Write a checkpoint of `model` (and `optimizer`, `lr_scheduler`, `grad_scaler`, `extra`) to directory `path`,
    atomically. Every process calls it. Returns the path."""
    path = pathlib.Path(path)
    settle()
    group, rank, world = _group()
    tensors = _named_state(model)
    owned = _owned(tensors)
    state: dict[str, Any] = {f"model.{k}": t.detach() for k, t in tensors.items() if owned is None or id(t) in owned}
    if optimizer is not None:
        state.update(_optimizer_state(model, optimizer, owned))
    state[f"rng.{rank}"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state[f"rng_cuda.{rank}"] = torch.cuda.get_rng_state()
    state[f"extra.{rank}"] = _blob(dict(extra))
    if lr_scheduler is not None:
        state["lr_scheduler"] = _blob(lr_scheduler.state_dict())
    if grad_scaler is not None:  # settled above: every rank's scaler is alike
        state["grad_scaler"] = _blob(grad_scaler.state_dict())
    resume = _resume_state(tensors)
    state["zb.resume"] = _blob(resume)
    staging, old = path.parent / f".{path.name}.partial", path.parent / f".{path.name}.old"
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    _barrier(group, "preparing the checkpoint directory")
    start = time.perf_counter()
    import torch.distributed.checkpoint as dcp

    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _quiet():
            dcp.save(state, checkpoint_id=staging, no_dist=group is None)
    except (RuntimeError, CheckpointException) as e:
        kept = f"the previous checkpoint at {path} is intact" if path.exists() else "nothing was switched"
        if isinstance(e, CheckpointException):  # a rank raised while writing; DCP told every rank (a BaseException)
            raise ZbError(f"writing checkpoint {path} failed on {_failures(e)}; {kept}") from e
        raise ZbError(f"writing checkpoint {path} failed: {e}. A peer rank died; {kept}") from e
    _barrier(group, "writing the checkpoint")
    if rank == 0:
        manifest = {
            "format": FORMAT, "step": max((r["steps"] for r in resume), default=0), "world_size": world,
            "layouts": [{k: r[k] for k in ("stages", "placement", "schedule", "replicas")} for r in resume],
            "optimizer": type(optimizer).__name__ if optimizer is not None else None,
            "lr_scheduler": type(lr_scheduler).__name__ if lr_scheduler is not None else None,
            "grad_scaler": grad_scaler.state_dict() if grad_scaler is not None else None,
            "extra": sorted(extra), "saved": datetime.datetime.now().isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - start, 3),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
        staging.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    _barrier(group, "switching to the new checkpoint")
    return path


def _optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, owned: set[int] | None) -> dict:
    names = _parameter_names(model)
    state: dict[str, Any] = {}
    groups = []
    for group in optimizer.param_groups:
        missing = [p for p in group["params"] if id(p) not in names]
        if missing:
            raise ZbError(f"the optimizer holds {len(missing)} tensors that are not parameters of this model; "
                          "save_checkpoint saves a model with the optimizer over its parameters")
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": [names[id(p)] for p in group["params"]]})
        for p in group["params"]:
            if owned is not None and id(p) not in owned:
                continue
            values = optimizer.state.get(p)
            if not values:
                continue
            name = names[id(p)]
            for key, value in values.items():
                if isinstance(value, torch.Tensor):
                    state[f"optim.{name}.{key}"] = value
            others = {k: v for k, v in values.items() if not isinstance(v, torch.Tensor)}
            if others:
                state[f"optim.other.{name}"] = _blob(others)
    state["optim.groups"] = _blob(groups)
    return state


def _blob(value: Any) -> bytes:
    """A non-tensor value as one DCP entry (DCP would flatten a dict or list into many keys)."""
    return pickle.dumps(value)


def _parameter_names(model: torch.nn.Module) -> dict[int, str]:
    """id(parameter) -> its first name in the model (a tied parameter under the name state_dict lists first)."""
    names: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), name)
    return names


def _resume_state(tensors: dict[str, torch.Tensor]) -> list[dict]:
    """What resuming needs from each training step of this model: its step count and the schedule it runs (with
    zb-auto, the one re-planned on measured costs), so a resumed run neither re-measures nor re-plans."""
    found = []
    for runner in _runners(tensors):
        if not runner.program.training:
            continue
        schedule = runner.schedule
        costs = runner.costs
        found.append({
            "steps": runner.steps, "stages": runner.program.num_stages, "placement": list(schedule.placement),
            "schedule": schedule.name, "microbatches": schedule.num_microbatches, "actions": schedule.text(),
            "replicas": runner.replicas,
            "costs": None if costs is None else {k: list(v) if isinstance(v, tuple) else v
                                                 for k, v in vars(costs).items()},
        })
    return found


# Loading ---------------------------------------------------------------------------------------------------------
# Per loaded model: its tensors (weakly, by id: an id alone is reused once a tensor dies) and its saved training steps.
_RESUME: list[tuple[dict[int, weakref.ref], list[dict]]] = []


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    *, lr_scheduler: Any = None, grad_scaler: Any = None) -> dict[str, Any]:
    """Load a checkpoint into `model` (and `optimizer`, `lr_scheduler`, `grad_scaler`), whatever layout wrote it;
    returns the `extra` the saving process passed (this rank's, or rank 0's when the world size changed). Every
    process calls it, before or between steps."""
    import torch.distributed.checkpoint as dcp

    path = _existing(pathlib.Path(path))
    settle()  # (a pending update validated after the load would roll back onto the loaded values)
    manifest = read_manifest(path)
    saved = _metadata(path)
    tensors = _named_state(model)
    deferred = [k for k, t in tensors.items() if is_deferred(t)]
    if deferred:
        raise ZbError(f"the model was built on the meta device and is not materialised yet ({deferred[0]!r} and "
                      f"{len(deferred) - 1} more have no storage): load this checkpoint with "
                      f"options={{'init': {str(path)!r}}} (each rank reads its own stages' tensors), or load it "
                      "after the first step")
    _check_model(saved, tensors, path)
    group, rank, world = _group()
    # Released tensors (another rank's, runtime/released.py) are not read: their owner loads them.
    state: dict[str, Any] = {f"model.{k}": t.detach() for k, t in tensors.items() if not is_released(t)}
    names = _parameter_names(model)
    if optimizer is not None:
        if manifest.get("optimizer") != type(optimizer).__name__:
            raise ZbError(f"checkpoint {path} holds the state of a {manifest.get('optimizer')} optimizer, not of a "
                          f"{type(optimizer).__name__}; build the optimizer the run was saved with")
        state["optim.groups"] = b""
        for p in (p for g in optimizer.param_groups for p in g["params"] if not is_released(p)):
            name = names.get(id(p))
            for key, meta in saved.items():
                if name is not None and key.startswith(f"optim.{name}.") and "." not in key[len(name) + 7:]:
                    state[key] = torch.empty(meta.size, dtype=meta.properties.dtype, device=p.device)
            if f"optim.other.{name}" in saved:
                state[f"optim.other.{name}"] = b""
    same_world = manifest.get("world_size") == world
    own_extra = f"extra.{rank}" if same_world and f"extra.{rank}" in saved else "extra.0"
    state[own_extra] = b""
    if same_world and f"rng.{rank}" in saved:
        state[f"rng.{rank}"] = torch.empty(saved[f"rng.{rank}"].size, dtype=torch.uint8)
    if lr_scheduler is not None:
        if "lr_scheduler" not in saved:
            raise ZbError(f"checkpoint {path} has no LR scheduler state; it was saved without lr_scheduler=")
        state["lr_scheduler"] = b""
    if grad_scaler is not None:
        if "grad_scaler" not in saved:
            raise ZbError(f"checkpoint {path} has no loss scaler state; it was saved without grad_scaler=")
        state["grad_scaler"] = b""
    state["zb.resume"] = b""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _quiet():
            dcp.load(state, checkpoint_id=path, no_dist=group is None)
    except CheckpointException as e:  # a rank failed reading; DCP told every rank (a BaseException)
        raise ZbError(f"loading checkpoint {path} failed on {_failures(e)}") from e
    for key, value in state.items():
        if isinstance(value, bytes):
            state[key] = pickle.loads(value)
    if optimizer is not None:
        _load_optimizer(optimizer, state, names, path)
    if lr_scheduler is not None:
        lr_scheduler.load_state_dict(state["lr_scheduler"])
    if grad_scaler is not None:
        grad_scaler.load_state_dict(state["grad_scaler"])
    if f"rng.{rank}" in state:
        torch.set_rng_state(state[f"rng.{rank}"])
    _RESUME[:] = [(refs, saved) for refs, saved in _RESUME if any(r() is not None for r in refs.values())]
    _RESUME.append(({id(t): weakref.ref(t) for t in tensors.values()}, state["zb.resume"]))
    for runner in _runners(tensors):  # a model already compiled here: its steps continue from the checkpoint's
        resume(runner)
    return state[own_extra]


def _load_optimizer(optimizer: torch.optim.Optimizer, state: dict, names: dict[int, str], path) -> None:
    saved_groups = state["optim.groups"]
    current = [[names.get(id(p)) for p in g["params"]] for g in optimizer.param_groups]
    if [g["params"] for g in saved_groups] != current:
        raise ZbError(f"checkpoint {path} has optimizer param groups {[len(g['params']) for g in saved_groups]} "
                      f"(parameters by name), this optimizer {[len(c) for c in current]}: build it over the same "
                      "parameters, in the same groups, as the saved run")
    index, per_param = 0, {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            values = {k[len(name) + 7:]: v for k, v in state.items() if k.startswith(f"optim.{name}.")
                      and "." not in k[len(name) + 7:] and isinstance(v, torch.Tensor)}
            values.update(state.get(f"optim.other.{name}") or {})
            if values:
                per_param[index] = values
            index += 1
    groups, start = [], 0
    for group, saved in zip(optimizer.param_groups, saved_groups):
        groups.append({**{k: v for k, v in saved.items() if k != "params"},
                       "params": list(range(start, start + len(group["params"])))})
        start += len(group["params"])
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})


def resume(runner, tensors: list | None = None) -> None:
    """Continue `runner` where a loaded checkpoint's step stopped: its step count, and the schedule that run used
    (with zb-auto, the re-planned one), when its stages and placement are the same. `tensors`: the arguments of
    its first call (before it ran, the runner knows no parameters)."""
    mine = tensors if tensors is not None else list(runner.state.values())
    for refs, saved in _RESUME:
        if not any(id(t) in refs and refs[id(t)]() is t for t in mine):
            continue
        for entry in saved:
            same = (entry["stages"] == runner.program.num_stages and entry["microbatches"] ==
                    runner.schedule.num_microbatches and tuple(entry["placement"]) == runner.schedule.placement)
            if runner.program.training and same:
                runner.steps = entry["steps"]
                schedule = Schedule.from_text(entry["actions"], tuple(entry["placement"]), entry["microbatches"],
                                              entry["schedule"])
                if schedule.actions != runner.schedule.actions:
                    runner.install(schedule)
                return


def _check_model(saved: dict, tensors: dict[str, torch.Tensor], path) -> None:
    expected = {f"model.{k}": tuple(t.shape) for k, t in tensors.items()}
    found = {k: tuple(m.size) for k, m in saved.items() if k.startswith("model.")}
    problems = [f"{k[6:]}: not in the checkpoint" for k in expected if k not in found]
    problems += [f"{k[6:]}: in the checkpoint, not in this model" for k in found if k not in expected]
    problems += [f"{k[6:]}: shape {list(found[k])} in the checkpoint, {list(v)} in this model"
                 for k, v in expected.items() if k in found and found[k] != v]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ZbError(f"checkpoint {path} does not fit this model: {'; '.join(problems[:5])}{more}. Load it into "
                      "the model it was saved from")


def checkpoint_exists(path: str | os.PathLike) -> bool:
    """Whether `load_checkpoint(path, ...)` has a checkpoint to load (PATH, or the previous one a crashed save
    left)."""
    path = pathlib.Path(path)
    return (path / ".metadata").exists() or (path.parent / f".{path.name}.old" / ".metadata").exists()


def _existing(path: pathlib.Path) -> pathlib.Path:
    if (path / ".metadata").exists():
        return path
    old = path.parent / f".{path.name}.old"
    if (old / ".metadata").exists():  # a save was interrupted between moving the old one aside and the new in
        log.warning("zb: checkpoint %s is missing; loading the previous one, %s", path, old)
        return old
    if path.exists():
        raise ZbError(f"{path} is not a zb checkpoint (no DCP .metadata in it)")
    raise ZbError(f"no checkpoint at {path}: the directory does not exist")


def _metadata(path: pathlib.Path) -> dict:
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(path).read_metadata().state_dict_metadata


def read_manifest(path: pathlib.Path) -> dict:
    manifest = path / MANIFEST
    if not manifest.exists():
        raise ZbError(f"{path} has no {MANIFEST}: it was not written by zb.save_checkpoint")
    return json.loads(manifest.read_text())


def describe(path: str | os.PathLike) -> dict:
    """What a checkpoint holds (for `zb checkpoint PATH`): the manifest, and per group of keys the tensors and
    bytes."""
    path = _existing(pathlib.Path(path))
    settle()  # (a pending update validated after the load would roll back onto the loaded values)
    manifest = read_manifest(path)
    groups: dict[str, list[int]] = {}
    for key, meta in _metadata(path).items():
        kind = key.split(".")[0]
        size = getattr(meta, "size", None)
        count = groups.setdefault(kind, [0, 0])
        count[0] += 1
        if size is not None:
            count[1] += int(torch.Size(size).numel()) * meta.properties.dtype.itemsize
    files = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return {"path": str(path), **manifest, "entries": groups, "bytes_on_disk": files}


# Process group ---------------------------------------------------------------------------------------------------
def _group():
    """(whether processes take part, this rank, the world size). Saves and loads run over the default process group:
    a group of zb's own would be created under the same name again after a torchrun restart, and its processes
    would connect to the previous attempt's addresses. A rank that dies breaks its connections, so the others fail
    at once; one that hangs holds them for the process group's timeout."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None, 0, 1
    return True, dist.get_rank(), dist.get_world_size()


@contextlib.contextmanager
def _quiet():
    """DCP warns that it assumes one process when no process group exists: that is what zb asked for."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _failures(error) -> str:
    """DCP's CheckpointException as 'rank R: Type: message; ...'."""
    return "; ".join(f"rank {r}: {type(e).__name__}: {e}" for r, (e, _) in sorted(error.failures.items()))


def _barrier(group, what: str) -> None:
    if group is None:
        return
    try:
        dist.barrier()
    except RuntimeError as e:
        raise ZbError(f"a peer rank failed while {what}: {e}; the checkpoint was not switched") from e
