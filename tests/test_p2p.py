"""Point-to-point under NCCL's rules (schedules/p2p.py): the verifier over every schedule zb can produce, the model
of NCCL it runs on, and what the model catches that gloo never shows."""

from __future__ import annotations

import random

import pytest

from zb.schedules import SCHEDULES, Action, Costs, Schedule, ScheduleError, default_chunks, generate, lower
from zb.schedules.p2p import RECV, SEND, Batch, NcclModel, Op, Wait, _simulate, communication, program, verify


def _matrix():
    for name in SCHEDULES:
        for ranks in range(1, 7):
            for microbatches in (*range(1, 13), 16, 24):
                placements = [None] if name != "zb-auto" else [None, "v", "interleaved"]
                for placement in placements:
                    chunks = default_chunks(name) if placement is None else 2
                    try:
                        schedule = generate(name, ranks * chunks, microbatches, chunks=chunks, placement=placement)
                    except ScheduleError:
                        continue  # a combination the generator refuses (interleaved-1f1b with m % p != 0, ...)
                    yield schedule


def test_every_schedule_placement_and_layout_is_verified_under_nccl_rules():
    """Every generator, 1-6 ranks, 1-12, 16 and 24 microbatches, one stage per rank, V and interleaved placements,
    with and without data parallelism (2 and 3 replicas): both sides of every pair issue the same messages in the
    same order and no rank waits forever."""
    checked = set()
    for schedule in _matrix():
        for reduce, replicas in ((False, 1), (True, 2), (True, 3)):
            items = verify(lower(schedule, reduce=reduce), replicas)
            assert len(items) == schedule.num_ranks
            checked.add((schedule.name, schedule.num_ranks, len(set(schedule.placement)) != schedule.num_stages))
    assert {name for name, _, _ in checked} == set(SCHEDULES)
    assert any(two for _, _, two in checked) and any(not two for _, _, two in checked)


def test_zb_auto_with_random_costs_is_verified():
    rng = random.Random(0)
    for _ in range(40):
        ranks, microbatches = rng.randint(2, 5), rng.randint(1, 10)
        placement = rng.choice([None, "v", "interleaved"])
        stages = ranks * (1 if placement is None else 2)
        costs = Costs(*(tuple(rng.uniform(low, 2) for _ in range(stages)) for low in (0.5, 0.5, 0.2)))
        schedule = generate("zb-auto", stages, microbatches, costs=costs, chunks=stages // ranks,
                            memory_limit=rng.choice(["1p", "2p", None]), placement=placement)
        verify(lower(schedule, reduce=rng.random() < 0.5), 2)


def test_the_program_sends_in_the_receivers_order_and_waits_right_before_the_reader():
    lowered = lower(generate("1f1b", 2, 4))
    items = communication(lowered)
    rank1 = items[1]
    # The last stage waits for an activation right before the forward that reads it.
    for i, item in enumerate(rank1):
        if isinstance(item, Action) and item.kind == "F":
            assert rank1[i - 1] == Wait(Action(0, "SEND_F", item.microbatch))
    # Every send from rank 0 is received by rank 1 in the same order.
    sent = [op.message for item in items[0] if isinstance(item, Batch) for op in item.ops if op.kind == SEND]
    received = [op.message for item in rank1 if isinstance(item, Batch) for op in item.ops if op.kind == RECV]
    assert sent == received == [Action(0, "SEND_F", mb) for mb in range(4)]


def test_receiving_every_message_at_the_start_of_the_step_deadlocks_on_nccl():
    """What the runtime did before: post every receive of the step first. On NCCL the last rank's first gradient
    send waits behind those receives, whose sends need that gradient: the model says so (gloo never did)."""
    lowered = lower(generate("1f1b", 2, 4))
    jit = program(lowered)
    early = []
    for rank_items in jit:
        recvs = [op for item in rank_items if isinstance(item, Batch) for op in item.ops if op.kind == RECV]
        rest = []
        for item in rank_items:
            if isinstance(item, Batch):
                sends = tuple(op for op in item.ops if op.kind == SEND)
                if sends:
                    rest.append(Batch(sends))
            else:
                rest.append(item)
        early.append(([Batch(tuple(recvs))] if recvs else []) + rest)
    assert _deadlocks(early)
    assert not _deadlocks([list(r) for r in communication(lowered)])


