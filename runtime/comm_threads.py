"""Threads that wait on zb's behalf for what nothing interrupts (a gloo work, a store call), and their orderly
end at interpreter exit. runtime/comm.py waits for them with its timeout and failure key; this module keeps them
from aborting the process when it shuts down.
"""

from __future__ import annotations

import atexit
import datetime
import threading
import time
from collections.abc import Sequence

import torch

from zb.core import torch_internals


def aside(work, seconds: float) -> threading.Thread:
    """Run `work` on a daemon thread and wait for it at most `seconds` (a store call can block for its own,
    much longer, timeout)."""
    thread = _start(work, "zb-store")
    thread.join(seconds)
    return thread


# Threads blocked in a C++ call (a gloo wait, a store call) must not return into Python while the interpreter
# shuts down: a daemon thread that takes the GIL back then is ended by pthread_exit, whose unwinding through
# pybind11's GIL guard (a noexcept destructor) aborts the process ("terminate called without an active
# exception"). So at exit, before the shutdown, every zb thread still running is made to return and joined (for
# at most SETTLE seconds): a waiter stuck on an abandoned step's operation gets its group's connections closed
# first (below). A store call in flight cannot be interrupted; store calls take milliseconds.
#
# gloo runs a collective on a worker thread of its own (C++), which drops its references to the work's tensors
# after the work has completed, possibly after the Python side dropped its own: the tensor's Python object then
# belongs to C++, and the worker takes the GIL to free it. If that happens while the interpreter shuts down, the
# worker is ended in pthread_exit through a noexcept frame and the process aborts with the same message (seen
# after a normal run: a core showed gloo's runLoop freeing an AsyncAllgatherWork's tensors from inside
# Py_FinalizeEx). So the tensors zb hands to gloo collectives are kept (`_HANDED`) until nothing but their Python
# object holds them (`_use_count() == 1`), and at exit `_settle` releases the GIL until that is so, for at most
# GLOO_QUIET seconds (a view of a handed tensor also counts, so the wait is bounded), then GLOO_YIELD seconds more
# for gloo's threads to finish collectives zb did not issue (a script's own last barrier: what the core showed);
# that last part lowers the odds, it cannot prove the thread done.
_THREADS: set[threading.Thread] = set()
_WAITERS: set[Waiter] = set()
_HANDED: dict[int, torch.Tensor] = {}
_GLOO: list[int] = []  # [the size of _HANDED after its last pruning], once a gloo group is used
GLOO_QUIET = 0.2
GLOO_YIELD = 0.05
SETTLE = 5.0  # seconds the exit waits, at most, for zb's threads to return (a store call is not interrupted)
ABANDON_TAG = 0x7A62  # the receive that closes a stuck gloo group at exit; no message of zb's uses it
_SETTLING: list = []


def _settle_at_exit() -> None:
    if not _SETTLING:
        _SETTLING.append(atexit.register(_settle))  # once; after torch's own handlers, so it runs before them


def _start(target, name: str) -> threading.Thread:
    _settle_at_exit()

    def run():
        try:
            target()
        finally:
            _THREADS.discard(threading.current_thread())

    thread = threading.Thread(target=run, daemon=True, name=name)
    thread.start()
    _THREADS.add(thread)  # (a thread done already is joined at once)
    return thread


def _settle() -> None:
    """At exit: close the connections stuck waiters wait on, then join every zb thread, then let gloo's worker
    threads let go of the tensors zb handed them (all bounded by SETTLE)."""
    closed: set = set()
    for waiter in list(_WAITERS):
        if not waiter.done.is_set():
            waiter.abandon(closed)
    deadline = time.monotonic() + SETTLE
    for thread in list(_THREADS):
        if thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))
    if _GLOO:
        quiet = time.monotonic() + GLOO_QUIET
        while _held() and time.monotonic() < quiet:
            time.sleep(0.002)  # (the GIL released: a gloo thread freeing a work can take it)
        time.sleep(GLOO_YIELD)


def hand(*tensors: torch.Tensor) -> None:
    """Keep `tensors` (given to a gloo collective) alive until gloo's worker thread has dropped them."""
    _settle_at_exit()
    if not _GLOO:
        _GLOO.append(0)
    if len(_HANDED) > max(64, 2 * _GLOO[0]):
        _held()
        _GLOO[0] = len(_HANDED)
    _HANDED.update((id(t), t) for t in tensors)


def _held() -> bool:
    """Drop the handed tensors held by nothing else any more; whether any is left."""
    for key in [k for k, t in _HANDED.items() if torch_internals.use_count(t) == 1]:
        del _HANDED[key]
    return bool(_HANDED)


class Waiter:
    """gloo: a point-to-point work completes only inside its own `wait`, which nothing interrupts. A daemon thread
    waits for `works` (abandoned, not joined, if this rank gives up) and sets `done`; an error lands in `failed`.
    `comm` (a DistributedComm) and `peers` (group ranks) say which connections the works use, for `abandon`."""

    def __init__(self, works: list, comm, peers: Sequence[int]):
        self.done, self.failed = threading.Event(), []
        self.comm, self.peers = comm, list(peers)

        def wait():
            try:
                for work in works:
                    # No deadline of zb's here: a batch is posted before its values are due (a send may wait for a
                    # receive its peer posts much later); DistributedComm._await counts zb's timeout from
                    # when it starts waiting. (The group's own timeout still bounds this thread.)
                    work.wait()
            except BaseException as e:  # noqa: BLE001  (handed to the waiting thread)
                self.failed.append(e)
            finally:
                self.done.set()
                _WAITERS.discard(self)

        _WAITERS.add(self)
        _start(wait, "zb-wait")

    def abandon(self, closed: set) -> None:
        """Make the wait return now (at exit, for an operation of an abandoned step): a receive that times out at
        once makes gloo close every connection of the group, and every operation waiting on one fails. It uses a
        tag of its own (gloo matches by tag; zb's messages all use tag 0), so no message still in flight from the
        abandoned step can meet it."""
        group = self.comm.process_group
        if id(group) in closed or not self.peers:
            return
        closed.add(id(group))
        try:
            group.recv([torch.empty(1)], self.peers[0], ABANDON_TAG).wait(datetime.timedelta(milliseconds=1))
        except Exception:  # noqa: BLE001  (the timeout that closes it, or it was closed already)
            pass
