"""The memory a step's program implies on each rank, item by item: what zb plans to hold, boundary tensors included.

`planned_memory(program, items, ranks)` replays the executor's bookkeeping (runtime/executor.py) on byte counts
instead of tensors, over each rank's communication program (schedules/p2p.py `communication`):

  * a receive's buffers exist from the batch that posts it until the last piece that reads the value is done
    (a value F saves for the backward lives on as a saved activation: the same storage, counted once);
  * with options param_dtype: each parameter copy from the step's start to the last action of the last stage of
    the rank that reads it;
  * a piece's outputs live where the executor puts them (saved and stashed values until their last reader, an
    activation or gradient for the next stage until its send completes, parameter gradients summed over the
    microbatches until the step ends (the sums a piece adds into, codegen/accumulate.py, from its first use), a
    batched input's gradient slices and the outputs until the step ends);
    while a piece runs, the rank holds its peak (codegen/memory.py) on top;
  * a sent tensor lives until its batch is dropped: the executor drops a batch after an action once all of it has
    completed; its receives complete by their `Wait`, and its sends are assumed to by the end of the next action
    (the peer has posted the matching receive by then).

Not counted: what exists before the step (parameters, the batch, optimizer state), data-parallel reduction
buckets, the fused optimizer update's temporaries (option optimizer), copies `contiguous()` makes of a
non-contiguous boundary tensor before sending it, and scratch space inside single operators. What the executor
measures (`StepExecutor.peak_memory`) is the activations alone (the schedule simulator's M_B and M_W model);
this is the whole step's.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from zb.codegen.program import (
    ACT, ENV, GRAD_ACT, GRAD_SLICE, GRAD_SUM, LOSS_TANGENT, OUT, Key, Kind, PieceName, Program,
)
from zb.schedules import BW, SEND_F, Action, B, F, W
from zb.schedules.p2p import SEND, Batch, Wait

KINDS = ("activations", "boundary", "gradients", "outputs", "copies")


@dataclass
class RankMemory:
    """One rank's planned step: `peak` bytes (at item `at`), `held` at the peak by kind (KINDS; a running piece's
    working bytes under "running"), the most of each kind held at any point (`most`), and the bytes held after
    each item (`levels`: (item, bytes))."""

    peak: int = 0
    at: str = ""
    held: dict[str, int] = field(default_factory=dict)
    most: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    levels: list[tuple[str, int]] = field(default_factory=list)


class _Alloc:
    """One planned buffer of the memory replay: its bytes, its kind and how many values still refer to it."""
    __slots__ = ("bytes", "kind", "refs")

    def __init__(self, size: int, kind: str):
        self.bytes, self.kind, self.refs = size, kind, 0


def planned_memory(program: Program, items: Sequence[Sequence], ranks: Sequence[int]) -> dict[int, RankMemory]:
    """Each of `ranks`' planned memory over one step of `program` run as `items` (the communication program)."""
    program.refresh_memory()  # (a symbolic plan: the bytes at the last call's sizes)
    return {rank: _Replay(program).run(items[rank]) for rank in ranks}