def _deadlocks(items) -> bool:
    """Whether `items`, run as they are, cannot finish under the model."""
    try:
        _simulate([list(r) for r in items], 1, "test")
    except ScheduleError:
        return True
    return False


def test_just_in_time_receives_need_the_repair_on_zb_h2():
    """ZB-H2 on 2 ranks: at one point both ranks send before receiving; on NCCL each send waits for a receive its
    peer posts only later. The verifier posts that receive earlier (its wait stays before its reader)."""
    lowered = lower(generate("zb-h2", 2, 4))
    assert _deadlocks([list(r) for r in program(lowered)])  # plain just-in-time receives would hang
    assert not _deadlocks([list(r) for r in verify(lowered)])


def test_the_model_matches_by_order_not_by_name():
    """Tags are ignored: a receive meets the k-th send of its peer, and a different message there is an error."""
    model = NcclModel()
    model.post((0, 0), [Op(SEND, 1, Action(0, "SEND_F", 1))], [["mb1"]])
    model.post((0, 1), [Op(RECV, 0, Action(0, "SEND_F", 0))], [None])
    with pytest.raises(ScheduleError, match="would deliver the wrong tensor"):
        model.progress()


def test_a_posted_receive_holds_back_what_its_rank_issues_after_it():
    model = NcclModel()
    (recv,) = model.post((0, 0), [Op(RECV, 1, Action(1, "SEND_B", 0))], [None])
    (send,) = model.post((0, 0), [Op(SEND, 1, Action(0, "SEND_F", 0))], [["x"]])
    (peer_recv,) = model.post((0, 1), [Op(RECV, 0, Action(0, "SEND_F", 0))], [None])
    model.progress()
    assert not send.done and not peer_recv.done  # behind rank 0's receive, which nobody serves
    model.post((0, 1), [Op(SEND, 0, Action(1, "SEND_B", 0))], [["g"]])
    model.progress()  # rank 1's send sits behind its own receive, which waits for rank 0's send: blocked
    assert not recv.done and model.blocked()


def test_a_batch_progresses_as_one_group():
    """The same exchange issued as one batch on each side (batch_isend_irecv) completes."""
    model = NcclModel()
    a = model.post((0, 0), [Op(SEND, 1, Action(0, "SEND_F", 1)), Op(RECV, 1, Action(1, "SEND_B", 0))], [["x"], None])
    b = model.post((0, 1), [Op(SEND, 0, Action(1, "SEND_B", 0)), Op(RECV, 0, Action(0, "SEND_F", 1))], [["g"], None])
    model.progress()
    assert all(p.done for p in a + b) and a[1].payload == ["g"] and b[1].payload == ["x"]
    assert not model.blocked()


def test_sends_follow_the_receivers_order():
    """A hand-written lowered schedule whose last rank takes activations in another order than they are produced:
    the sender holds the early one back, so both sides issue the same order (no tag needed)."""
    text = ("rank 0: 0F0 0SEND_F0 0F1 0SEND_F1 0RECV_B1 0BW1 0RECV_B0 0BW0\n"
            "rank 1: 1RECV_F1 1F1 1BW1 1SEND_B1 1RECV_F0 1F0 1BW0 1SEND_B0")
    lowered = Schedule.from_text(text, (0, 1), 2)
    items = verify(lowered)  # sends follow the receiver's order: 0F1's activation goes out first
    sends = [op.message for item in items[0] if isinstance(item, Batch) for op in item.ops if op.kind == SEND]
    assert sends == [Action(0, "SEND_F", 1), Action(0, "SEND_F", 0)]


def test_the_pair_order_check_catches_programs_that_disagree():
    """`verify`'s last check, on a program where the sender's order was changed by hand."""
    from zb.schedules.p2p import _check_pair_orders

    items = [list(r) for r in communication(lower(generate("1f1b", 2, 2)))]
    batches = [i for i, item in enumerate(items[0]) if isinstance(item, Batch)
               and any(op.kind == SEND for op in item.ops)]
    first, second = batches[0], batches[1]
    items[0][first], items[0][second] = items[0][second], items[0][first]
    with pytest.raises(ScheduleError, match="the orders differ"):
        _check_pair_orders(items)
