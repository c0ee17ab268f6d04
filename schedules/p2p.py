"""Point-to-point in an order NCCL accepts: each rank's communication program, a model of NCCL, and the verifier.

NCCL ignores tags. Between two ranks, the k-th send of one is matched with the k-th receive of the other, in the
order they were issued; an operation waits for its partner (a send may wait for its receive), and operations a rank
issues run in issue order, so a posted receive holds back everything the rank issues after it until its data
arrives. Operations issued together in one group (`torch.distributed.batch_isend_irecv`) progress together. A
runtime that posts its receives early, or whose two sides of a pair issue in different orders, hangs or delivers
the wrong tensor on NCCL while gloo (which matches by tag and never holds a stream) runs it fine.

`program(lowered)` turns a lowered schedule into what each rank runs: its compute and reduction actions, with the
sends and receives between two compute actions issued together as one `Batch`, just in time:

  * a receive is posted in the batch right before the action that reads it (its buffer exists from then on);
  * a send goes out in the batch right after the action that produced it, unless the receiving rank takes an
    earlier-produced message first: then it waits (its tensor kept) until every message the receiver takes before
    it has gone out. Sends therefore follow the receiver's order, and per pair both sides issue the same messages
    in the same order without any tag.

`NcclModel` is NCCL's semantics as a state machine (one FIFO of groups per rank: the strictest reading, where every
operation of a rank, whichever its peer, waits behind the ones it issued before; an active group's operations
complete when their partners are active; a data-parallel reduction completes when every replica has it active).
`verify` runs each rank's program on it, with a rank's host blocking on the receives of the batch it just posted,
and raises a `ScheduleError` if two sides of a pair disagree on the order or if the ranks block each other. The
runtime's in-process transport (runtime/comm.py `LocalComm`) is the same model with tensors, so every in-process
pipeline test runs under NCCL's rules.
"""

from __future__ import annotations

import functools
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

from zb.schedules.actions import RECV_B, RECV_F, REDUCE, SEND_B, SEND_F, Action, Schedule, ScheduleError

SEND, RECV = "send", "recv"


@dataclass(frozen=True)
class Op:
    """One point-to-point operation of a rank: `kind` send or recv, with `peer`, of `message` (the SEND action that
    produces the value: both sides name a message the same way)."""

    kind: str
    peer: int
    message: Action

    def __str__(self) -> str:
        return f"{self.kind} {self.message} {'to' if self.kind == SEND else 'from'} rank {self.peer}"


@dataclass(frozen=True)
class Batch:
    """Operations issued together (one `batch_isend_irecv`) between two compute actions."""

    ops: tuple[Op, ...]

    def __str__(self) -> str:
        return "[" + ", ".join(map(str, self.ops)) + "]"




Item = Any  # Action | Batch | Wait


def message_of(action: Action) -> Action:
    """The SEND action whose value a SEND or RECV action moves."""
    if action.kind == RECV_F:
        return Action(action.stage - 1, SEND_F, action.microbatch)
    if action.kind == RECV_B:
        return Action(action.stage + 1, SEND_B, action.microbatch)
    return action


def receive_orders(lowered: Schedule) -> dict[tuple[int, int], list[Action]]:
    """(sender, receiver) -> the messages the receiver takes from the sender, in the order it takes them."""
    orders: dict[tuple[int, int], list[Action]] = defaultdict(list)
    for rank, actions in enumerate(lowered.actions):
        for a in actions:
            if a.kind in (RECV_F, RECV_B):
                message = message_of(a)
                orders[(lowered.placement[message.stage], rank)].append(message)
    return orders


