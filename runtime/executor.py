"""Execute one step of a plan: every local rank's lowered action list (F, B, W, BW, sends and receives).

Per (stage, microbatch) the executor keeps the values its pieces read and write (see passes/plan.py for the
keys) and frees each as soon as no later piece of that stage reads it. Boundary tensors go into mailboxes:
`forward[(stage, mb)]` holds the act:<name> outputs of a stage's F, `backward[(stage, mb)]` the grad:act:<name>
outputs of its B; the next stage reads them directly when it lives on the same rank, else they travel through
the transport (SEND_*/RECV_*). In one process every rank's list runs here, a rank yielding at a receive whose
message is not there yet; under torch.distributed each process runs its own rank's list.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any
from collections.abc import Sequence

import torch

from zb.codegen import CompiledPiece
from zb.errors import ZbError, ZbUnsupportedError
from zb.passes.plan import PIECES, Plan, output_keys
from zb.runtime.microbatch import combine_outputs, split_microbatches
from zb.runtime.transport import tag_of
from zb.schedules import BW, RECV_B, RECV_F, SEND_B, SEND_F, Action, B, F, Schedule, W


class StepExecutor:
    def __init__(self, plan: Plan, compiled: dict[tuple[int, str], CompiledPiece], schedule: Schedule,
                 ranks: Sequence[int], transport):
        self.plan, self.schedule, self.ranks, self.transport = plan, schedule, list(ranks), transport  # lowered
        self.placement = schedule.placement
        self.pieces = {s: {name: compiled[(s, name)] for name in PIECES if (s, name) in compiled}
                       for s in range(plan.num_stages)}
        self.forward_spec = {s: plan.stages[s].receives_forward for s in range(1, plan.num_stages)}
        self.backward_spec = {s: plan.stages[s].receives_backward for s in range(plan.num_stages - 1)}
        self.drop = {s: _last_uses([self.pieces[s][n] for n in PIECES if n in self.pieces[s]])
                     for s in self.pieces}
        self.counted = {s: _held_keys(plan.stages[s]) for s in range(plan.num_stages)}
        self.routes = {(s, name): _routes(piece, plan, self.counted[s], self.drop[s][name])
                       for s, pieces in self.pieces.items() for name, piece in pieces.items()}
        self.trace: list[tuple[int, str, float, float]] = []  # (rank, action, start, end) of the last step
        # With repeat > 1 every piece runs that many times back to back (the same inputs, the random state
        # replayed; only the first run's results are kept) and `quickest[(stage, kind)]` collects, per action,
        # the quickest run: a timing that one disturbed run cannot spoil. Used to measure the first step.
        self.repeat = 1
        self.quickest: dict[tuple[int, str], list[float]] = {}
        self.peak_memory: dict[int, int] = {}  # activation bytes each local rank held at most in the last step

    # One step ---------------------------------------------------------------------------------------------
    def run(self, args: Sequence[Any], on_stage_done=None) -> tuple[list[list[Any]], dict[int, list[torch.Tensor]]]:
        """Runs every action of the local ranks; returns (per-output lists over microbatches, grads by input).

        The gradients map an input's index to one slice per microbatch for a batched input, and to [the sum
        over microbatches] for any other (parameters, buffers). `on_stage_done(stage, grads)` is called right
        after a stage's last compute action (its last W), with the gradients produced so far."""
        plan = self.plan
        last = {}
        for r in self.ranks:
            for a in self.schedule.actions[r]:
                if a.kind in (F, B, W, BW):
                    last[a.stage] = a
        self.inputs = split_microbatches(plan.inputs, args, plan.options.microbatches)
        self.env: dict[tuple[int, int], dict[str, Any]] = defaultdict(dict)
        self.forward_box: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self.backward_box: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self.outs: list[list[Any]] = [[] for _ in range(plan.num_outputs)]
        self.grads: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.owned: set[int] = set()  # unbatched inputs whose gradient sum this step allocated
        self.trace = []
        self.quickest = {}
        self.transport.prepare([self._receive(a) for r in self.ranks for a in self.schedule.actions[r]
                                if a.kind in (RECV_F, RECV_B)])
        self.held = {r: 0 for r in self.ranks}
        self.peak_memory = {r: 0 for r in self.ranks}
        position = {r: 0 for r in self.ranks}
        while any(position[r] < len(self.schedule.actions[r]) for r in self.ranks):
            progressed = False
            for rank in self.ranks:
                actions = self.schedule.actions[rank]
                while position[rank] < len(actions):
                    action = actions[position[rank]]
                    if action.kind in (RECV_F, RECV_B) and not self.transport.ready(self._tag(action)):
                        break
                    start = time.perf_counter()
                    self._do(rank, action)
                    self.trace.append((rank, str(action), start, time.perf_counter()))
                    if self.repeat > 1 and action.kind in (F, B, W, BW):
                        self.quickest.setdefault((action.stage, action.kind), []).append(self._seconds)
                    if on_stage_done is not None and plan.training and last.get(action.stage) == action:
                        on_stage_done(action.stage, self.grads)
                    position[rank] += 1
                    progressed = True
            if not progressed:
                stuck = [str(self.schedule.actions[r][position[r]]) for r in self.ranks
                         if position[r] < len(self.schedule.actions[r])]
                raise ZbError(f"the pipeline step deadlocked at {', '.join(stuck)}")
        self.transport.finish()
        return self.outs, self.grads

    def _receive(self, action: Action) -> tuple[int, list[tuple], int]:
        """(tag, [(shape, dtype)], source rank) of a RECV action."""
        s = action.stage
        if action.kind == RECV_F:
            return self._tag(action), [(sh, dt) for _, sh, dt in self.forward_spec[s]], self.placement[s - 1]
        return self._tag(action), [(sh, dt) for _, sh, dt in self.backward_spec[s]], self.placement[s + 1]

    def _tag(self, action: Action) -> int:
        if action.kind == RECV_F:
            return tag_of(False, action.stage - 1, action.microbatch)
        if action.kind == RECV_B:
            return tag_of(True, action.stage + 1, action.microbatch)
        return tag_of(action.kind == SEND_B, action.stage, action.microbatch)

    def _do(self, rank: int, action: Action) -> None:
        s, kind, mb = action
        self._seconds = 0.0  # the quickest run of each piece this action runs, summed
        if kind == F:
            self._forward(s, mb)
        elif kind == B:
            self._backward_input(s, mb)
        elif kind == W:
            self._run(s, mb, "backward_weight")
        elif kind == BW:
            self._backward_input(s, mb)
            self._run(s, mb, "backward_weight")
        elif kind == SEND_F:
            box = self.forward_box.pop((s, mb))
            self.transport.send(self._tag(action), [box[k] for k, _, _ in self.forward_spec[s + 1]],
                                self.placement[s + 1])
        elif kind == SEND_B:
            box = self.backward_box.pop((s, mb))
            self.transport.send(self._tag(action), [_grad_or_zeros(box, k, shape, dtype)
                                                    for k, shape, dtype in self.backward_spec[s - 1]],
                                self.placement[s - 1])
        elif kind == RECV_F:
            spec = self.forward_spec[s]
            tensors = self.transport.recv(*self._receive(action))
            self.forward_box[(s - 1, mb)] = _checked(dict(zip((k for k, _, _ in spec), tensors)), spec, s - 1, s)
        elif kind == RECV_B:
            spec = self.backward_spec[s]
            tensors = self.transport.recv(*self._receive(action))
            self.backward_box[(s + 1, mb)] = {f"grad:{k}": t for (k, _, _), t in zip(spec, tensors)}

    def _call(self, piece, args: list) -> tuple:
        if self.repeat <= 1:
            return piece(args)
        results, seconds = _timed_runs(piece, args, self.repeat)
        self._seconds += seconds
        return results

    def _forward(self, s: int, mb: int) -> None:
        env = self.env[(s, mb)]
        incoming = self.forward_box.pop((s - 1, mb), {}) if s > 0 else {}
        for key in self.pieces[s]["forward"].inputs:
            if key.startswith("in:"):
                env[key] = self.inputs[mb][int(key[3:])]
            else:
                env[key] = incoming[key]
        self._run(s, mb, "forward")
        if self.plan.training and s == self.plan.num_stages - 1:
            # The loss is the mean over microbatches, so each microbatch's loss gets 1/m.
            env["tangent:out:0"] = torch.full_like(self.outs[0][-1], 1.0 / self.plan.options.microbatches)

    def _backward_input(self, s: int, mb: int) -> None:
        env = self.env[(s, mb)]
        if s < self.plan.num_stages - 1:
            box = self.backward_box.pop((s + 1, mb))
            for key, shape, dtype in self.backward_spec[s]:
                env[f"tangent:{key}"] = _grad_or_zeros(box, key, shape, dtype)
        self._run(s, mb, "backward_input")

    def _run(self, s: int, mb: int, name: str) -> None:
        piece = self.pieces[s].get(name)
        if piece is None:  # e.g. the first stage's B when its inputs need no gradient: W does everything
            return
        env = self.env[(s, mb)]
        rank = self.placement[s]
        results = self._call(piece, [env[k] for k in piece.inputs])
        outputs, drops = self.routes[(s, name)]
        summed = []  # (input index, gradient) of unbatched inputs (parameters): summed over microbatches here
        held = 0
        for (route, key, index, counted), value in zip(outputs, results):
            if counted:
                held += _nbytes(value)
            if route == _ENV:
                env[key] = value
            elif route == _OUT:
                self.outs[index].append(value)
            elif route == _ACT:
                self.forward_box.setdefault((s, mb), {})[key] = value
            elif route == _GRAD_ACT:
                self.backward_box.setdefault((s, mb), {})[key] = value
            elif route == _GRAD_SLICE:
                self.grads[index].append(value)
            else:
                summed.append((index, value))
        if summed:
            self._accumulate(summed)
        for key, counted in drops:
            value = env.pop(key, None)
            if counted and value is not None:
                held -= _nbytes(value)
        self.held[rank] += held
        # Sampled between actions, as the schedule simulator accounts memory.
        self.peak_memory[rank] = max(self.peak_memory[rank], self.held[rank])
        if not env:
            self.env.pop((s, mb), None)

    def _accumulate(self, grads: list[tuple[int, torch.Tensor]]) -> None:
        """Add one piece's parameter gradients to the step's sums (`grads[index]` = [sum]) as they come: no
        microbatch's gradients wait until the end of the step. A piece's first output is kept as it is (it may
        alias another value); the first addition makes a sum of the step's own, later ones add in place."""
        start, more = [], []
        for i, g in grads:
            if i not in self.grads:
                self.grads[i] = [g]
            else:
                (more if i in self.owned else start).append((i, g))
        if start:
            totals = torch._foreach_add([self.grads[i][0] for i, _ in start], [g for _, g in start])
            for (i, _), total in zip(start, totals):
                self.grads[i] = [total]
                self.owned.add(i)
        if more:
            torch._foreach_add_([self.grads[i][0] for i, _ in more], [g for _, g in more])