class _Replay:
    """Replays a step's actions on planned buffers (no tensors) to give each rank's peak memory."""

    def __init__(self, program: Program):
        self.program = program
        self.level = 0
        self.by_kind: dict[str, int] = defaultdict(int)
        self.memory = RankMemory()
        self.env: dict[tuple[int, int], dict[Key, _Alloc | None]] = defaultdict(dict)
        self.forward_box: dict[tuple[int, int], dict[Key, _Alloc]] = {}
        self.backward_box: dict[tuple[int, int], dict[Key, _Alloc]] = {}
        # Posted batches not yet dropped: their sent tensors, and the messages they receive not yet waited for.
        self.sending: list[tuple[list[_Alloc], set]] = []
        self.kept: list[_Alloc] = []  # until the step ends: outputs, gradient slices
        self.grads: dict[int, _Alloc] = {}
        self.summed: set[int] = set()

    # Holding and letting go ---------------------------------------------------------------------------------
    def _hold(self, alloc: _Alloc | None) -> None:
        if alloc is not None:
            alloc.refs += 1
            if alloc.refs == 1:
                self.level += alloc.bytes
                self.by_kind[alloc.kind] += alloc.bytes
                most = self.memory.most
                most[alloc.kind] = max(most[alloc.kind], self.by_kind[alloc.kind])

    def _drop(self, alloc: _Alloc | None) -> None:
        if alloc is not None:
            alloc.refs -= 1
            if alloc.refs == 0:
                self.level -= alloc.bytes
                self.by_kind[alloc.kind] -= alloc.bytes

    def _relabel(self, alloc: _Alloc, kind: str) -> None:
        if alloc.refs > 0 and alloc.kind != kind:
            self.by_kind[alloc.kind] -= alloc.bytes
            self.by_kind[kind] += alloc.bytes
            self.memory.most[kind] = max(self.memory.most[kind], self.by_kind[kind])
        alloc.kind = kind

    def _peak(self, extra: int, where: str) -> None:
        if self.level + extra > self.memory.peak:
            self.memory.peak, self.memory.at = self.level + extra, where
            self.memory.held = {k: self.by_kind[k] for k in KINDS} | {"running": extra}

    # The step ----------------------------------------------------------------------------------------------
    def run(self, items: Sequence) -> RankMemory:
        self._copies(items)
        for item in items:
            if isinstance(item, Batch):
                posted = [self._post(op) for op in item.ops]
                waiting = {op.message for op in item.ops if op.kind != SEND}
                self.sending.append(([a for allocs in posted for a in allocs], waiting))
            elif isinstance(item, Wait):  # moves nothing (the buffers were counted when posted); its batch is in
                for _, waiting in self.sending:
                    waiting.discard(item.message)
            elif isinstance(item, Action):
                # The executor drops a batch (and its sent tensors) after an action once the whole batch has
                # completed: its receives were waited for before the action, its sends are assumed gone by its end.
                done = [batch for batch in self.sending if not batch[1]]
                self.sending = [batch for batch in self.sending if batch[1]]
                self._action(item)
                for alloc in self.copy_until.pop(item, ()):
                    self._drop(alloc)
                for allocs, _ in done:
                    for alloc in allocs:
                        self._drop(alloc)
            else:
                raise TypeError(f"unknown item {item!r}")
            self._peak(0, str(item))
            self.memory.levels.append((str(item), self.level))
        return self.memory

    def _copies(self, items: Sequence) -> None:
        """Mixed precision: the parameter copies this rank's stages read, made at the step's start and freed after
        the last action of the last of those stages (runtime/executor.py `_make_copies`)."""
        self.copy_until: dict[Action, list[_Alloc]] = {}
        last: dict[int, Action] = {}
        for item in items:
            if isinstance(item, Action) and item.kind in (F, B, W, BW):
                last[item.stage] = item
        order = {a: i for i, a in enumerate(items) if isinstance(a, Action)}
        for index, dtype in self.program.copies.items():
            readers = [last[s] for s in last if index in self.program.stages[s].reads]
            spec = self.program.input_specs[index]
            if not readers or spec is None:
                continue
            alloc = _Alloc(spec.nbytes * dtype.itemsize // spec.dtype.itemsize, "copies")
            self._hold(alloc)
            self.copy_until.setdefault(max(readers, key=order.__getitem__), []).append(alloc)

    def _post(self, op) -> list[_Alloc]:
        """A batch's operation: a receive allocates its buffers (into the mailbox it will be read from); a send
        takes its values out of the mailbox (zeros where no gradient flowed) and returns them, held until sent."""
        s, kind, mb = op.message
        stages = self.program.stages
        forward = kind == SEND_F
        specs = stages[s + 1].receives_forward if forward else stages[s - 1].receives_backward
        boxes = self.forward_box if forward else self.backward_box
        if op.kind != SEND:
            box = boxes.setdefault((s, mb), {})
            for spec in specs:
                alloc = _Alloc(spec.nbytes, "boundary")
                box[spec.key if forward else spec.key.grad()] = alloc
                self._hold(alloc)
            return []
        box = boxes.pop((s, mb), {})
        sent = []
        for spec in specs:
            alloc = box.pop(spec.key if forward else spec.key.grad(), None)
            if alloc is None:
                alloc = _Alloc(spec.nbytes, "boundary")
                self._hold(alloc)
            sent.append(alloc)  # held by the send now, dropped when it completes
        for alloc in box.values():
            self._drop(alloc)
        return sent

    def _action(self, action: Action) -> None:
        s, kind, mb = action
        last = self.program.num_stages - 1
        env = self.env[(s, mb)]
        if kind == F:
            incoming = self.forward_box.pop((s - 1, mb), {}) if s > 0 else {}
            for key in self._piece(s, PieceName.FORWARD).inputs if self._piece(s, PieceName.FORWARD) else ():
                if not key.is_(Kind.IN):
                    self._set(env, key, incoming.get(key))
            for alloc in incoming.values():
                self._drop(alloc)
            self._run(s, mb, PieceName.FORWARD, str(action))
            for alloc in incoming.values():  # what F kept of its input is an activation now, not a message
                self._relabel(alloc, "activations")
            if self.program.training and s == last and self.program.outputs[0] is not None:
                self._set(env, LOSS_TANGENT, _Alloc(self.program.outputs[0].nbytes, "activations"))
        if kind in (B, BW):
            if s < last:
                box = self.backward_box.pop((s + 1, mb), {})
                for spec in self.program.stages[s].receives_backward:
                    alloc = box.get(spec.key.grad()) or _Alloc(spec.nbytes, "boundary")
                    self._set(env, spec.key.tangent(), alloc)
                for alloc in box.values():
                    self._drop(alloc)
            self._run(s, mb, PieceName.BACKWARD_INPUT, str(action))
        if kind in (W, BW):
            self._run(s, mb, PieceName.BACKWARD_WEIGHT, str(action))
        if not env:
            self.env.pop((s, mb), None)

    def _piece(self, s: int, name: PieceName):
        return self.program.stages[s].pieces.get(name)

    def _set(self, env: dict, key: Key, alloc: _Alloc | None) -> None:
        self._hold(alloc)
        self._drop(env.get(key))
        env[key] = alloc

    def _run(self, s: int, mb: int, name: PieceName, where: str) -> None:
        piece = self._piece(s, name)
        if piece is None:
            return
        env = self.env[(s, mb)]
        for spec in piece.sums:  # a gradient sum the piece adds into: zeros from its first use to the step's end
            if spec.key.index not in self.grads:
                self.grads[spec.key.index] = _Alloc(spec.nbytes, "gradients")
                self._hold(self.grads[spec.key.index])
                self.summed.add(spec.key.index)
        self._peak(piece.memory.peak, where)
        inputs = [env.get(k) for k in piece.inputs]
        made: dict[int, _Alloc] = {}
        summed = []
        for route, out in zip(piece.routes, piece.memory.outputs):
            if out[0] == "input":
                alloc = inputs[out[1]]
            elif out[0] == "new":
                kind = "gradients" if route.kind in (GRAD_SUM, GRAD_SLICE) else \
                    "boundary" if route.kind in (ACT, GRAD_ACT) else "outputs" if route.kind == OUT else "activations"
                alloc = made.setdefault(out[1], _Alloc(out[2], kind))
            else:
                alloc = None
            if route.kind == ENV:
                self._set(env, route.key, alloc)
            elif route.kind == ACT:
                self._hold(alloc)
                self.forward_box.setdefault((s, mb), {})[route.key] = alloc
            elif route.kind == GRAD_ACT:
                self._hold(alloc)
                self.backward_box.setdefault((s, mb), {})[route.key] = alloc
            elif route.kind in (OUT, GRAD_SLICE):
                self._hold(alloc)
                self.kept.append(alloc)
            elif route.kind == GRAD_SUM:
                summed.append((route.index, alloc))
        # Parameter gradients: the first is kept as it is, the second makes a new sum, later ones add in place.
        new_sums, added = [], {}
        for index, alloc in summed:
            if index not in self.grads:
                self.grads[index] = alloc
                self._hold(alloc)
                continue
            if alloc is not None:
                added[id(alloc)] = alloc.bytes  # alive until it is added
            if index not in self.summed:
                self.summed.add(index)
                spec = self.program.input_specs[index]
                new_sums.append((index, _Alloc(spec.nbytes if spec is not None else 0, "gradients")))
        if new_sums:
            self._peak(sum(added.values()) + sum(t.bytes for _, t in new_sums), where)
            for index, total in new_sums:
                self._hold(total)
                self._drop(self.grads[index])
                self.grads[index] = total
        for key, _ in piece.drops:
            if key in env:
                self._drop(env.pop(key))
