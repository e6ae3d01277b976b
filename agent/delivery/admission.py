"""Admission: what the outbox stores, and how much of it a commit takes under its bounds.

An output on a topic no broker takes (a step's mistake) is never stored: it is
counted as malformed on its pipeline (`publishable`).
Bounds (`max_messages`, `max_bytes`, free disk over `min_free_bytes`) apply
`on_full` a whole input at a time: `reject_new` takes the first inputs that fit,
each with all its outputs, and holds the rest (their acks wait, so the local
broker keeps them); `drop_oldest` takes everything and evicts the oldest rows of
the lowest lanes, the batch's own included. A commit's batch is also bounded in
bytes on disk (`fit`): its WAL frames must fit in the disk reserve.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterable

from agent.config import OutboxConfig
from agent.delivery.store import ROW_OVERHEAD
from agent.messages import Done, Outgoing
from agent.mqtt import topics
from agent.telemetry import Counters, Telemetry

CHECKED_TOPICS = 10_000  # topics known to be valid names; cleared when full (stays bounded)
_TOPIC, _PAYLOAD = operator.itemgetter(0), operator.itemgetter(1)  # Outgoing fields


class Admission:
    """The outbox's topic check, bounds and `on_full` policy; every refusal is counted."""

    def __init__(self, cfg: OutboxConfig, counters: Counters, telemetry: Telemetry) -> None:
        self.cfg = cfg
        self.counters = counters
        self.telemetry = telemetry
        self.valid_topics: set[str] = set()

    def publishable(self, items: list[Outgoing]) -> list[Outgoing]:
        """`items` without those on a topic no broker takes; each dropped one is counted.

        Forward checks its own topics; this catches every other producer (publish
        templates, user actions) before a row that could never leave is stored.
        """
        known = self.valid_topics
        kept = []
        for o in items:
            if o.topic not in known:
                try:
                    topics.validate_name(o.topic)
                except ValueError as exc:
                    self.telemetry.pipeline(o.pipeline).inc("malformed")
                    self.telemetry.warn_burst(
                        f"outbox:topic:{o.pipeline}", "pipeline %s: dropped a message with "
                        "no valid topic to publish on: %s", o.pipeline, exc)
                    continue
                if len(known) >= CHECKED_TOPICS:
                    known.clear()
                known.add(o.topic)
            kept.append(o)
        return kept

    def admit(self, inserts: list[Outgoing], count: int, nbytes: int, low_disk: bool,
              dones: Iterable[tuple[int, Done | None]], base: int) -> tuple[int, int]:
        """How many of `inserts` to take now, and how many rows to evict after inserting
        them (drop_oldest: the oldest of the lowest lanes, the batch's own included, so
        the bounds hold however large the batch).

        `count` and `nbytes` are the outbox's rows; `dones` the absolute ends of the
        pending inputs, `base` the absolute index of `inserts[0]`.
        """
        if not inserts:
            return 0, 0
        n = len(inserts)
        size = sum(len(o.payload) + len(o.topic) for o in inserts)
        over_count = count + n - self.cfg.max_messages
        over_bytes = nbytes + size - self.cfg.max_bytes
        if over_count <= 0 and over_bytes <= 0 and not low_disk:
            return n, 0
        if self.cfg.on_full == "reject_new":
            take = 0 if low_disk else self._whole_inputs(inserts, count, nbytes, dones, base)
            if take < n:
                self.counters.inc("rejected_full")
                self.telemetry.warn_burst(
                    "outbox:reject", "outbox full (%d messages, %d bytes%s): not "
                    "acknowledging new input until it drains", count + take,
                    nbytes, ", disk low" if low_disk else "")
            return take, 0
        avg = max(1, (nbytes + size) // (count + n))
        evict = max(over_count, -(-over_bytes // avg) if over_bytes > 0 else 0, 0)
        if low_disk:  # the disk is short: new rows take the place of old ones
            evict = max(evict, min(n, count))
        return n, min(evict, count + n)

    def _whole_inputs(self, inserts: list[Outgoing], count: int, nbytes: int,
                      dones: Iterable[tuple[int, Done | None]], base: int) -> int:
        """How many of `inserts` (a prefix of the pending rows) fit the bounds, ending
        with an input: the first inputs in order, each with all its outputs. An empty
        outbox takes its first input whatever its size, rather than stall."""
        rows_left = self.cfg.max_messages - count
        bytes_left = self.cfg.max_bytes - nbytes
        fit = 0
        for o in itertools.islice(inserts, max(0, rows_left)):
            bytes_left -= len(o.payload) + len(o.topic)
            if bytes_left < 0:
                break
            fit += 1
        cut = 0
        for end, _ in dones:
            if end - base > fit:
                if count == 0 and not cut:
                    cut = min(end - base, len(inserts))
                break
            cut = end - base
        return cut


def fit(pending: list[Outgoing], limit: int, budget: int, least: int) -> int:
    """How many of the first `limit` rows fit in `budget` bytes on disk (at least `least`)."""
    head = pending[:limit]
    # The usual case, all of them, summed in C (the relay's hot path); else row by row.
    if sum(map(len, map(_PAYLOAD, head))) + sum(map(len, map(_TOPIC, head))) \
            + ROW_OVERHEAD * len(head) <= budget:
        return len(head)
    n = 0
    for o in itertools.islice(pending, limit):
        budget -= len(o.payload) + len(o.topic) + ROW_OVERHEAD
        if budget < 0:
            break
        n += 1
    return max(n, min(least, len(pending)))