# Where a piece's output goes (see `_routes`).
_ENV, _OUT, _ACT, _GRAD_ACT, _GRAD_SLICE, _GRAD_SUM = range(6)


def _routes(piece: CompiledPiece, plan: Plan, counted: set[str], drop: list[str]):
    """Worked out once per piece: for each output (where it goes, its key, the output or input index it is for,
    whether its bytes count as activation memory), and the (key, counted) of the values freed after the piece."""
    outputs = []
    for key in piece.outputs:
        index = -1
        if key.startswith("out:"):
            route, index = _OUT, int(key[4:])
        elif key.startswith("act:"):
            route = _ACT
        elif key.startswith("grad:act:"):
            route = _GRAD_ACT
        elif key.startswith("grad:in:"):
            index = int(key[8:])
            route = _GRAD_SLICE if plan.inputs[index].batched else _GRAD_SUM
        else:
            route = _ENV
        outputs.append((route, key, index, key in counted))
    return outputs, [(key, key in counted) for key in drop]


def _timed_runs(piece, args: list, repeat: int) -> tuple[tuple, float]:
    """The results of the first run and the quickest of `repeat` runs' seconds; later runs replay the random
    state the first one started from, and the state after the first run is restored."""
    before = torch.random.get_rng_state()
    start = time.perf_counter()
    results = piece(list(args))
    quickest = time.perf_counter() - start
    after = torch.random.get_rng_state()
    for _ in range(repeat - 1):
        torch.random.set_rng_state(before)
        start = time.perf_counter()
        piece(list(args))
        quickest = min(quickest, time.perf_counter() - start)
    torch.random.set_rng_state(after)
    return results, quickest


