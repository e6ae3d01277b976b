"""Broker URLs in messages: the password never reaches a log line or an error."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

MASK = "***"

# scheme://user:password@host — the password runs to the last @ before the end of the
# URL (a space or a quote), as a password may hold a raw @, / or ? that urllib would
# split on. Masking too much (a path holding an @) is the safe way to be wrong.
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s/@:'\"]*):([^\s'\"]*)@")


def redact_url(url: str) -> str:
    """`url` with the password of its userinfo replaced by ***; the rest unchanged."""
    try:
        parts = urlsplit(url)
    except ValueError:  # a malformed URL may still hold a password: mask by pattern
        return redact_text(url)
    if parts.password is not None:
        userinfo, _, host = parts.netloc.rpartition("@")
        url = parts._replace(netloc=f"{userinfo.partition(':')[0]}:{MASK}@{host}").geturl()
    # A raw ? or # in a password ends urllib's netloc early; the pattern still sees it.
    return redact_text(url)


def redact_text(text: str) -> str:
    """Every `scheme://user:password@` in free text, with the password masked."""
    return _USERINFO.sub(rf"\1:{MASK}@", text)
