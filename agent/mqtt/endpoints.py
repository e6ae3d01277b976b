"""Where a connection goes next, and which MQTT version each endpoint speaks.

A `[local]` or `[uplink]` table names one broker, or several endpoints of a
cluster (`url = ["mqtts://a:8883", "mqtts://b:8883"]`) that share every other
key. A `Connection` tries them in turn: after a failed attempt or a lost
connection it moves to the next one, after the same full-jitter backoff
(bounded by `reconnect_max_s`). Nothing else changes with the endpoint: the
outbox resends whatever the old node did not acknowledge, and the input
lives in the broker's (or the cluster's) session.

`protocol = "auto"`, the default, speaks MQTT 5 first. An endpoint that
refuses it is asked again at once in MQTT 3.1.1, which is then kept for that
endpoint until the agent restarts. Brokers refuse MQTT 5 in two ways:

- with a CONNACK of return code 1, "unacceptable protocol version", in the
  3.1.1 layout (NATS 2.9 answers `20 02 00 01`; the codec reads it as 0x84);
- by closing the connection before any CONNACK (RabbitMQ 3.10).

A close proves little (a broker closes for other reasons too), so 3.1.1 is
kept only once a 3.1.1 CONNACK shows the endpoint speaks it; until then the
next attempt there starts with MQTT 5 again.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from urllib.parse import urlsplit

from agent.config import BrokerConfig
from agent.mqtt import codec
from agent.urls import redact_url

log = logging.getLogger(__name__)

V5, V311 = "5", "3.1.1"
CLOSED_BEFORE_CONNACK = "it closed the connection before any CONNACK"


def backoff_s(attempt: int, min_s: float, max_s: float) -> float:
    """Full-jitter exponential backoff (AWS architecture blog), never below `min_s`."""
    cap = min(max_s, min_s * (2 ** min(attempt, 30)))
    return random.uniform(min_s, max(min_s, cap))


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One broker URL, split once."""

    url: str
    host: str
    port: int
    tls: bool
    where: str  # the URL for messages and telemetry: never the password

    @classmethod
    def of(cls, url: str) -> Endpoint:
        parts = urlsplit(url)  # checked by BrokerConfig
        tls = parts.scheme in ("mqtts", "ssl")
        return cls(url, parts.hostname or "127.0.0.1", parts.port or (8883 if tls else 1883),
                   tls, redact_url(url))


class Endpoints:
    """The endpoints of one connection: the one in use, and the MQTT version of each."""

    def __init__(self, name: str, cfg: BrokerConfig) -> None:
        self.name = name
        self.protocol = cfg.protocol
        self.all = tuple(Endpoint.of(url) for url in cfg.urls)
        self.index = 0
        self._speaks: dict[int, str] = {}  # index -> the version a CONNACK answered in
        self._trial: set[int] = set()  # refused MQTT 5 just now: the next attempt is 3.1.1
        self._said: set[int] = set()  # the fallback was logged at info for these

    @property
    def current(self) -> Endpoint:
        return self.all[self.index]

    def v5(self) -> bool:
        """Whether the next attempt at the current endpoint speaks MQTT 5."""
        if self.protocol != "auto":
            return self.protocol == V5
        return self.index not in self._trial and self._speaks.get(self.index, V5) == V5

    def fall_back(self, how: str) -> bool:
        """The current endpoint refused an MQTT 5 CONNECT (`how`): True when the next
        attempt, at once, is MQTT 3.1.1 (protocol "auto"); False leaves it to the caller."""
        if self.protocol != "auto":
            return False
        self._trial.add(self.index)
        # Said once per endpoint: a broker that closes every CONNECT refuses each round.
        level = logging.DEBUG if self.index in self._said else logging.INFO
        self._said.add(self.index)
        log.log(level, "%s: %s refused MQTT 5 (%s); trying MQTT 3.1.1 at once", self.name,
                self.current.where, how)
        return True

    def answered(self, v5: bool, reason: int) -> None:
        """A CONNACK came: unless it refused the version, the endpoint speaks it."""
        i = self.index
        self._trial.discard(i)
        if reason == codec.UNSUPPORTED_PROTOCOL_VERSION:
            return
        version = V5 if v5 else V311
        if self._speaks.get(i) != version:
            self._speaks[i] = version
            kept = "; kept for this endpoint until restart" \
                if self.protocol == "auto" and not v5 else ""
            log.info("%s: %s speaks MQTT %s%s", self.name, self.all[i].where, version, kept)

    def unanswered(self) -> None:
        """An attempt ended without a CONNACK: a 3.1.1 trial proved nothing."""
        self._trial.discard(self.index)

    def advance(self) -> Endpoint | None:
        """Move on to the next endpoint (after a failed attempt or a lost connection);
        the new one, or None when there is only one."""
        if len(self.all) == 1:
            return None
        self.index = (self.index + 1) % len(self.all)
        return self.current

    def refusal(self, reason: int, v5: bool) -> str:
        """Why a CONNACK refused the connection, with what to configure when it can say."""
        where = self.current.where
        text = (f"{where} refused the connection: {codec.reason_name(reason)} "
                f"(0x{reason:02X})")
        if reason == codec.UNSUPPORTED_PROTOCOL_VERSION and v5:
            # The parenthesis is what this said before "auto" existed; logs are grepped.
            text += (f'; the broker speaks only MQTT 3.1.1: protocol = "auto" in [{self.name}] '
                     'falls back to it by itself (broker refused MQTT 5; set protocol = '
                     '"3.1.1" to speak only that)')
        return text

    def closed_hint(self) -> str:
        """What to say when a broker closed an MQTT 5 CONNECT unanswered (protocol "5")."""
        return (" before any CONNACK to our MQTT 5 CONNECT, as a broker that speaks only "
                f'MQTT 3.1.1 does (RabbitMQ 3.x): protocol = "auto" in [{self.name}] falls '
                "back to 3.1.1")
