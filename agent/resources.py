"""Files shipped inside the package, found where pip put them.

A wheel carries `agent/firmware-profiles/` (board defaults), `agent/broker-config/`
(Mosquitto files the demo and the relay bench start from) and the model catalog
`agent/vision/catalog/` (manifests and the small models we build). They are read
through `importlib.resources`, so a checkout, an editable install and a wheel in
site-packages all find them the same way. (The checkout's `firmware-profiles/`
and `broker-config/` are links to these directories.)
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def path(*parts: str) -> Path:
    """The shipped file or directory `agent/<parts...>` as a path on disk.

    Mosquitto and LiteRT open files by name, so a zipped install (where the data
    would have no path) is refused rather than copied out to a temporary file.
    """
    found = resources.files("agent").joinpath(*parts)
    if not isinstance(found, Path):
        raise RuntimeError(f"fogwhisk is imported from {found}, not from files on disk: "
                           "install it with pip into a venv")
    return found
