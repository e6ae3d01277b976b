"""`fogwhisk model rollout`'s command line: its options, parsed into a call of `rollout()`."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.errors import ConfigError
from agent.ota.rollout.plan import MaxFailed, Options, read_devices
from agent.ota.rollout.run import rollout


def add_parser(sub: Any, broker_arguments: Callable[[argparse.ArgumentParser], None]) -> None:
    """`fogwhisk model rollout`, under the `model` command's subparsers."""
    p = sub.add_parser(
        "rollout", help="push a release in waves that stop themselves",
        description="Push RELEASE_JSON to the canaries, then to waves growing by "
        "--wave-factor, each watched on the devices' state reports until every device in it "
        "is committed, rejected, rolled back or timed out. Stops when the failed devices "
        "reach --max-failed or the canaries' median shadow agreement is under "
        "--min-agreement: no further device gets the release, those in flight are told to "
        "drop it (an empty retained deploy), exit 1 with the reason. The rollout's state is "
        "retained on the broker (fog/_rollouts/<name>-<version>): --resume continues it, "
        "--watch follows it from another machine.")
    p.add_argument("release_json", type=Path, metavar="RELEASE_JSON",
                   help="the release from pack; its .tar is found beside it")
    broker_arguments(p)
    who = p.add_mutually_exclusive_group()
    who.add_argument("--devices", type=Path, metavar="FILE", help="device ids, one per "
                     "line (# comments); the first --canary of them are the canaries")
    who.add_argument("--device", action="append", dest="device_ids", metavar="ID",
                     help="a device; repeat for several (the first ones are the canaries)")
    p.add_argument("--canary", type=_whole, default=2, metavar="N",
                   help="devices in the first wave (default: 2)")
    p.add_argument("--wave-factor", type=float, default=2.0, metavar="F",
                   help="each wave is F times the one before (default: 2)")
    p.add_argument("--max-failed", type=_max_failed, default=MaxFailed(share=0.1),
                   metavar="SHARE", help="stop when this share of the devices pushed (10%%) "
                   "or this many devices (3) were rejected, rolled back or timed out "
                   "(default: 10%%)")
    p.add_argument("--min-agreement", type=float, default=0.6, metavar="F1",
                   help="stop when the canaries' median shadow agreement (update.shadow.f1) "
                   "is under this (default: 0.6; skipped when no canary reports one)")
    p.add_argument("--wave-timeout", type=_timeout, default=1800.0, metavar="DURATION",
                   help="a device not finished this long after its wave was pushed counts "
                   "as failed (default: 30m)")
    p.add_argument("--url", action="append", default=[], dest="urls", metavar="URL",
                   help="an https:// location of the artifact beside the MQTT chunks")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue the rollout retained on the broker (after a crash or a "
                      "closed laptop); no device is pushed twice")
    mode.add_argument("--watch", action="store_true",
                      help="follow a rollout someone else runs, without pushing anything")
    p.add_argument("--json", action="store_true", dest="as_json",
                   help="no live table; the final summary as one JSON object")


def main(args: argparse.Namespace) -> int:
    devices: list[str] | None = None
    if args.devices is not None:
        devices = read_devices(args.devices)
    elif args.device_ids:
        devices = list(args.device_ids)
    options = Options(args.canary, args.wave_factor, args.max_failed, args.min_agreement,
                      args.wave_timeout)
    return rollout(args.release_json, args.broker, devices=devices, options=options,
                   resume=args.resume, watch=args.watch, as_json=args.as_json,
                   urls=args.urls, ca=args.ca, cert=args.cert, key=args.tls_key,
                   username=args.username, password=args.password, prefix=args.prefix,
                   timeout_s=args.timeout)


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _max_failed(text: str) -> MaxFailed:
    try:
        return MaxFailed.parse(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--max-failed ")) from None


def _timeout(text: str) -> float:
    from agent.schema import parse_duration

    try:
        seconds = parse_duration(text, "--wave-timeout")
    except ConfigError:
        raise argparse.ArgumentTypeError(f"expected a duration like 30m, got {text!r}"
                                         ) from None
    return seconds
