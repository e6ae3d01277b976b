"""After start-up the agent unmaps its libraries' start-up pages, and keeps working.

Run in a fresh interpreter: the libraries a camera pipeline imports are loaded and
used, `page_out_start_up` runs, and the resident file pages fall while decoding and
inference still give the same results. This test process maps the same libraries
(as a second agent or the test runner would), so pages shared with another process
are unmapped too.
"""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
from ai_edge_litert import interpreter
from brokers import ROOT  # type: ignore[import-not-found]

MODEL_PATH = ROOT / ".cache" / "models" / "person" / "pose_detection.tflite"

SCRIPT = r"""
import json
import cv2
import numpy as np
from ai_edge_litert.interpreter import Interpreter
from agent import memory

net = Interpreter(model_path=MODEL, num_threads=1)
net.allocate_tensors()
inp = net.get_input_details()[0]
x = np.linspace(0, 1, int(np.prod(inp["shape"])), dtype=np.float32).reshape(inp["shape"])
def infer():
    net.set_tensor(inp["index"], x)
    net.invoke()
    return [net.get_tensor(o["index"]).copy() for o in net.get_output_details()]
first = infer()
img = (np.arange(64 * 48 * 3, dtype=np.uint32) % 251).astype(np.uint8).reshape(48, 64, 3)
jpeg = cv2.imencode(".png", img)[1]
before = memory.resident_file_kib()
released = memory.page_out_start_up()
after = memory.resident_file_kib()
again = cv2.imdecode(jpeg, cv2.IMREAD_COLOR)
second = infer()
print(json.dumps({"before": before, "after": after, "released": released,
                  "same": bool((again == img).all()),
                  "same_inference": all(np.array_equal(a, b) for a, b in zip(first, second))}))
"""


def test_page_out_releases_library_pages_and_the_libraries_still_work() -> None:
    assert cv2.imdecode is not None and interpreter.Interpreter is not None  # mapped here too
    script = SCRIPT.replace("MODEL", repr(str(MODEL_PATH)))
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["same"], figures  # a PNG round trip after the page-out is lossless
    assert figures["same_inference"], figures  # the model gives the same outputs
    assert figures["released"] > 0, figures
    assert figures["after"] < figures["before"] * 0.8, figures