def _nbytes(value) -> int:
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


def _held_keys(stage) -> set[str]:
    """The saved:/stash: keys whose bytes are activation memory (not a parameter or input passed along)."""
    pieces = [gm for gm in stage.pieces.values() if gm is not None]
    aliases = set()
    for gm in pieces:
        (out,) = gm.graph.find_nodes(op="output")
        for key, node in zip(output_keys(gm), out.args[0]):
            if key and isinstance(node, torch.fx.Node) and node.op == "placeholder" and \
                    node.meta["zb_key"].startswith("in:"):
                aliases.add(key)
    keys = {k for gm in pieces for k in output_keys(gm) if k and k.startswith(("saved:", "stash:"))}
    return keys - aliases


def _grad_or_zeros(box: dict, key: str, shape, dtype) -> torch.Tensor:
    value = box.get(f"grad:{key}")
    return value if value is not None else torch.zeros(shape, dtype=dtype)


def _checked(values: dict, spec, src: int, dst: int) -> dict:
    for key, shape, dtype in spec:
        got = values[key]
        if tuple(got.shape) != shape or got.dtype != dtype:
            raise ZbError(f"stage {src} sent {key} as {got.dtype}{list(got.shape)} but stage {dst} expects "
                          f"{dtype}{list(shape)}: the stages were compiled for different inputs")
    return values


