"""The uplink sender: outbox rows to the next hop, in order per lane, within a window.

A row leaves the outbox only when the next hop answered its PUBLISH with a
success reason code. Rows delivered but not yet deleted (the outbox commits
their deletes with its next commit) still count against the in-flight window:
after a crash, at most one window goes again. A failure code, a row larger
than the broker's maximum packet size, a topic no broker takes (too long, a
wildcard, NUL: e.g. stored by an older agent) or any error building its
PUBLISH sends that row to the dead-letter table, with the reason, instead of
blocking the lane or stopping the agent. After a reconnect the unacknowledged
rows go again, in order.

A broker that closes the connection on a row tells nothing else: MQTT 3.1.1
exchanges no packet limit, so a row above the broker's (Mosquitto's
`max_packet_size`, NATS's `max_payload`) gets the connection closed, again
at every reconnect. After `ISOLATE_AFTER` closes in a row with rows in
flight and no PUBACK for a row written after the oldest of them, rows go one
at a time until that row is settled; a row the broker closed on twice in a
row while it was alone in flight, soon after it was written and before the
keepalive could explain the close, is dead-lettered with that reason. A
network cut with many rows in flight, or a silent link the keepalive gives
up on, dead-letters nothing.

The backlog streams from disk a page at a time; only a bounded window of
rows is ever in memory, however long the outage was. Rows in memory are sent
from the callbacks that free them (a commit, a PUBACK), without a task switch;
the sender's task wakes only to read the next page from disk.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from agent.delivery.outbox import Outbox
from agent.delivery.store import Row
from agent.errors import ConnectError
from agent.mqtt import topics
from agent.mqtt.connection import Connection

log = logging.getLogger(__name__)

PAGE_ROWS = 1000
MAX_WINDOW = 4096
MEMORY_ROWS = 4000  # per lane; beyond it the lane streams from disk
KEY_PROPERTY = "fogwhisk-id"
PACKET_OVERHEAD = 64  # fixed header, topic length, packet id and our properties, roughly
CHECKED_TOPICS = 10_000  # topics known to be valid names; cleared when full (stays bounded)
ISOLATE_AFTER = 2  # closes in a row without a PUBACK past the oldest row in flight
DEAD_AFTER = 2  # closes in a row on one row alone in flight: it is the cause ("twice")
CLOSE_SOON_S = 3.0  # a close within this (and the keepalive) of the lone row's write blames it


@dataclass(slots=True)
class Lane:
    priority: int
    queue: deque[Row] = field(default_factory=deque)
    loaded_to: int = 0  # highest id ever placed in `queue` (or sent)
    on_disk: bool = False  # rows may exist on disk beyond `loaded_to`
    unacked: dict[int, Row] = field(default_factory=dict)  # id -> row, in send order
    loading: bool = False


class Sender:
    """Drains the outbox into one `Connection`."""

    def __init__(self, outbox: Outbox, conn: Connection, inflight: int = 0) -> None:
        self.outbox = outbox
        self.conn = conn
        self.inflight_cfg = inflight
        self.lanes: dict[int, Lane] = {}
        self.max_committed: dict[int, int] = {}
        self._wake = asyncio.Event()
        self._inflight = 0
        self._valid_topics: set[str] = set()
        self._paused = False
        # Finding a row the broker closes the connection on (see the module docstring).
        self._seq = 0  # write order, across connections
        self._sent: dict[int, int] = {}  # in flight: row id -> write order
        self._written = 0.0  # when the last row was written (monotonic)
        self._acked_seq = 0  # the latest-written row acknowledged on this connection
        self._suspect: Row | None = None  # the oldest row in flight at fruitless closes
        self._fruitless = 0  # closes in a row without a PUBACK past the oldest row in flight
        self._alone = 0  # closes in a row on `_suspect` alone, soon after its write
        self._condemned: tuple[Row, str] | None = None  # dead-lettered at the reconnect
        outbox.on_rows = self._committed
        outbox.on_evicted = self._evicted
        outbox.on_settled = self._pump
        outbox.quiet.append(self)
        for priority in outbox.lanes_on_disk:
            self._lane(priority).on_disk = True  # a backlog from before: stream it

    @property
    def window(self) -> int:
        # A broker that names no receive maximum allows 65,535 in flight; past a few
        # thousand a bigger window buys nothing but a longer resend after a fault.
        if self._fruitless >= ISOLATE_AFTER:
            return 1  # finding the row the broker closes the connection on
        return self._normal_window()

    def _normal_window(self) -> int:
        return self.inflight_cfg or min(self.conn.server_receive_maximum, MAX_WINDOW)

    def _lane(self, priority: int) -> Lane:
        lane = self.lanes.get(priority)
        if lane is None:
            lane = self.lanes[priority] = Lane(priority)
            # Highest priority first when choosing what to send.
            self.lanes = dict(sorted(self.lanes.items(), reverse=True))
        return lane

    def _committed(self, rows: list[Row]) -> None:
        """Fresh rows from the committer: keep them in memory while the lane is caught up."""
        for r in rows:
            lane = self._lane(r.lane)
            self.max_committed[r.lane] = r.id
            if not lane.on_disk and len(lane.queue) < MEMORY_ROWS:
                lane.queue.append(r)
                lane.loaded_to = r.id
            else:
                lane.on_disk = True  # the lane streams from disk until it catches up
        self._pump()

    def _evicted(self, priority: int, upto: int) -> None:
        """drop_oldest removed this lane's rows up to `upto`: forget those not yet sent.

        Rows already in flight stay in flight (the broker counts them against
        its receive maximum); the outbox ignores their acknowledgements.
        """
        lane = self.lanes.get(priority)
        if lane is None:
            return
        q = lane.queue
        while q and q[0].id <= upto:
            q.popleft()
        lane.loaded_to = max(lane.loaded_to, upto)

    def pause_reading(self) -> None:
        """The outbox's quiet spell (sparse input): PUBACKs may wait in the socket until
        the next commit, unless rows wait for the window they free, or for the disk."""
        if self._inflight * 2 <= self.window and not any(
                lane.queue or lane.on_disk for lane in self.lanes.values()):
            self.conn.pause_reading()
            self._paused = True

    def resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            self.conn.resume_reading()

    def connection_lost(self) -> None:
        """Everything sent but unacknowledged goes again, in order, after the reconnect
        (but a row the broker closed the connection on twice while alone in flight)."""
        self._judge_close()
        self._sent.clear()
        self._acked_seq = 0
        for lane in self.lanes.values():
            if lane.unacked:
                again = [r for r in lane.unacked.values() if not self.outbox.gone(r)]
                lane.queue.extendleft(reversed(again))
                lane.unacked.clear()
        self._inflight = 0

    def connected(self) -> None:
        condemned, self._condemned = self._condemned, None
        if condemned is not None:
            # At the reconnect, not at the close: a close that is our own stop is no
            # evidence, and leaves the row for the next start to judge.
            row, why = condemned
            lane = self.lanes.get(row.lane)
            if lane is not None and lane.queue and lane.queue[0].id == row.id:
                lane.queue.popleft()
                self.outbox.counters.inc("dead_closed_alone")
                self.outbox.to_dead(row, why)  # logged there, at warning
        self._wake.set()

    def _judge_close(self) -> None:
        """The connection closed: was it on the oldest row in flight? See the docstring."""
        if not self._sent:
            return  # nothing in flight: the close says nothing about any row
        head_id, head_seq = min(self._sent.items(), key=lambda kv: kv[1])
        lane = next((ln for ln in self.lanes.values() if head_id in ln.unacked), None)
        if lane is None or self._acked_seq > head_seq or self.outbox.gone(lane.unacked[head_id]):
            self._clear("passed by the broker")  # a flaky network, or the row is gone anyway
            return
        head = lane.unacked[head_id]
        self._fruitless += 1
        if self._suspect is None or self._suspect.id != head.id:
            self._suspect, self._alone = head, 0
        now = time.monotonic()
        keepalive = float(self.conn.cfg.keepalive_s)
        # Our keepalive gives up only after 1.25 keepalives without a packet: a close
        # within one of the last packet, and soon after the write, came from the far end.
        # Alone in flight and not passed: the row is the last one written.
        soon = (now - self._written <= min(CLOSE_SOON_S, keepalive)
                and now - self.conn.last_in < keepalive)
        self._alone = self._alone + 1 if len(self._sent) == 1 and soon else 0
        if self._alone >= DEAD_AFTER:
            hint = "" if self.conn.v5 else \
                "; MQTT 3.1.1 exchanges no packet limit: the broker's is likely below it"
            self._condemned = (head, f"the broker closed the connection twice on this row "
                                     f"alone ({len(head.payload)} bytes{hint})")
            self._clear("to be dead-lettered")
        elif self._fruitless == ISOLATE_AFTER:
            self.outbox.counters.inc("uplink_isolations")
            log.info("uplink: %d connections in a row closed with message %s on %s in flight "
                     "and no PUBACK past it; sending one row at a time to find the cause",
                     self._fruitless, head.key, head.topic)

    def _clear(self, what: str) -> None:
        """No row is suspected (any more): the normal window again."""
        if self._fruitless >= ISOLATE_AFTER and self._suspect is not None:
            log.info("uplink: message %s %s; back to a window of %d", self._suspect.key, what,
                     self._normal_window())
        self._suspect, self._fruitless, self._alone = None, 0, 0

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self.conn.connected.is_set():
                continue
            await self._fill()

    def _pump(self) -> None:
        """Send what is in memory now, highest lane first, while the window has room;
        wake the task (`_fill`) when a lane must first read from disk."""
        if not self.conn.connected.is_set():
            return
        for lane in self.lanes.values():
            queue = lane.queue
            while queue:
                if not self._room():
                    return
                row = queue.popleft()
                if not self._send(lane, row):
                    queue.appendleft(row)
                    return
            if lane.on_disk:
                self._wake.set()  # lower lanes wait for this one's page
                return

    def _room(self) -> bool:
        """Room in the window: in flight, and delivered but not yet deleted, count."""
        settling = self.outbox.settling
        if self._inflight + settling < self.window:
            return True
        if settling:
            self.outbox.settle_soon()  # they free the window once their deletes commit
        return False

    async def _fill(self) -> None:
        """Send until the window is full or every lane is empty."""
        for lane in list(self.lanes.values()):
            while self._room():
                if not lane.queue:
                    if lane.on_disk and not lane.loading:
                        await self._load(lane)
                    if not lane.queue:
                        break
                row = lane.queue.popleft()
                if not self._send(lane, row):
                    lane.queue.appendleft(row)
                    return
            else:
                return  # the window is full

    async def _load(self, lane: Lane) -> None:
        lane.loading = True
        try:
            after = max([lane.loaded_to, *lane.unacked.keys()])
            rows = await self.outbox.page(lane.priority, after, PAGE_ROWS)
        finally:
            lane.loading = False
        # Rows may have been sent meanwhile by a reconnect's resend; skip what is known.
        known = lane.loaded_to
        fresh = [r for r in rows if r.id > known]
        lane.queue.extend(fresh)
        if fresh:
            lane.loaded_to = fresh[-1].id
        if len(rows) < PAGE_ROWS and self.max_committed.get(lane.priority, 0) <= lane.loaded_to:
            lane.on_disk = False

    def _send(self, lane: Lane, row: Row) -> bool:
        """Hand `row` to the connection; False when the connection is gone (try it later).

        Whatever is wrong with the row itself settles that row (dead letter or
        expiry), never the lane: one bad row must not stop the rows behind it.
        """
        expiry_s = None
        if row.expires is not None:
            left = row.expires - time.time()
            if left <= 0:
                self.outbox.expired(row)
                return True
            expiry_s = max(1, int(left))
        reason = self._unpublishable(row)
        if reason:
            self.outbox.to_dead(row, reason)
            return True
        # In flight before the call: a QoS 0 PUBLISH is "acknowledged" inside it.
        lane.unacked[row.id] = row
        self._inflight += 1
        self._seq += 1
        self._sent[row.id] = self._seq
        self._written = time.monotonic()
        try:
            self.conn.publish(row.topic, row.payload, row.qos, row.retain,
                              user_properties=((KEY_PROPERTY, row.key),), expiry_s=expiry_s,
                              on_published=functools.partial(self._done, lane, row))
        except ConnectError:
            self._forget(lane, row)
            return False
        except Exception as exc:  # any error building this one PUBLISH
            # Defense in depth behind `_unpublishable`: e.g. the codec refusing a field.
            # Queuing a packet does no I/O, so this is about the row, never the network.
            self._forget(lane, row)
            self.outbox.to_dead(row, f"not publishable: {type(exc).__name__}: {exc}")
            return True
        return True

    def _forget(self, lane: Lane, row: Row) -> None:
        if lane.unacked.pop(row.id, None) is not None:
            self._inflight -= 1
            self._sent.pop(row.id, None)

    def _unpublishable(self, row: Row) -> str:
        """Why no broker could take `row` ("" when it is fine)."""
        if row.topic not in self._valid_topics:
            try:
                topics.validate_name(row.topic)
            except ValueError as exc:
                return f"invalid topic: {exc}"
            if len(self._valid_topics) >= CHECKED_TOPICS:
                self._valid_topics.clear()
            self._valid_topics.add(row.topic)
        max_packet = self.conn.server_max_packet
        if max_packet and len(row.payload) + len(row.topic) + PACKET_OVERHEAD > max_packet:
            return f"larger than the broker's maximum packet size {max_packet}"
        return ""

    def _done(self, lane: Lane, row: Row, rc: int, name: str) -> None:
        if lane.unacked.pop(row.id, None) is None:
            return  # from a connection already given up on; the row goes again
        self._inflight -= 1
        seq = self._sent.pop(row.id, 0)
        self._acked_seq = max(self._acked_seq, seq)
        if rc < 0x80:
            self.outbox.acked(row)
        else:
            self.outbox.to_dead(row, f"refused by the broker: {name} ({rc})")
        suspect = self._suspect
        if suspect is not None and not self._pending(suspect):
            self._clear("settled")  # acknowledged, refused, expired or evicted
        if lane.queue or lane.on_disk or len(self.lanes) > 1:
            self._pump()

    def _pending(self, row: Row) -> bool:
        """Whether `row` still waits in its lane: in flight, or first in its queue (rows
        go in order, and a close puts the unacknowledged ones back in front)."""
        lane = self.lanes.get(row.lane)
        if lane is None:
            return False
        return row.id in lane.unacked or bool(lane.queue and lane.queue[0].id == row.id)

    @property
    def inflight(self) -> int:
        return self._inflight