def program(lowered: Schedule) -> tuple[tuple[Item, ...], ...]:
    """Each rank's items: its compute and REDUCE actions in order, with a `Batch` of the sends and receives between
    two of them (module docstring)."""
    orders = receive_orders(lowered)
    result = []
    for rank, actions in enumerate(lowered.actions):
        mine = {dst: order for (src, dst), order in orders.items() if src == rank}
        sent = {dst: 0 for dst in mine}
        produced: set[Action] = set()
        items: list[Item] = []
        slot: list[Op] = []
        for a in actions:
            if a.kind in (SEND_F, SEND_B):
                produced.add(a)
                for dst, order in sorted(mine.items()):
                    while sent[dst] < len(order) and order[sent[dst]] in produced:
                        slot.append(Op(SEND, dst, order[sent[dst]]))
                        sent[dst] += 1
            elif a.kind in (RECV_F, RECV_B):
                message = message_of(a)
                slot.append(Op(RECV, lowered.placement[message.stage], message))
            else:
                if slot:
                    items.append(Batch(tuple(slot)))
                    items.extend(Wait(op.message) for op in slot if op.kind == RECV)
                    slot = []
                items.append(a)
        if any(op.kind == RECV for op in slot):
            raise ScheduleError(f"rank {rank} receives {', '.join(str(o) for o in slot if o.kind == RECV)} after its "
                                "last compute action: nothing reads them")
        if slot:
            items.append(Batch(tuple(slot)))
        unsent = sorted(produced - {m for dst, order in mine.items() for m in order[:sent[dst]]})
        never = [m for dst, order in mine.items() for m in order[sent[dst]:] if m not in produced]
        if unsent or never:
            raise ScheduleError(f"rank {rank}: messages {', '.join(map(str, unsent))} are sent but never received"
                                if unsent else
                                f"rank {rank}: messages {', '.join(map(str, never))} are received but never sent")
        result.append(tuple(items))
    return tuple(result)


@dataclass
class _Pending:
    """A communication op an actor of the NCCL model has issued and not yet matched."""
    op: Op | None  # None: a collective
    number: int  # send/recv: its position among the actor's ops of the same kind and peer; reduce: the stage
    payload: Any = None
    done: bool = False


@dataclass
class NcclModel:
    """NCCL's point-to-point (and collective) semantics as a state machine over actors (replica, rank).

    `post(actor, ops)` issues one group; `progress()` completes what can complete and returns whether anything
    did. A send's payload is handed to the matching receive (`received`). Matching is by order only: a receive
    whose partner names another message raises (that is what NCCL would silently mis-deliver)."""

    fifo: dict[Any, deque] = field(default_factory=lambda: defaultdict(deque))
    counts: dict[tuple, int] = field(default_factory=lambda: defaultdict(int))
    posted: dict[tuple, _Pending] = field(default_factory=dict)  # (actor, kind, peer, number) -> op
    replicas: int = 1

    def post(self, actor: tuple[int, int], ops: list[Op], payloads: list[Any] | None = None) -> list[_Pending]:
        group = []
        for i, op in enumerate(ops):
            key = (actor, op.kind, op.peer)
            number = self.counts[key]
            self.counts[key] += 1
            pending = _Pending(op, number, payloads[i] if payloads else None)
            self.posted[(actor, op.kind, op.peer, number)] = pending
            group.append(pending)
        self.fifo[actor].append(group)
        return group

    def post_reduce(self, actor: tuple[int, int], stage: int) -> _Pending:
        pending = _Pending(None, stage)
        self.fifo[actor].append([pending])
        return pending

    def move_recv(self, actor: tuple[int, int], op: Op, group: list[_Pending]) -> None:
        """Put the receive `op` of `actor` into `group` (one it posted): taken from the later group it was posted
        in, or posted now (the verifier's repair)."""
        for later in self.fifo[actor]:
            for pending in later:
                if pending.op == op and not pending.done:
                    later.remove(pending)
                    group.append(pending)
                    return
        key = (actor, op.kind, op.peer)
        pending = _Pending(op, self.counts[key])
        self.counts[key] += 1
        self.posted[(actor, op.kind, op.peer, pending.number)] = pending
        group.append(pending)
        if group not in list(self.fifo[actor]):  # its group had completed and left the queue: it is back
            self.fifo[actor].appendleft(group)

    def active(self, actor: tuple[int, int], pending: _Pending) -> bool:
        queue = self.fifo.get(actor)
        return bool(queue) and any(p is pending for p in queue[0])

    def progress(self) -> bool:
        changed = False
        for actor, queue in list(self.fifo.items()):
            if not queue:
                continue
            for pending in queue[0]:
                if pending.done:
                    continue
                if pending.op is None:
                    changed |= self._reduce(actor, pending)
                elif pending.op.kind == SEND:
                    changed |= self._send(actor, pending)
        for queue in self.fifo.values():
            while queue and all(p.done for p in queue[0]):
                queue.popleft()
                changed = True
        return changed

    def _send(self, actor: tuple[int, int], send: _Pending) -> bool:
        replica, rank = actor
        peer = (replica, send.op.peer)
        recv = self.posted.get((peer, RECV, rank, send.number))
        if recv is None or not self.active(peer, recv):
            return False
        if recv.op.message != send.op.message:
            raise ScheduleError(
                f"rank {rank}'s send #{send.number} to rank {peer[1]} is {send.op.message}, but rank {peer[1]}'s "
                f"receive #{send.number} from rank {rank} expects {recv.op.message}: NCCL matches in issue order "
                "(tags are ignored) and would deliver the wrong tensor")
        recv.payload, send.done, recv.done = send.payload, True, True
        del self.posted[(peer, RECV, rank, send.number)]
        del self.posted[(actor, SEND, send.op.peer, send.number)]
        return True

    def _reduce(self, actor: tuple[int, int], pending: _Pending) -> bool:
        _, rank = actor
        group = [(r, rank) for r in range(self.replicas)]
        mates = []
        for other in group:
            queue = self.fifo.get(other)
            mate = next((p for p in queue[0] if p.op is None and not p.done), None) if queue else None
            if mate is None:
                return False
            if mate.number != pending.number:
                raise ScheduleError(f"replicas of rank {rank} reduce stages {pending.number} and {mate.number} "
                                    "at the same point: collectives would mismatch")
            mates.append(mate)
        for mate in mates:
            mate.done = True
        return True

    def blocked(self) -> list[str]:
        """What each actor with operations left waits on."""
        result = []
        for actor, queue in sorted(self.fifo.items()):
            if queue:
                waits = [str(p.op) if p.op else f"reduce of stage {p.number}" for p in queue[0] if not p.done]
                result.append(f"{_name(actor)} waits on {', '.join(waits)}")
        return result