def _last_uses(pieces: list[CompiledPiece]) -> dict[str, list[str]]:
    """For each piece, the keys no later piece of the same stage and microbatch reads: freed right after it."""
    drop: dict[str, list[str]] = {}
    for i, piece in enumerate(pieces):
        later = {k for p in pieces[i + 1:] for k in p.inputs}
        drop[piece.name] = sorted(k for k in set(piece.inputs) | set(piece.outputs) if k not in later)
    return drop


def combine(outs: list[list[Any]], grads: dict[int, list[torch.Tensor]], plan: Plan, microbatches: int):
    """Per-microbatch results -> outputs (mean of scalars, concatenation otherwise) and one gradient per input."""
    combined: list[torch.Tensor | None] = [None] * len(plan.inputs)
    for index, values in grads.items():
        if plan.inputs[index].batched:
            if len(values) != microbatches:  # one slice per microbatch, or the slices cannot be put back in order
                raise ZbUnsupportedError(
                    f"input {plan.inputs[index].name!r} needs a gradient and is read by several pipeline stages; "
                    "zb returns input gradients only for inputs one stage reads"
                )
            combined[index] = torch.cat(values) if len(values) > 1 else values[0]
        else:  # summed over microbatches as the pieces ran
            (combined[index],) = values
    return combine_outputs(outs, microbatches), combined

