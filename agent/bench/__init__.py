"""`fogwhisk bench SUITE [ARGS]`: benchmark suites, each next to its baseline.

Each suite is a module with `run(argv) -> int`, imported only when chosen
(the vision suite pulls in OpenCV and a model runtime).
"""

from __future__ import annotations

import importlib
import sys

SUITES: dict[str, str] = {
    "relay": "agent.bench.relay",
    "vision": "agent.bench.vision",
    "blackhole": "agent.bench.blackhole",
    "ota": "agent.bench.ota",
    "rollout": "agent.bench.rollout",
    "fabric": "agent.bench.fabric",
}


def main(suite: str, args: list[str]) -> int:
    """Run one suite, or every suite for "all"; exit 2 for an unknown name."""
    if suite == "all":
        worst = 0
        for name in SUITES:
            print(f"== bench {name}", flush=True)
            worst = max(worst, _run(name, args))
        return worst
    if suite not in SUITES:
        print(f"fogwhisk bench: unknown suite {suite!r} (known: all, {', '.join(SUITES)})",
              file=sys.stderr)
        return 2
    return _run(suite, args)


def _run(name: str, args: list[str]) -> int:
    try:
        module = importlib.import_module(SUITES[name])
    except ModuleNotFoundError as exc:
        if exc.name != SUITES[name]:
            raise
        print(f"fogwhisk bench: suite {name!r} is not available in this build", file=sys.stderr)
        return 1
    result = module.run(list(args))
    return int(result or 0)
