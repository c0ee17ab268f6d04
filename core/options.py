"""The options of the zb backend: one frozen dataclass, validated once, shared by every pass.

`torch.compile(model, backend="zb", options={...})` hands the dict to `Options.from_dict`. Each field carries
its documentation and its check in `metadata`, so the error for a wrong value, the `zb inspect --help` text and
docs all come from the same place. A later capability adds a field here and nothing else changes.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from zb.core.errors import ZbOptionError
from zb.schedules import SCHEDULES


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ZbOptionError(f"option {name!r} must be a positive int, got {value!r}")
    return value


def _non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ZbOptionError(f"option {name!r} must be an int >= 0, got {value!r}")
    return value


def _init_source(name: str, value: Any) -> Any:
    if value is None or value == "reset_parameters" or callable(value) or isinstance(value, dict):
        return value
    if isinstance(value, (str, os.PathLike)) and os.path.isdir(value):
        return os.fspath(value)
    raise ZbOptionError(f"option {name!r} takes 'reset_parameters', a callable fn(module), a state dict (names "
                        f"to tensors) or the path of a checkpoint or safetensors directory, got {value!r}")


def _choice(*choices: str) -> Callable[[str, Any], str]:
    def check(name: str, value: Any) -> str:
        if value not in choices:
            raise ZbOptionError(
                f"option {name!r} must be one of {', '.join(map(repr, choices))}; got {value!r}"
            )
        return value

    check.choices = choices  # type: ignore[attr-defined]
    return check


def _optional_positive_int(name: str, value: Any) -> int | None:
    return None if value is None else _positive_int(name, value)


def _memory_limit(name: str, value: Any) -> str | float | None:
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
        return value
    if isinstance(value, str) and (value.endswith("p") or value.replace(".", "", 1).isdigit()):
        return value
    raise ZbOptionError(
        f"option {name!r} takes a number (bytes) or a multiple of p such as '1p' or '2p'; got {value!r}"
    )


def _strings(what: str) -> Callable[[str, Any], tuple[str, ...] | None]:
    """A check for a list of names: `what` describes them in the error, e.g. "module paths such as ['blocks.2']"."""
    def check(name: str, value: Any) -> tuple[str, ...] | None:
        if value is None:
            return None
        if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
            raise ZbOptionError(f"option {name!r} takes a list of {what}, got {value!r}")
        return tuple(value)

    return check


def _positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ZbOptionError(f"option {name!r} must be a positive number of seconds, got {value!r}")
    return float(value)


def _float_dtype(name: str, value: Any) -> Any:
    """None, or a floating-point torch.dtype (also given by name: 'bfloat16', 'float16', 'float32')."""
    if value is None:
        return None
    import torch

    if isinstance(value, str):
        value = getattr(torch, value.removeprefix("torch."), value)
    if not isinstance(value, torch.dtype) or not value.is_floating_point or value == torch.float64:
        raise ZbOptionError(f"option {name!r} takes torch.bfloat16, torch.float16 or torch.float32 (or their "
                            f"names), got {value!r}")
    return value


def _grad_scaler(name: str, value: Any) -> Any:
    if value is None or (hasattr(value, "get_scale") and hasattr(value, "is_enabled")):
        return value
    raise ZbOptionError(f"option {name!r} takes a torch.amp.GradScaler (the one your loop calls scale/step/update "
                        f"on), got {type(value).__name__}")


def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ZbOptionError(f"option {name!r} must be True or False, got {value!r}")
    return value


def _process_group(name: str, value: Any) -> Any:
    if value is None:
        return None
    import torch.distributed as dist

    if not isinstance(value, dist.ProcessGroup):
        raise ZbOptionError(f"option {name!r} takes a torch.distributed ProcessGroup, got {type(value).__name__}")
    return value


def _optimizer(name: str, value: Any) -> Any:
    if value is None:
        return None
    import torch

    if not isinstance(value, torch.optim.Optimizer):
        raise ZbOptionError(f"option {name!r} takes a torch.optim optimizer over the model's parameters, got "
                            f"{type(value).__name__}")
    if type(value) not in (getattr(torch.optim, n) for n in FUSED_OPTIMIZERS):
        raise ZbOptionError(f"option {name!r}: zb fuses {', '.join(FUSED_OPTIMIZERS)} updates, not "
                            f"{type(value).__name__}; leave 'optimizer' out and call your optimizer after "
                            "loss.backward()")
    return value


def _device_mesh(name: str, value: Any) -> Any:
    if value is None:
        return None
    from torch.distributed.device_mesh import DeviceMesh

    if not isinstance(value, DeviceMesh):
        raise ZbOptionError(f"option {name!r} takes a torch.distributed DeviceMesh, got {type(value).__name__}")
    names = tuple(value.mesh_dim_names or ())
    if sorted(names) != ["dp", "pp"]:
        raise ZbOptionError(f"option {name!r} needs a 2-D DeviceMesh with dimensions named 'dp' (replicas) and 'pp' "
                            f"(pipeline ranks), e.g. init_device_mesh('cpu', (2, 2), mesh_dim_names=('dp', 'pp')); "
                            f"got dimensions {names or 'without names'}")
    return value


def _optional_positive_float(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ZbOptionError(f"option {name!r} must be a positive number or None, got {value!r}")
    return float(value)


def _optional_boolean(name: str, value: Any) -> bool | None:
    return None if value is None else _boolean(name, value)


# The torch.optim classes whose update zb.ops.optimizer fuses (named here so that checking an option needs no kernel).
FUSED_OPTIMIZERS = ("SGD", "Adam", "AdamW")


def _option(default: Any, doc: str, check: Callable[[str, Any], Any], compare: bool = True) -> Any:
    return field(default=default, metadata={"doc": doc, "check": check}, compare=compare)


@dataclass(frozen=True)
class Options:
    """Every option of the zb backend, with its default, its meaning and the check of its value
    (`zb.ZbBackend(options)`)."""
    microbatches: int = _option(
        1, "number of microbatches; every tensor input is split along dim 0 into this many pieces", _positive_int
    )
    compiler: str = _option(
        "inductor",
        "how each F/B/W piece is compiled: 'inductor' (C++ on CPU, Triton on GPU) or 'eager' (plain FX, "
        "for debugging)",
        _choice("inductor", "eager"),
    )
    stages: int | None = _option(
        None, "pipeline stages; default: the world size (x2 for zb-v, x2 chunks for interleaved-1f1b), 1 without "
        "a process group", _optional_positive_int,
    )
    schedule: str = _option("zb-auto", "pipeline schedule: " + ", ".join(SCHEDULES), _choice(*SCHEDULES))
    memory_limit: str | float | None = _option(
        None, "zb-auto's per-rank activation memory limit: bytes, or '1p' / '2p' (multiples of p microbatches); "
        "default '2p'", _memory_limit,
    )
    split_points: tuple[str, ...] | None = _option(
        None, "module paths where a new stage begins, e.g. ['blocks.2']; default: balance the estimated cost",
        _strings("module paths such as ['blocks.2']"),
    )
    group: Any = _option(None, "torch.distributed process group of the pipeline ranks (default: WORLD)",
                         _process_group)
    data_parallel: int = _option(
        1, "pipeline replicas (data parallelism): under torchrun with W processes, D replicas of a W/D-rank "
        "pipeline, each fed its own batch; gradients are summed over replicas inside the schedule, right after each "
        "stage's last W. Without a process group, the D replicas run in this process on D parts of the batch",
        _positive_int,
    )
    mesh: Any = _option(
        None, "a 2-D torch.distributed DeviceMesh with dimensions 'dp' (replicas) and 'pp' (pipeline ranks), "
        "instead of 'data_parallel' and 'group'", _device_mesh,
    )
    shard_optimizer: bool = _option(
        False, "shard the optimizer state over the replicas (ZeRO-1/2 by parameter, needs 'optimizer' and "
        "replicas): each parameter's gradient is reduced to the one replica that owns it, which updates it and "
        "broadcasts the new value", _boolean,
    )
    rebalance: bool = _option(
        False, "re-cut the stages once, after the first training step, when its measured stage times are "
        "clearly uneven (slowest over 1.15x the mean, zb/adapt.py); across ranks this moves parameters to their new "
        "rank. Not with 'split_points' or 'optimizer' across ranks", _boolean,
    )
    profile: bool = _option(False, "time every action and transfer; zb-auto re-plans with the measured costs",
                            _boolean)
    timeout: float = _option(300.0, "seconds to wait for a peer rank that died or stalls before failing",
                             _positive_float)
    optimizer: Any = _option(
        None, "a torch.optim SGD, Adam or AdamW over the model's parameters: calling the compiled model then runs "
        "the whole training step, update included, and returns the loss detached", _optimizer,
    )
    max_grad_norm: float | None = _option(
        None, "clip the global gradient norm to this value before the update (needs 'optimizer')",
        _optional_positive_float,
    )
    post_validation: bool | None = _option(
        None, "update at once and check the global norm and NaN/Inf afterwards, rolling back a step that had to "
        "be clipped or skipped (default: True with 'optimizer')", _optional_boolean,
    )
    unbatched: tuple[str, ...] | None = _option(
        None, "tensor arguments passed whole to every microbatch instead of split along dim 0 (by name, e.g. "
        "['position_ids']); default: those whose dim 0 is 1; every other tensor argument must share one dim 0",
        _strings("argument names such as ['position_ids']"),
    )
    loss_reduction: str = _option(
        "auto", "how the losses of the microbatches make the step's loss: 'auto' (read the loss's normalisation "
        "from the graph - mean, sum, token-mean cross entropy, a sum over an input-only count - and weigh each "
        "microbatch so that the loss and every gradient equal eager's on the whole batch; an error if it cannot "
        "tell), 'mean' (average them) or 'sum' (add them)", _choice("auto", "mean", "sum"),
    )
    aux_loss: str = _option(
        "refuse", "a loss term computed from statistics of the batch that microbatches cannot reproduce (a "
        "mixture-of-experts router's load-balancing loss: tokens per expert x mean router probability over the "
        "batch): 'refuse' (an error: eager's value needs the whole batch) or 'per_microbatch' (each microbatch "
        "computes the term over its own tokens and the step averages them: Megatron's per-micro-batch aux loss, not "
        "eager's whole-batch value)", _choice("refuse", "per_microbatch"),
    )
    release: bool = _option(
        True, "on a pipeline rank, free the storage of the parameters and buffers only other ranks' stages read "
        "(each rank then holds its own stages' share of the model); using one outside zb is an error naming its "
        "owner. False keeps every tensor on every rank; so does rebalance=True (not combined yet)", _boolean,
    )
    init: Any = _option(
        None, "how a model built on the meta device (zb.defer) gets its values, on each rank for its own stages: "
        "'reset_parameters' (each module's own), a callable fn(module) called for every module holding tensors, "
        "a state dict (the model's state_dict() names to tensors), or a directory: a torch.distributed.checkpoint "
        "or zb checkpoint, or a Hugging Face save_pretrained one (safetensors, read lazily per tensor)",
        _init_source, compare=False,  # (a state dict's tensors do not compare as booleans)
    )
    init_seed: int = _option(
        0, "the seed of option init: each module's values come from this seed and the module's name, the same "
        "whatever the number of ranks or stages", _non_negative_int,
    )
    plan_cache: int = _option(
        8, "how many input signatures (batch shapes, sequence lengths) keep their compiled pipeline; the least "
        "recently used one is freed when another arrives (per Dynamo graph)",
        _positive_int,
    )
    symbolic_sizes: bool = _option(
        True, "when Dynamo makes a size dynamic (a sequence length that changed between calls), plan and compile the "
        "pipeline once with that size symbolic, for every later size its guards admit; False: one pipeline per size",
        _boolean,
    )
    param_dtype: Any = _option(
        None, "mixed precision (torchtitan's MixedPrecisionPolicy): compute with copies of the float32 parameters in "
        "this dtype (torch.bfloat16 or torch.float16), made once per step on each rank for its stages and freed after "
        "their last W; float inputs are cast to it too. The parameters stay float32 (what the optimizer updates)",
        _float_dtype,
    )
    reduce_dtype: Any = _option(
        None, "the dtype W's parameter gradients are summed in over the microbatches and the data-parallel replicas "
        "with param_dtype: float32 (the default, and the only one for now)", _float_dtype,
    )
    grad_scaler: Any = _option(
        None, "the torch.amp.GradScaler of a float16 training loop: zb starts the step's backward from the scaler's "
        "current scale, as `scaler.scale(loss).backward()` does in eager, so small float16 gradients survive alike. "
        "Without 'optimizer' (one process only for now) call scaler.scale(loss).backward(), scaler.step and "
        "scaler.update as usual; with 'optimizer' zb does unscale_, the skip and update() itself, on the global "
        "verdict (post-validation rolls back an overflowed step); every rank needs a scaler built alike, and "
        "zb.save_checkpoint(..., grad_scaler=scaler) keeps its state", _grad_scaler, compare=False,
    )
    fuse_attention: bool = _option(
        True, "replace attention (F.scaled_dot_product_attention and hand-written softmax(q @ k^T) @ v) with zb's "
        "flash-attention operator", _boolean,
    )

    def __post_init__(self):
        if self.optimizer is None:
            for name in ("max_grad_norm", "post_validation"):
                if getattr(self, name) not in (None, False):
                    raise ZbOptionError(f"option {name!r} needs option 'optimizer' (the optimizer zb runs)")
        elif self.post_validation is None:
            object.__setattr__(self, "post_validation", True)
        if self.reduce_dtype is not None and self.param_dtype is None:
            raise ZbOptionError("option 'reduce_dtype' is part of a mixed-precision policy: give 'param_dtype' too "
                                "(the dtype the parameter copies compute in)")
        if self.param_dtype is not None:
            import torch

            if self.reduce_dtype not in (None, torch.float32):
                raise ZbOptionError(f"option 'reduce_dtype'={self.reduce_dtype}: zb sums gradients in float32 only "
                                    "for now (the default with param_dtype)")
            object.__setattr__(self, "reduce_dtype", torch.float32)
        if self.mesh is not None:
            if self.group is not None:
                raise ZbOptionError("give either option 'mesh' or option 'group', not both: the mesh's 'pp' "
                                    "dimension is the pipeline's group")
            replicas = self.mesh["dp"].size()
            if self.data_parallel not in (1, replicas):
                raise ZbOptionError(f"option 'data_parallel'={self.data_parallel} disagrees with the mesh's 'dp' "
                                    f"dimension of size {replicas}; leave 'data_parallel' out with a mesh")
            object.__setattr__(self, "data_parallel", replicas)
        if self.shard_optimizer:
            if self.optimizer is None:
                raise ZbOptionError("option 'shard_optimizer' needs option 'optimizer' (the optimizer whose state "
                                    "zb shards over the replicas)")
            if self.data_parallel == 1:
                raise ZbOptionError("option 'shard_optimizer' shards the optimizer state over replicas; set "
                                    "'data_parallel' (or a 'mesh') with more than one replica")

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> Options:
        """Validate a user's options dict; unknown names and wrong values raise ZbOptionError."""
        if options is None:
            return cls()
        if isinstance(options, Options):
            return options
        if not isinstance(options, dict):
            raise ZbOptionError(f"options must be a dict, got {type(options).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for name, value in options.items():
            if name not in known:
                close = difflib.get_close_matches(str(name), known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ZbOptionError(
                    f"unknown zb option {name!r}{hint}; valid options: {', '.join(sorted(known))}"
                )
            values[name] = known[name].metadata["check"](name, value)
        return cls(**values)

    @classmethod
    def parse_cli_value(cls, name: str, text: str) -> Any:
        """Turn a command-line string into the field's type (validation happens in from_dict). A string that is
        not of that type raises ZbOptionError naming the option, never a bare ValueError."""
        if name in ("group", "optimizer", "mesh", "grad_scaler"):
            raise ZbOptionError(f"option {name!r} takes an object; it cannot be given on the command line")
        default = {f.name: f.default for f in dataclasses.fields(cls)}[name]
        if isinstance(default, bool) or name == "post_validation":
            word = text.strip().lower()
            if word in ("true", "1", "yes", "on"):
                return True
            if word in ("false", "0", "no", "off"):
                return False
            raise ZbOptionError(f"option {name!r} takes a boolean: true/false, 1/0, yes/no or on/off (any case); "
                                f"got {text!r}")
        if name in ("split_points", "unbatched"):
            return [p for p in text.split(",") if p]
        if name in ("timeout", "max_grad_norm"):
            kind, convert = "a number", float
        elif name == "stages" or isinstance(default, int):
            kind, convert = "an int", int
        else:
            return text
        try:
            return convert(text)
        except ValueError:
            raise ZbOptionError(f"option {name!r} takes {kind}, got {text!r}") from None

    @classmethod
    def describe(cls) -> list[tuple[str, Any, str]]:
        """(name, default, doc) for every option, in declaration order."""
        return [(f.name, f.default, f.metadata["doc"]) for f in dataclasses.fields(cls)]

    def changed(self) -> dict[str, Any]:
        """The options that differ from their defaults."""
        defaults = Options()
        return {k: v for k, v in self.as_dict().items() if v != defaults.as_dict()[k]}

    def as_dict(self) -> dict[str, Any]:
        """The options as a dict (the process group by its name only)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("group", "optimizer", "mesh", "grad_scaler"):
            if values[name] is not None:
                value = values[name]
                values[name] = type(value).__name__ if name in ("optimizer", "grad_scaler") else str(value)
        return values
