"""Settlement: rows on their way out of the outbox, between the next hop and the disk.

A delivered row's delete, and a refused row's dead letter, ride with the next
commit, or go after `SETTLE_S` when no input comes; until then a crash resends
them (duplicates under the same key, never a loss). drop_oldest may evict rows
the sender still holds: each lane remembers the highest id it evicted, so those
rows are counted out once (`gone`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from agent.delivery.store import Row

SETTLE_S = 1.0  # deliveries (deletes) wait for the next commit this long at most


class Settlement:
    """Deletes and dead letters waiting for a commit, and drop_oldest's high-water marks."""

    def __init__(self, hurry: Callable[[], None]) -> None:
        self.deletes: list[tuple[int, int]] = []  # (lane, id)
        self.dead: list[tuple[Row, str]] = []  # (row, reason)
        self.committing = 0  # deletes and dead letters in the commit under way
        self.evicted_to: dict[int, int] = {}  # lane -> highest id drop_oldest removed
        self._hurry = hurry  # starts a commit now (`Outbox.settle_soon`)
        self._timer: asyncio.TimerHandle | None = None  # commits waiting deletes

    @property
    def pending(self) -> int:
        """Deletes and dead letters not committed yet: a crash now would send them again."""
        return len(self.deletes) + len(self.dead) + self.committing

    def gone(self, row: Row) -> bool:
        """Already counted out: drop_oldest evicted it while it was in the sender's hands."""
        return row.id <= self.evicted_to.get(row.lane, 0)

    def evicted(self, lane: int, upto: int) -> None:
        self.evicted_to[lane] = max(upto, self.evicted_to.get(lane, 0))

    def unevicted(self, lane: int, rows: list[Row]) -> list[Row]:
        """`rows` of `lane` read from disk, without those drop_oldest counted out."""
        upto = self.evicted_to.get(lane, 0)
        return [r for r in rows if r.id > upto] if rows and rows[0].id <= upto else rows

    def delete(self, row: Row, timed: bool) -> None:
        """Queue the delete of `row`; `timed`: it goes after SETTLE_S at the latest."""
        self.deletes.append((row.lane, row.id))
        if timed and self._timer is None:  # whatever the commit interval
            self._timer = asyncio.get_running_loop().call_later(SETTLE_S, self._hurry)

    def take_deletes(self) -> list[tuple[int, int]]:
        out, self.deletes = self.deletes, []
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return out

    def take_dead(self) -> list[tuple[Row, str]]:
        out, self.dead = self.dead, []
        return out

    def take_chunk(self, n: int) -> tuple[list[tuple[int, int]], list[tuple[Row, str]]]:
        """At most `n` deletes and `n` dead letters, from the front (the disk is full)."""
        chunk, self.deletes = self.deletes[:n], self.deletes[n:]
        dead, self.dead = self.dead[:n], self.dead[n:]
        return chunk, dead

    def put_back(self, deletes: list[tuple[int, int]], dead: list[tuple[Row, str]]) -> None:
        """A commit failed: its deletes and dead letters go first in the next."""
        self.deletes = deletes + self.deletes
        self.dead = dead + self.dead
