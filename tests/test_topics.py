"""Topic filters: `matches` agrees with a regex reference of MQTT 3.1.1 section 4.7."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.mqtt import topics

LEVEL = st.sampled_from(["a", "b", "sensors", "", "$SYS", "x y", "ü"])
TOPIC = st.lists(LEVEL, min_size=1, max_size=5).map("/".join)
FILTER = st.builds(
    lambda levels, tail: "/".join(levels + ([tail] if tail else [])),
    st.lists(st.one_of(LEVEL, st.just("+")), min_size=0, max_size=5),
    st.sampled_from([None, "#"]),
).filter(bool)


def reference(topic_filter: str, topic: str) -> bool:
    """The spec as a regex: + is one level, a trailing # is the parent and any levels below."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    levels = topic_filter.split("/")
    parts: list[str] = []
    for i, level in enumerate(levels):
        sep = "/" if i else ""
        if level == "#":
            # "a/#" matches "a" too: the separator before # is optional.
            return re.fullmatch("".join(parts) + (f"(?:{sep}.*)?" if i else ".*"),
                                topic, re.S) is not None
        parts.append(sep + ("[^/]*" if level == "+" else re.escape(level)))
    return re.fullmatch("".join(parts), topic, re.S) is not None


@given(FILTER, TOPIC)
def test_matches_agrees_with_the_reference(topic_filter: str, topic: str) -> None:
    assert topics.matches(topic_filter, topic) == reference(topic_filter, topic)


@given(TOPIC)
def test_a_topic_matches_itself_and_hash(topic: str) -> None:
    assert topics.matches(topic, topic)
    assert topics.matches("#", topic) == (not topic.startswith("$"))


@given(FILTER)
def test_generated_filters_are_valid(topic_filter: str) -> None:
    topics.validate_filter(topic_filter)


@pytest.mark.parametrize(("f", "t", "expected"), [
    ("sport/tennis/player1/#", "sport/tennis/player1", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
    ("sport/#", "sport", True),
    ("sport/tennis/+", "sport/tennis/player1", True),
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/+", "sport", False),
    ("sport/+", "sport/", True),
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("+", "/finance", False),
    ("#", "$SYS/x", False),
    ("$SYS/#", "$SYS/x", True),
    ("+/monitor/Clients", "$SYS/monitor/Clients", False),
])
def test_the_examples_of_the_specification(f: str, t: str, expected: bool) -> None:
    assert topics.matches(f, t) is expected


@pytest.mark.parametrize("bad", ["", "a/#/b", "a#", "a/b#", "a+/b", "+a", "#/", "a\x00b",
                                 "a" * 65536])
def test_invalid_filters_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        topics.validate_filter(bad)


@given(st.text(alphabet="ab/+#", min_size=1, max_size=12))
def test_validate_filter_accepts_exactly_the_well_formed(text: str) -> None:
    levels = text.split("/")
    ok = all(lv in ("+", "#") or ("+" not in lv and "#" not in lv) for lv in levels) and \
        "#" not in levels[:-1]
    if ok:
        topics.validate_filter(text)
    else:
        with pytest.raises(ValueError):
            topics.validate_filter(text)
