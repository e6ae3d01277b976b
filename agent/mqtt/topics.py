"""MQTT topic names and filters: validation, matching, the agent's own topics."""

from __future__ import annotations


def validate_filter(topic_filter: str) -> None:
    """Raise ValueError unless `topic_filter` is a valid MQTT subscription filter."""
    if not topic_filter or len(topic_filter.encode()) > 65535 or "\x00" in topic_filter:
        raise ValueError(f"topic filter {topic_filter!r} is empty, too long or holds NUL")
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError(f"topic filter {topic_filter!r}: # must be a whole, last level")
        if "+" in level and level != "+":
            raise ValueError(f"topic filter {topic_filter!r}: + must be a whole level")


MAX_TOPIC_BYTES = 65535


def validate_name(topic: str) -> None:
    """Raise ValueError unless `topic` is a valid topic name to publish on.

    The MQTT rules (3.1.1 section 4.7, 5.0 section 4.7): not empty, UTF-8 of at most
    65,535 bytes, no NUL, no wildcard. Checked where a topic is made or received, so a
    bad one is refused with its reason instead of failing later inside the codec.
    """
    if not topic:
        raise ValueError("topic name is empty")
    try:
        size = len(topic.encode())
    except UnicodeEncodeError:
        raise ValueError(f"topic name {topic[:80]!r} is not valid UTF-8") from None
    if size > MAX_TOPIC_BYTES:
        raise ValueError(f"topic name of {size} bytes is longer than {MAX_TOPIC_BYTES}")
    if "\x00" in topic:
        raise ValueError(f"topic name {topic[:80]!r} holds NUL")
    if "+" in topic or "#" in topic:
        raise ValueError(f"topic name {topic[:80]!r} holds a wildcard")


def matches(topic_filter: str, topic: str) -> bool:
    """True when `topic` matches `topic_filter` (MQTT 3.1.1 section 4.7 rules)."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False  # wildcards at the first level never match $SYS-style topics
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    for i, f in enumerate(f_levels):
        if f == "#":
            return True
        if i >= len(t_levels):
            return False
        if f != "+" and f != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)


def status(prefix: str, device: str) -> str:
    return f"{prefix}/{device}/status"


def telemetry(prefix: str, device: str) -> str:
    return f"{prefix}/{device}/telemetry"


def events(prefix: str, device: str, pipeline: str) -> str:
    return f"{prefix}/{device}/events/{pipeline}"
