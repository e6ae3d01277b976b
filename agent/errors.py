"""Exceptions raised by the agent.

    AgentError
    ├── ConfigError        bad configuration file, profile or step parameters
    ├── PayloadError       a message payload that an action cannot read
    ├── ConnectError       a broker refused or dropped the connection
    ├── OutboxError        the store-and-forward database cannot be used
    │   ├── DiskFullError  the disk has no room for the next commit
    │   └── OutboxBusyError another process holds the database's lock
    ├── ModelError         a model file, manifest or runtime is unusable
    └── OtaError           an over-the-air model update cannot go on
        ├── ReleaseError   a release document or artifact fails a check (its `reason`)
        └── FetchError     an artifact download failed, stalled or sent bad bytes
"""


class AgentError(Exception):
    """Raised for every failure the agent itself detects."""


class ConfigError(AgentError):
    """Raised when a configuration file, profile or step has a bad or unknown key."""


class PayloadError(AgentError):
    """Raised when an action cannot read a message payload (bad JSON, msgpack, image)."""


class ConnectError(AgentError):
    """Raised when a broker refuses the connection or the network drops it."""


class OutboxError(AgentError):
    """Raised when the store-and-forward database cannot be opened or written."""


class DiskFullError(OutboxError):
    """Raised when a commit finds no room on the disk (SQLITE_FULL, ENOSPC)."""


class OutboxBusyError(OutboxError):
    """Raised when another process holds the outbox's lock ("database is locked")."""


class ModelError(AgentError):
    """Raised when a model file, its manifest or its runtime cannot be used."""


class OtaError(AgentError):
    """Raised when an over-the-air model update cannot go on (the active model keeps running)."""


class ReleaseError(OtaError):
    """Raised when a release document or its artifact fails a check; `reason` is one line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class FetchError(OtaError):
    """Raised when an artifact download fails, stalls, or sends more or other bytes than
    the signed release names; `reason` is one line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
