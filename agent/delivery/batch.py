"""The batch: what gathers in memory for the outbox's next commit.

Rows in the order they were submitted, and per input the absolute index where
its outputs end and its ack: an input is acknowledged once all its rows have
committed, so a commit that ends inside an input holds its ack for the next. Step
state (`save_state`) rides with the first commit after it was saved. A failed
commit puts everything back in front: nothing was acknowledged yet.
"""

from __future__ import annotations

from collections import deque

from agent.messages import Done, Outgoing

_Ends = list[tuple[int, Done | None]]


class Batch:
    """Rows and acks waiting for a commit (loop thread only)."""

    def __init__(self, full_sync: bool) -> None:
        self.rows: list[Outgoing] = []
        # Per input, in order: (the absolute index where its outputs end in `rows`, its
        # ack or None). A batch may end inside an input; its ack waits for the rest.
        self.dones: deque[tuple[int, Done | None]] = deque()
        self.base = 0  # the absolute index of rows[0] (dones hold absolute ends)
        self.states: dict[str, bytes] = {}
        self.durable = False  # a row waiting asks for synchronous=FULL
        self._full_sync = full_sync  # every commit with rows is FULL (`bulk_synchronous`)

    def add(self, items: list[Outgoing], done: Done | None) -> None:
        """An input's outputs (possibly none) and its ack."""
        if items:
            self.rows.extend(items)
            if not self.durable and (self._full_sync or any(o.priority > 0 for o in items)):
                self.durable = True
        self.dones.append((self.base + len(self.rows), done))

    def take(self, n: int) -> tuple[list[Outgoing], _Ends, bool]:
        """The first `n` rows, the acks of the inputs they complete, and whether their
        commit must be FULL."""
        inserts = self.rows[:n]
        del self.rows[:n]
        self.base += n
        dones = self.dones
        taken = []
        # Absolute ends: nothing is rebased, so a long queue of held inputs costs nothing.
        while dones and dones[0][0] <= self.base:
            taken.append(dones.popleft())
        durable = self.durable and bool(inserts)
        if inserts and not self.rows:
            self.durable = False  # held rows keep their claim to FULL
        return inserts, taken, durable

    def take_states(self) -> dict[str, bytes]:
        states, self.states = self.states, {}
        return states

    def put_back(self, inserts: list[Outgoing], dones: _Ends,
                 states: dict[str, bytes] | None) -> None:
        """A commit failed: its rows, acks and state go first in the next."""
        self.rows = inserts + self.rows
        self.base -= len(inserts)
        self.dones.extendleft(reversed(dones))
        self.states = {**(states or {}), **self.states}  # newer state wins

    def pending_inputs(self) -> int:
        """Inputs whose outputs are not committed yet (not acknowledged to the local broker)."""
        return sum(d is not None for _, d in self.dones)
