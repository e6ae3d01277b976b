"""After start-up the agent pages out its libraries' start-up pages, and keeps working.

Run in a fresh interpreter (the test process's own mappings are not the agent's): the
libraries a camera pipeline imports are loaded and used, `page_out_start_up` runs, and
the resident file pages fall while decoding and inference still give the same results.
"""

from __future__ import annotations

import json
import subprocess
import sys

from brokers import ROOT  # type: ignore[import-not-found]

SCRIPT = r"""
import json
import cv2
import numpy as np
from agent import memory

img = (np.arange(64 * 48 * 3, dtype=np.uint32) % 251).astype(np.uint8).reshape(48, 64, 3)
jpeg = cv2.imencode(".png", img)[1]
before = memory.resident_file_kib()
released = memory.page_out_start_up()
after = memory.resident_file_kib()
again = cv2.imdecode(jpeg, cv2.IMREAD_COLOR)
print(json.dumps({"before": before, "after": after, "released": released,
                  "same": bool((again == img).all()), "sum": int(again.sum())}))
"""


def test_page_out_releases_library_pages_and_the_libraries_still_work() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["same"], figures  # a PNG round trip after the page-out is lossless
    assert figures["released"] > 0, figures
    assert figures["after"] < figures["before"] * 0.8, figures
