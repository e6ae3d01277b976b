"""Why a connection closed, said once per burst, and a session takeover named.

A connection that flaps would write the same line many times a second: `say`
logs a key once per burst of `BURST_S`, then how many lines it held back. A
session takeover is named for what it is (two agents with one device id): the
broker says so (MQTT 5 DISCONNECT 0x8E), or closes the connection again and
again right after connecting (Mosquitto says nothing, even to MQTT 5 clients).
"""

from __future__ import annotations

import logging
import math
import re
import time

from agent.mqtt import codec
from agent.telemetry import Counters

STABLE_AFTER_S = 10.0  # a connection that lasted this long resets the backoff
TAKEOVER_STREAK = 3  # closes in a row right after connecting that mean a session takeover
BURST_S = 10.0  # a repeated log line is said once per burst of this length


class Closes:
    """The log lines of one connection that may repeat, and its takeover detector."""

    def __init__(self, name: str, client_id: str, counters: Counters,
                 log: logging.Logger) -> None:
        self.name = name
        self.client_id = client_id
        self.counters = counters
        self.log = log  # the connection's: its lines read as the connection's
        self._bursts: dict[str, tuple[float, int]] = {}
        self._quick = 0  # closes by the broker right after connecting, in a row

    def say(self, level: int, key: str, fmt: str, *args: object,
            exc_info: bool = False) -> None:
        """Log once per burst of `key`, then say how many were held back meanwhile."""
        now = time.monotonic()
        last, held = self._bursts.get(key, (-math.inf, 0))
        if now - last < BURST_S:
            self._bursts[key] = (last, held + 1)
            return
        if len(self._bursts) > 100:  # keys hold reasons: keep the table small
            self._bursts = {k: v for k, v in self._bursts.items() if now - v[0] < BURST_S}
        self._bursts[key] = (now, 0)
        if held:
            fmt += " (and %d more like it in the last burst)"
            args = (*args, held)
        self.log.log(level, fmt, *args, exc_info=exc_info)

    def closed(self, broker_reason: int | None, closed_by_broker: bool,
               lasted_s: float) -> None:
        """A connection that had been up ended: name a session takeover when it is one."""
        if broker_reason == codec.SESSION_TAKEN_OVER:
            self._quick = 0
            self._takeover("")
            return
        if not (closed_by_broker and lasted_s < STABLE_AFTER_S):
            self._quick = 0
            return
        self._quick += 1
        if self._quick >= TAKEOVER_STREAK:
            self._takeover(f"the broker closed the connection right after connecting "
                           f"{self._quick} times in a row: ", "probably ")

    def _takeover(self, evidence: str, hedge: str = "") -> None:
        self.counters.inc("session_takeovers")
        m = re.fullmatch(r"fogwhisk-(.+)-(local|uplink)", self.client_id)  # config's default
        twins = f"device id {m.group(1)}" if m else f"client id {self.client_id}"
        self.say(logging.WARNING, "takeover", "%s: %sanother client with the same client id "
                 "%s %stook the session over: two agents with %s?", self.name, evidence,
                 self.client_id, hedge, twins)
