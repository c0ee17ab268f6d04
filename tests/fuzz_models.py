"""Random small models for the silent-wrong-gradient fuzzer (tests/test_fuzz.py, bench/fuzz.py).

A `Case` is a plain, printable description of one example: the ops applied to a hidden state `h` ([B, T, H] or
[B, H]), the loss, the zb options, whether the input needs a gradient, the seed of the weights and data and the
dtype. `repr(case)` is a Python expression that rebuilds it, so every finding is reproducible:

    from tests.fuzz_models import Case, run_case
    print(run_case(Case(ops=("softmax(0)",), loss="mean", rank=3, ...)))

`run_case` runs one zb step and one eager step on identical copies and says what happened: "exact" (the loss, every
parameter gradient and the input's gradient match eager within RTOL/ATOL), "refused" (a `ZbError`), "silent" (a
difference without an error: the bug the fuzzer hunts) or "other" (an exception that is not a `ZbError`: also a
finding). Ops marked `mixes=True` mix samples along the batch (or depend on a sample's position in it): zb cannot
microbatch them exactly, so refusing them is the expected outcome, but the property only asks "equal or ZbError".
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from zb.core.errors import ZbError

B, T, H, V = 8, 4, 8, 5  # batch (divisible by microbatches x data_parallel), length, hidden, classes
RTOL, ATOL = 1e-5, 1e-6

STAGES = (1, 2, 3)
MICROBATCHES = (1, 2, 4)
SCHEDULES = ("1f1b", "zb-h1", "gpipe")
DATA_PARALLEL = (1, 2)


# ----------------------------------------------------------------------------------------------------------------
# The vocabulary


@dataclass(frozen=True)
class Op:
    name: str
    kind: str  # "per-sample", "batch-mixing", "batch-view" (merges/transposes the batch dim, per sample), "reduction"
    build: Callable[[], nn.Module]
    ranks: tuple[int, ...] = (2, 3)  # ranks of h the op accepts
    reduces: bool = False  # [B, T, H] -> [B, H]

    @property
    def mixes(self) -> bool:
        """Mixes samples along the batch (or depends on a sample's position in it): expected to be refused."""
        return self.kind == "batch-mixing"


class Fn(nn.Module):
    """A parameter-free op."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, h):
        return self.fn(h)


class WithLinear(nn.Module):
    """An op with one Linear(H, H): fn(linear, h)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.linear = nn.Linear(H, H)

    def forward(self, h):
        return self.fn(self.linear, h)


class RMSNorm(nn.Module):
    def __init__(self, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(H))

    def forward(self, h):
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    """Self-attention over T with F.scaled_dot_product_attention, 2 heads."""

    def __init__(self, causal):
        super().__init__()
        self.causal = causal
        self.qkv = nn.Linear(H, 3 * H)
        self.out = nn.Linear(H, H)

    def forward(self, h):
        b, t, c = h.shape
        q, k, v = (z.view(b, t, 2, c // 2).transpose(1, 2) for z in self.qkv(h).chunk(3, dim=-1))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return h + self.out(a.transpose(1, 2).reshape(b, t, c))


class BatchNorm(nn.Module):
    """BatchNorm1d in training mode over the H channels of [B, H] or [B, T, H]."""

    def __init__(self, running):
        super().__init__()
        self.bn = nn.BatchNorm1d(H, track_running_stats=running)

    def forward(self, h):
        return self.bn(h) if h.dim() == 2 else self.bn(h.transpose(1, 2)).transpose(1, 2)


class FixedIndex(nn.Module):
    """Index dim 0 by a fixed index of the full batch's size (a buffer): index_select or gather."""

    def __init__(self, gather):
        super().__init__()
        self.gather = gather
        self.register_buffer("index", torch.tensor([3, 0, 7, 1, 6, 2, 5, 4]))

    def forward(self, h):
        if self.gather:
            return torch.gather(h, 0, self.index.view(-1, *([1] * (h.dim() - 1))).expand_as(h))
        return h.index_select(0, self.index)


def _topk(h):
    v = h.topk(H // 2, dim=-1).values
    return torch.cat([v, -v], dim=-1)


def _last_dims(h):
    return (1,) * (h.dim() - 1)


def _gram(h):
    flat = h.flatten(1)
    scores = flat @ flat.transpose(0, 1) / math.sqrt(flat.shape[1])
    return (scores.softmax(-1) @ flat).view_as(h)


def _ops() -> dict[str, Op]:
    ops = [
        # per-sample
        Op("linear", "per-sample", lambda: nn.Linear(H, H)),
        Op("gelu", "per-sample", lambda: Fn(F.gelu)),
        Op("tanh", "per-sample", lambda: Fn(torch.tanh)),
        Op("layernorm", "per-sample", lambda: nn.LayerNorm(H)),
        Op("rmsnorm", "per-sample", RMSNorm),
        Op("residual(tanh(linear))", "per-sample", lambda: WithLinear(lambda lin, h: h + torch.tanh(lin(h)))),
        Op("softmax(-1)", "per-sample", lambda: Fn(lambda h: h.softmax(-1))),
        Op("cumsum(-1)", "per-sample", lambda: Fn(lambda h: h.cumsum(-1) / H)),
        Op("sort(-1)", "per-sample", lambda: Fn(lambda h: h.sort(-1).values)),
        Op("flip(-1)", "per-sample", lambda: Fn(lambda h: h.flip(-1))),
        Op("roll(1,-1)", "per-sample", lambda: Fn(lambda h: h.roll(1, -1))),
        Op("topk(-1)", "per-sample", lambda: Fn(_topk)),
        Op("softmax(1)", "per-sample", lambda: Fn(lambda h: h.softmax(1)), ranks=(3,)),
        Op("cumsum(1)", "per-sample", lambda: Fn(lambda h: h.cumsum(1) / T), ranks=(3,)),
        Op("sort(1)", "per-sample", lambda: Fn(lambda h: h.sort(1).values), ranks=(3,)),
        Op("flip(1)", "per-sample", lambda: Fn(lambda h: h.flip(1)), ranks=(3,)),
        Op("roll(1,1)", "per-sample", lambda: Fn(lambda h: h.roll(1, 1)), ranks=(3,)),
        Op("attention(sdpa)", "per-sample", lambda: Attention(False), ranks=(3,)),
        Op("attention(sdpa,causal)", "per-sample", lambda: Attention(True), ranks=(3,)),
        # reductions over non-batch dims
        Op("h*mean(-1)", "reduction", lambda: Fn(lambda h: h * h.mean(-1, keepdim=True))),
        Op("h-sum(-1)/H", "reduction", lambda: Fn(lambda h: h - h.sum(-1, keepdim=True) / H)),
        Op("mean(1)", "reduction", lambda: Fn(lambda h: h.mean(1)), ranks=(3,), reduces=True),
        Op("sum(1)", "reduction", lambda: Fn(lambda h: h.sum(1) / T), ranks=(3,), reduces=True),
        Op("amax(1)", "reduction", lambda: Fn(lambda h: h.amax(1)), ranks=(3,), reduces=True),
        # views that merge or swap the batch dim, still per sample
        Op("flatten(0,1)>linear>view", "batch-view",
           lambda: WithLinear(lambda lin, h: lin(h.flatten(0, 1)).view_as(h)), ranks=(3,)),
        Op("flatten(0,1)>layernorm>view", "batch-view",
           lambda: Fn(lambda h: F.layer_norm(h.flatten(0, 1), (H,)).view_as(h)), ranks=(3,)),
        Op("flatten(0,1)>softmax(-1)>view", "batch-view",
           lambda: Fn(lambda h: h.flatten(0, 1).softmax(-1).view(h.shape)), ranks=(3,)),
        Op("reshape(-1,H)>linear>reshape", "batch-view",
           lambda: WithLinear(lambda lin, h: lin(h.reshape(-1, H)).reshape(h.shape))),
        Op("transpose(0,1)>softmax(0)>transpose", "batch-view",
           lambda: Fn(lambda h: h.transpose(0, 1).softmax(0).transpose(0, 1)), ranks=(3,)),
        Op("transpose(0,1)>cumsum(0)>transpose", "batch-view",
           lambda: Fn(lambda h: (h.transpose(0, 1).cumsum(0) / T).transpose(0, 1)), ranks=(3,)),
        Op("transpose(0,1)>flip(0)>transpose", "batch-view",
           lambda: Fn(lambda h: h.transpose(0, 1).flip(0).transpose(0, 1).contiguous()), ranks=(3,)),
        Op("reshape(B,-1)>softmax(-1)>view", "batch-view",
           lambda: Fn(lambda h: h.reshape(h.shape[0], -1).softmax(-1).view(h.shape)), ranks=(3,)),
        # along the batch dim: mix samples, or depend on a sample's position in the batch
        Op("softmax(0)", "batch-mixing", lambda: Fn(lambda h: h.softmax(0))),
        Op("cumsum(0)", "batch-mixing", lambda: Fn(lambda h: h.cumsum(0) / B)),
        Op("sort(0)", "batch-mixing", lambda: Fn(lambda h: h.sort(0).values)),
        Op("flip(0)", "batch-mixing", lambda: Fn(lambda h: h.flip(0))),
        Op("roll(1,0)", "batch-mixing", lambda: Fn(lambda h: h.roll(1, 0))),
        Op("h-mean(0)", "batch-mixing", lambda: Fn(lambda h: h - h.mean(0))),
        Op("gram(h@h.T)", "batch-mixing", lambda: Fn(_gram)),
        Op("batchnorm(train)", "batch-mixing", lambda: BatchNorm(True)),
        Op("batchnorm(train,no-stats)", "batch-mixing", lambda: BatchNorm(False)),
        Op("h+h[0:1]", "batch-mixing", lambda: Fn(lambda h: h + h[0:1])),
        Op("cat(h[1:],h[:1])", "batch-mixing", lambda: Fn(lambda h: torch.cat([h[1:], h[:1]]))),
        Op("index_select(0,fixed)", "batch-mixing", lambda: FixedIndex(False)),
        Op("gather(0,fixed)", "batch-mixing", lambda: FixedIndex(True)),
        Op("h+arange(B)", "batch-mixing",
           lambda: Fn(lambda h: h + 0.1 * torch.arange(h.shape[0], dtype=h.dtype).view(-1, *_last_dims(h)))),
        Op("flatten(0,1)>softmax(0)>view", "batch-mixing",
           lambda: Fn(lambda h: h.flatten(0, 1).softmax(0).view(h.shape)), ranks=(3,)),
        Op("reshape(-1,H)>center(0)>reshape", "batch-mixing",
           lambda: Fn(lambda h: (lambda f: f - f.mean(0))(h.reshape(-1, H)).reshape(h.shape))),
        Op("transpose(0,1)>softmax(1)>transpose", "batch-mixing",
           lambda: Fn(lambda h: h.transpose(0, 1).softmax(1).transpose(0, 1)), ranks=(3,)),
    ]
    return {op.name: op for op in ops}


OPS = _ops()


# ----------------------------------------------------------------------------------------------------------------
# Losses: fn(o, y) with o the head's output ([B, T, V] or [B, V]); `target` says what y is.


@dataclass(frozen=True)
class Loss:
    name: str
    target: str  # "float" (shaped like o) or "class" (o's shape without V, -100 padding, uneven)
    fn: Callable


def _ce(o, y, reduction="mean"):
    return F.cross_entropy(o.reshape(-1, V), y.reshape(-1), reduction=reduction)


LOSSES = {loss.name: loss for loss in [
    Loss("mean", "float", lambda o, y: (o * y).tanh().mean()),
    Loss("sum", "float", lambda o, y: (o - y).pow(2).sum()),
    Loss("mse", "float", lambda o, y: F.mse_loss(o, y)),
    Loss("sum/B", "float", lambda o, y: (o - y).pow(2).sum() / o.shape[0]),
    Loss("token-mean ce", "class", lambda o, y: _ce(o, y)),
    Loss("ce sum/token count", "class",
         lambda o, y: (_ce(o, y, "none") * (y.reshape(-1) != -100)).sum() / (y != -100).sum()),
    Loss("token-mean ce + aux mean", "class", lambda o, y: _ce(o, y) + 0.01 * o.pow(2).mean()),
]}


# ----------------------------------------------------------------------------------------------------------------
# A case, its model and its inputs


@dataclass(frozen=True)
class Case:
    ops: tuple[str, ...]
    loss: str
    rank: int = 3  # of the input x: 3 = [B, T, H], 2 = [B, H]
    stages: int = 1
    microbatches: int = 1
    schedule: str = "1f1b"
    data_parallel: int = 1
    input_grad: bool = False
    seed: int = 0
    dtype: str = "float64"

    def options(self) -> dict:
        return {"stages": self.stages, "microbatches": self.microbatches, "schedule": self.schedule,
                "data_parallel": self.data_parallel, "compiler": "eager"}

    @property
    def mixing_ops(self) -> list[str]:
        return [name for name in self.ops if OPS[name].mixes]

    def describe(self) -> str:
        kinds = ", ".join(f"{name}{' [mixes the batch: refusal expected]' if OPS[name].mixes else ''}"
                          for name in self.ops)
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items() if k != "compiler")
        return (f"x{list(self.shape())} -> linear -> {kinds or '(no ops)'} -> head -> loss {self.loss!r}; "
                f"{opts}; input_grad={self.input_grad}, seed={self.seed}, {self.dtype}\n  repro: {self!r}")

    def shape(self) -> tuple[int, ...]:
        return (B, T, H) if self.rank == 3 else (B, H)

    def out_rank(self) -> int:
        return self.rank - sum(OPS[name].reduces for name in self.ops)


class FuzzModel(nn.Module):
    def __init__(self, case: Case):
        super().__init__()
        self.inp = nn.Linear(H, H)
        self.ops = nn.ModuleList(OPS[name].build() for name in case.ops)
        self.head = nn.Linear(H, V)
        self.loss_fn = LOSSES[case.loss].fn

    def forward(self, x, y):
        h = self.inp(x)
        for op in self.ops:
            h = op(h)
        return self.loss_fn(self.head(h), y)


def build(case: Case) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """The model and (x, y), seeded by case.seed."""
    dtype = getattr(torch, case.dtype)
    torch.manual_seed(case.seed)
    model = FuzzModel(case).to(dtype)
    x = torch.randn(*case.shape(), dtype=dtype)
    out_shape = (B, T) if case.out_rank() == 3 else (B,)
    if LOSSES[case.loss].target == "float":
        y = torch.randn(*out_shape, V, dtype=dtype)
    else:
        y = torch.randint(0, V, out_shape)
        if len(out_shape) == 2:  # uneven padding: row i keeps its first keep[i] tokens (0 to T)
            keep = torch.randint(0, T + 1, (B,))
            keep[torch.randint(0, B, ())] = T  # at least one token in the batch
            y[torch.arange(T).expand(B, T) >= keep[:, None]] = -100
        else:  # some rows padded out entirely
            y[torch.rand(B) < 0.3] = -100
            y[torch.randint(0, B, ())] = torch.randint(0, V, ())
    x.requires_grad_(case.input_grad)
    return model, (x, y)


def validate(case: Case) -> None:
    rank = case.rank
    for name in case.ops:
        op = OPS[name]
        assert rank in op.ranks, f"{name} does not take a rank-{rank} h"
        rank -= op.reduces
    assert B % (case.microbatches * case.data_parallel) == 0


# ----------------------------------------------------------------------------------------------------------------
# Running one case


@dataclass
class Outcome:
    case: Case
    kind: str  # "exact", "refused", "silent", "other", "invalid" (eager itself gave a non-finite loss)
    detail: str = ""
    error: str = ""  # exception class for "refused"/"other"
    differences: list[str] = field(default_factory=list)

    def report(self) -> str:
        lines = [f"{self.kind}: {self.case.describe()}"]
        if self.error:
            lines.append(f"  {self.error}: {self.detail}")
        lines += [f"  {d}" for d in self.differences[:8]]
        if len(self.differences) > 8:
            lines.append(f"  ... and {len(self.differences) - 8} more differences")
        return "\n".join(lines)


def _clone(args):
    return tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)


def _difference(what: str, got, want) -> str | None:
    if (got is None) != (want is None):
        return f"{what}: zb {'None' if got is None else 'a tensor'}, eager {'None' if want is None else 'a tensor'}"
    if got is None:
        return None
    if got.shape != want.shape:
        return f"{what}: shape {list(got.shape)} vs eager {list(want.shape)}"
    if torch.allclose(got, want, rtol=RTOL, atol=ATOL, equal_nan=True):
        return None
    err = (got - want).abs()
    rel = (err / want.abs().clamp_min(ATOL)).max().item()
    return f"{what}: max abs diff {err.max().item():.3g} (max rel {rel:.3g}), eager norm {want.norm().item():.3g}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else "")[:300]


def run_case(case: Case) -> Outcome:
    """One eager step and one zb step on identical copies of the case's model and inputs."""
    validate(case)
    torch._dynamo.reset()
    model, args = build(case)
    reference = copy.deepcopy(model)
    zb_args, ref_args = _clone(args), _clone(args)

    want = reference(*ref_args)
    if not torch.isfinite(want).item():
        return Outcome(case, "invalid", f"eager loss {want.item()}")
    want.backward()

    # A shape error inside Dynamo's fake-tensor tracing is reported below; torch also logs its whole traceback.
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level, fake_log.level = fake_log.level, logging.CRITICAL
    try:
        compiled = torch.compile(model, backend="zb", options=case.options())
        got = compiled(*zb_args)
        got.backward()
    except ZbError as e:
        return Outcome(case, "refused", _first_line(e), type(e).__name__)
    except Exception as e:  # noqa: BLE001 - any other exception type is a finding
        chain = [e]
        while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and nxt not in chain:
            chain.append(nxt)
        wrapped = next((c for c in chain if isinstance(c, ZbError)), None)
        name = type(e).__name__ + (f" wrapping {type(wrapped).__name__}" if wrapped is not None else "")
        root = wrapped if wrapped is not None else chain[-1]
        detail = _first_line(e) if root is e else f"{_first_line(e)} <- {type(root).__name__}: {_first_line(root)}"
        where = traceback.extract_tb(e.__traceback__)
        if where:
            detail += f" (raised at {where[-1].filename.split('/work/main/')[-1]}:{where[-1].lineno})"
        return Outcome(case, "other", detail, name)
    finally:
        fake_log.setLevel(level)
        torch._dynamo.reset()

    differences = [_difference("loss", got.detach(), want.detach())]
    named = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        differences.append(_difference(f"grad of {name}", p.grad, named[name].grad))
    if case.input_grad:
        differences.append(_difference("grad of input x", zb_args[0].grad, ref_args[0].grad))
    differences = [d for d in differences if d is not None]
    return Outcome(case, "silent" if differences else "exact", differences=differences)


def minimize(outcome: Outcome, budget: int = 40) -> Outcome:
    """A smaller case with the same kind of finding ("silent" or "other"): greedily drops ops and simplifies options
    (fewer stages, one replica, fewer microbatches, no input gradient, 1f1b) while the finding stays."""
    best, tries = outcome, 0

    def candidates(case: Case):
        for i in range(len(case.ops)):
            yield dataclasses.replace(case, ops=case.ops[:i] + case.ops[i + 1:])
        for field_name, simpler in (("data_parallel", 1), ("microbatches", 1), ("microbatches", 2), ("stages", 1),
                                    ("stages", 2), ("input_grad", False), ("schedule", "1f1b")):
            current = getattr(case, field_name)
            if current != simpler and (isinstance(simpler, str) or simpler < current):
                yield dataclasses.replace(case, **{field_name: simpler})

    improved = True
    while improved and tries < budget:
        improved = False
        for candidate in candidates(best.case):
            if tries >= budget:
                break
            try:
                validate(candidate)
            except AssertionError:
                continue
            tries += 1
            result = run_case(candidate)
            if result.kind == outcome.kind and (outcome.kind != "other" or result.error == outcome.error):
                best, improved = result, True
                break
    return best


# ----------------------------------------------------------------------------------------------------------------
# Drawing cases: a Hypothesis strategy (the test) and an i.i.d. sampler (bench/fuzz.py), with the same choices


def _draw_case(choose, integer, max_ops: int, dtype: str) -> Case:
    """choose(options) picks one of a sequence, integer(lo, hi) an int in [lo, hi]: Hypothesis or random.Random."""
    rank = choose((3, 2))
    ops, r = [], rank
    for _ in range(integer(0, max_ops)):
        name = choose([n for n, op in OPS.items() if r in op.ranks])
        ops.append(name)
        r -= OPS[name].reduces
    microbatches = choose(MICROBATCHES)
    data_parallel = choose([d for d in DATA_PARALLEL if B % (d * microbatches) == 0])
    return Case(ops=tuple(ops), loss=choose(sorted(LOSSES)), rank=rank, stages=choose(STAGES),
                microbatches=microbatches, schedule=choose(SCHEDULES), data_parallel=data_parallel,
                input_grad=choose((False, True)), seed=integer(0, 2**16), dtype=dtype)


def cases(max_ops: int = 5, dtype: str = "float64"):
    """A Hypothesis strategy of Cases (imported lazily: the builder works without hypothesis)."""
    from hypothesis import strategies as st

    @st.composite
    def strategy(draw):
        return _draw_case(lambda options: draw(st.sampled_from(list(options))),
                          lambda lo, hi: draw(st.integers(lo, hi)), max_ops, dtype)

    return strategy()


def random_case(rng, max_ops: int = 5, dtype: str = "float64") -> Case:
    """One Case drawn uniformly (each choice independent) from `rng`, a random.Random."""
    return _draw_case(lambda options: rng.choice(list(options)), rng.randint, max_ops, dtype)


__all__ = ["B", "H", "LOSSES", "OPS", "T", "V", "Case", "FuzzModel", "Outcome", "build", "cases", "minimize",
           "random_case", "run_case", "validate"]
