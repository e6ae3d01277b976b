"""The [local] and [uplink] tables: one broker, or a cluster behind several endpoints.

Each URL is checked where it is read: scheme, host, port, and no password or TLS
file that a plain mqtt:// URL would send in clear or ignore.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, urlsplit

from agent.errors import ConfigError
from agent.schema import Duration, Seconds, convert
from agent.urls import redact_text, redact_url

DEFAULT_URL = "mqtt://127.0.0.1:1883"


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """One broker, or a cluster behind several endpoints that share every other key.

    In TOML `url` is one URL or a list of them; `urls` holds them all, `url` the
    first (what code that knows one broker reads: `host`, `port`, `tls`).
    """

    url: str = DEFAULT_URL
    client_id: str | None = None  # default: fogwhisk-{device}-{local|uplink}; fixed for sessions
    username: str | None = None
    password: str | None = None
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    # "auto": MQTT 5 first, 3.1.1 for an endpoint that refuses it (agent.mqtt.endpoints).
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    keepalive_s: Seconds = Seconds(30)
    session_expiry_s: Duration = Duration(86400)
    reconnect_min_s: Duration = Duration(0.5)
    reconnect_max_s: Duration = Duration(5)  # an edge device buffers: back within seconds
    connect_timeout_s: Duration = Duration(10)
    urls: tuple[str, ...] = ()  # every endpoint, `url` first; written `url = [...]` in TOML

    def __post_init__(self) -> None:
        if not self.urls or (len(self.urls) == 1 and self.url != DEFAULT_URL):
            object.__setattr__(self, "urls", (self.url,))  # one URL (or a replace() of it)
        elif self.url not in (self.urls[0], DEFAULT_URL):
            raise ValueError(f"url: {redact_url(self.url)!r} is not the first of urls")
        object.__setattr__(self, "url", self.urls[0])
        many = len(self.urls) > 1
        for i, url in enumerate(self.urls):
            self._check_url(url, f"url[{i}]" if many else "url")
        if self.key is not None and self.cert is None:
            raise ValueError("key: a client key needs its certificate: set cert too")
        if self.reconnect_min_s <= 0 or self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("need 0 < reconnect_min_s <= reconnect_max_s")
        if not 1 <= self.keepalive_s <= 65535:  # MQTT's two-byte keep alive
            raise ValueError(f"keepalive_s: must lie within 1 s and 65535 s, "
                             f"got {self.keepalive_s}")
        if not 0 <= self.session_expiry_s <= 0xFFFFFFFF:  # MQTT 5's four-byte expiry
            raise ValueError(f"session_expiry_s: must lie within 0 s and 4294967295 s, "
                             f"got {self.session_expiry_s:g}")
        if self.connect_timeout_s <= 0:
            raise ValueError("connect_timeout_s: must be positive")
        if self.client_id is not None and len(self.client_id.encode()) > 65535:
            raise ValueError("client_id: longer than MQTT's 65535 bytes")

    def _check_url(self, url: str, key: str) -> None:
        """One endpoint; `key` is `url`, or `url[i]` in a list, for the error message."""
        shown = redact_url(url)  # error messages never carry the password
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:  # a port that is no number or out of range, a bad IPv6
            raise ValueError(f"{key}: {shown!r}: {redact_text(str(exc))} "
                             "(a port is a number from 1 to 65535)") from None
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ValueError(f"{key}: {shown!r}: scheme must be mqtt:// or mqtts://")
        if not parts.hostname:
            raise ValueError(f"{key}: {shown!r} has no host")
        if port == 0:
            raise ValueError(f"{key}: {shown!r}: port 0 cannot be connected to")
        if parts.scheme in ("mqtts", "ssl"):
            return
        for name in ("ca", "cert", "key"):
            if getattr(self, name) is not None:
                where = f" ({key} {shown!r} is one)" if key != "url" else ""
                raise ValueError(f"{name}: TLS files with a plain mqtt:// URL would be "
                                 f"ignored: use mqtts://{where}")
        # Over loopback a password never leaves the machine; anywhere else it would
        # cross the network in clear.
        if not loopback(parts.hostname):
            if self.password is not None:
                raise ValueError("password: would cross the network in clear over "
                                 f"{shown!r}: use mqtts://")
            if parts.password is not None:
                raise ValueError(f"{key}: {shown!r} holds a password that would cross the "
                                 "network in clear: use mqtts://")

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme in ("mqtts", "ssl")

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or (8883 if self.tls else 1883)

    @property
    def credentials(self) -> tuple[str | None, str | None]:
        """Username and password from the keys, else from the URL's userinfo."""
        return self.credentials_for(self.url)

    def credentials_for(self, url: str) -> tuple[str | None, str | None]:
        """Username and password from the keys, else from that endpoint's userinfo."""
        parts = urlsplit(url)
        user = self.username or (unquote(parts.username) if parts.username else None)
        pw = self.password or (unquote(parts.password) if parts.password else None)
        return user, pw

    @property
    def addresses(self) -> tuple[tuple[str, int], ...]:
        """(host, port) of every endpoint."""
        out = []
        for url in self.urls:
            parts = urlsplit(url)
            tls = parts.scheme in ("mqtts", "ssl")
            out.append((parts.hostname or "127.0.0.1", parts.port or (8883 if tls else 1883)))
        return tuple(out)


def broker_table(raw: object, where: str) -> object:
    """`url = [...]` in a [local] or [uplink] table becomes `urls` (and `url`, the first)."""
    if not isinstance(raw, dict):
        return raw  # the schema says what is wrong with it
    if "urls" in raw:
        raise ConfigError(f"{where}: unknown key 'urls': write several endpoints as "
                          'url = ["mqtts://a:8883", "mqtts://b:8883"]')
    value = raw.get("url")
    if not isinstance(value, list):
        return raw
    urls = convert(tuple[str, ...], value, f"{where}.url")
    if not urls:
        raise ConfigError(f"{where}.url: an empty list: name at least one broker URL")
    return {**raw, "url": urls[0], "urls": urls}


def loopback(host: str) -> bool:
    """`localhost` or a loopback address: what a password may cross in clear."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