def _name(actor: tuple[int, int]) -> str:
    replica, rank = actor
    return f"rank {rank}" if replica == 0 else f"replica {replica} rank {rank}"


@dataclass(frozen=True)
class Wait:
    """The host waits here for the receive of `message` (right before the action that reads it)."""

    message: Action

    def __str__(self) -> str:
        return f"wait {self.message}"


@functools.lru_cache(maxsize=64)
def communication(lowered: Schedule) -> tuple[tuple[Item, ...], ...]:
    """The verified program the runtime runs for `lowered` (with REDUCE actions: checked over two replicas, which
    stand for any number: every replica runs the same program)."""
    replicas = 2 if any(a.kind == REDUCE for actions in lowered.actions for a in actions) else 1
    return verify(lowered, replicas)


def verify(lowered: Schedule, replicas: int = 1) -> tuple[tuple[Item, ...], ...]:
    """`program(lowered)`, proven to run over NCCL (replicas x the pipeline, REDUCE a collective over each rank's
    replicas): every message meets its own receive and the ranks cannot block each other. Where just-in-time
    receives would block (both sides of a pair sending first, each send waiting for a receive its peer posts only
    after its own send), the blocking receive is posted earlier, with the batch its rank had issued at that point;
    its rank still waits for it right before the action that reads it. Raises `ScheduleError` if that does not
    help (it always does for the schedules zb generates: tests/test_p2p.py)."""
    items = [list(rank_items) for rank_items in program(lowered)]
    for _ in range(3):
        if _simulate(items, 1, lowered.name, repair=True):
            continue  # receives moved: check the repaired program from the start
        _simulate(items, replicas, lowered.name)
        _check_pair_orders(items)
        return tuple(tuple(r) for r in items)
    raise ScheduleError(f"{lowered.name}: no order of receives lets the ranks run under NCCL's rules")


