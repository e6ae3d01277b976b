"""What installing a config takes, for `scripts/install-service`.

    python -m agent.installer -c /etc/fogwhisk/agent.toml
    data_dir=/var/lib/fogwhisk
    models_dir=/var/lib/fogwhisk/models
    extras=vision
    models=person

Read from the raw TOML with the standard library alone: the installer asks
before it has installed the extra that loading a vision config would import,
and runs this from the checkout with the system Python. Paths resolve from
the config's directory, defaults are the agent's (tests/test_install_service.py
compares the plan with `config.load`).
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.actions.registry import VISION_ACTIONS
from agent.errors import ConfigError

DEFAULT_DATA_DIR = "/var/lib/fogwhisk"  # DeviceConfig.data_dir's default


@dataclass(frozen=True, slots=True)
class Plan:
    """A config's directories, whether it needs the vision extra, the models to fetch."""

    data_dir: str
    models_dir: str
    vision: bool  # a camera, or a step that needs fogwhisk[vision]
    models: tuple[str, ...]  # what detect steps name, in order

    def lines(self) -> str:
        return (f"data_dir={self.data_dir}\nmodels_dir={self.models_dir}\n"
                f"extras={'vision' if self.vision else ''}\nmodels={' '.join(self.models)}\n")


def plan(raw: dict[str, Any], base_dir: Path) -> Plan:
    """The plan of the raw config table `raw` read from a file in `base_dir`."""
    def table(value: object, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table")
        return value

    def at(path: object, key: str) -> Path:
        if not isinstance(path, str) or not path:
            raise ConfigError(f"{key}: expected a path")
        return base_dir / path  # an absolute path stays itself

    device = table(raw.get("device", {}), "device")
    data_dir = at(device.get("data_dir", DEFAULT_DATA_DIR), "device.data_dir")
    models = table(raw.get("models", {}), "models").get("dir")
    models_dir = at(models, "models.dir") if models is not None else data_dir / "models"
    vision, names = False, []
    pipelines = raw.get("pipeline", [])
    for i, raw_pipeline in enumerate(pipelines if isinstance(pipelines, list) else []):
        p = table(raw_pipeline, f"pipeline[{i}]")
        trigger = p.get("trigger")
        vision |= isinstance(trigger, dict) and "camera" in trigger
        steps = p.get("steps")
        for step in steps if isinstance(steps, list) else []:
            action = step.get("action") if isinstance(step, dict) else None
            vision |= action in VISION_ACTIONS
            if action == "detect" and isinstance(step.get("model"), str):
                names.append(step["model"])
    return Plan(str(data_dir), str(models_dir), vision, tuple(dict.fromkeys(names)))


def main(argv: Sequence[str] | None = None) -> int:
    """Print the plan as key=value lines; exit 2 when the file is no config."""
    ap = argparse.ArgumentParser(prog="python -m agent.installer",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("-c", "--config", required=True,
                    help="the agent's config file; - reads it from stdin")
    ap.add_argument("--config-dir", default=".",
                    help="with -c -: the directory its relative paths start from")
    args = ap.parse_args(argv)
    try:
        if args.config == "-":
            raw = tomllib.loads(sys.stdin.read())
            base = Path(args.config_dir).resolve()
        else:
            with open(args.config, "rb") as f:
                raw = tomllib.load(f)
            base = Path(args.config).resolve().parent
        sys.stdout.write(plan(raw, base).lines())
    except (OSError, tomllib.TOMLDecodeError, ConfigError) as exc:
        print(f"fogwhisk installer: {args.config}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