def _simulate(items: list[list[Item]], replicas: int, name: str, repair: bool = False) -> int:
    """Run `items` on `NcclModel`, each rank's host waiting at a `Wait` for the whole batch that brought the value
    (NCCL completes a batch as one work); raises `ScheduleError` if the ranks block each other. With `repair`, a
    send stuck at the head of its rank's queue because its peer has not made the receive active moves that receive
    into the batch at the head of the peer's queue (or the batch it posted last), in `items` and in the running
    model, and the run goes on; returns the number of receives moved."""
    model = NcclModel(replicas=replicas)
    actors = [(d, r) for d in range(replicas) for r in range(len(items))]
    position = {a: 0 for a in actors}
    groups: dict[tuple[int, int], dict[Action, list[_Pending]]] = {a: {} for a in actors}  # message -> its batch
    origin: dict[int, int] = {}  # id(group) -> index of its batch in its rank's items
    last_batch: dict[tuple[int, int], list[_Pending] | None] = {a: None for a in actors}
    where = [{op.message: i for i, item in enumerate(rank_items) if isinstance(item, Batch) for op in item.ops
              if op.kind == RECV} for rank_items in items]
    moved = 0
    while True:
        progressed = False
        for actor in actors:
            rank_items = items[actor[1]]
            while position[actor] < len(rank_items):
                item = rank_items[position[actor]]
                if isinstance(item, Wait):
                    if not all(p.done for p in groups[actor][item.message]):
                        break  # the value the next action reads: the whole batch it came in
                elif isinstance(item, Batch):
                    group = model.post(actor, list(item.ops))
                    origin[id(group)] = position[actor]
                    for op in item.ops:
                        if op.kind == RECV:
                            groups[actor][op.message] = group
                    last_batch[actor] = group
                elif item.kind == REDUCE:
                    model.post_reduce(actor, item.stage)
                position[actor] += 1
                progressed = True
        progressed |= model.progress()
        if not progressed and repair:
            for rank, source, op, group in _repairs(model, actors, where, last_batch, origin):
                index = origin[id(group)]
                where[rank][op.message] = index
                source_ops = tuple(o for o in items[rank][source].ops if o != op)
                items[rank][source] = Batch(source_ops)
                items[rank][index] = Batch(items[rank][index].ops + (op,))
                model.move_recv((0, rank), op, group)
                groups[(0, rank)][op.message] = group
                moved += 1
                progressed = True
        if not progressed:
            break
    if all(position[a] == len(items[a[1]]) for a in actors) and not model.blocked():
        for rank_items in items:  # batches whose receives all moved earlier
            rank_items[:] = [i for i in rank_items if not (isinstance(i, Batch) and not i.ops)]
        return moved
    stuck = [f"{_name(a)} at item {position[a]} of {len(items[a[1]])}" for a in actors
             if position[a] < len(items[a[1]])]
    raise ScheduleError(f"{name}: under NCCL's point-to-point rules the ranks block each other: "
                        f"{'; '.join(stuck + model.blocked())}")


def _repairs(model: NcclModel, actors, where: dict, last_batch: dict, origin: dict):
    """(rank, index of the batch holding the receive, the receive, the posted group to move it to) for each send
    stuck at the head of its rank's queue whose receive is not active on the peer (one per receiving rank).
    `where[rank][message]`: the index of the batch that receives it."""
    found = {}
    for actor in actors:
        queue = model.fifo.get(actor)
        for pending in (queue[0] if queue else []):
            if pending.done or pending.op is None or pending.op.kind != SEND:
                continue
            peer = (actor[0], pending.op.peer)
            recv = model.posted.get((peer, RECV, actor[1], pending.number))
            if peer[1] in found or (recv is not None and model.active(peer, recv)):
                continue
            head = model.fifo.get(peer)
            group = head[0] if head else last_batch[peer]
            index = where[peer[1]].get(pending.op.message)
            if group is None or index is None or index == origin[id(group)]:
                continue
            found[peer[1]] = (peer[1], index, Op(RECV, actor[1], pending.op.message), group)
    return list(found.values())


def _check_pair_orders(items: tuple[tuple[Item, ...], ...]) -> None:
    """For every pair, the messages one side sends and the other receives come in the same order."""
    sends: dict[tuple[int, int], list[Action]] = defaultdict(list)
    recvs: dict[tuple[int, int], list[Action]] = defaultdict(list)
    for rank, rank_items in enumerate(items):
        for item in rank_items:
            if isinstance(item, Batch):
                for op in item.ops:
                    if op.kind == SEND:
                        sends[(rank, op.peer)].append(op.message)
                    else:
                        recvs[(op.peer, rank)].append(op.message)
    for pair in sorted(set(sends) | set(recvs)):
        if sends.get(pair, []) != recvs.get(pair, []):
            src, dst = pair
            raise ScheduleError(f"rank {src} sends {', '.join(map(str, sends.get(pair, [])))} to rank {dst}, which "
                                f"receives {', '.join(map(str, recvs.get(pair, [])))} from it: the orders differ")
