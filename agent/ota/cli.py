"""`fogwhisk model keygen|pack|sign|push|status`: the operator's side of OTA releases.

    fogwhisk model keygen --out DIR
    fogwhisk model pack MODEL_DIR --version N --key KEYFILE [--key ...] [--expires 30d]
                        [--policy KEY=VALUE ...] [--out OUTDIR]
    fogwhisk model sign RELEASE_JSON --key KEYFILE [--trust PUBFILE ...]
    fogwhisk model push RELEASE_JSON --broker URL --device ID [--device ...] [--url ...]
    fogwhisk model status --broker URL [--device ID] [--name NAME] [--watch] [--json]
    fogwhisk model rollout RELEASE_JSON --broker URL (--devices FILE | --device ID ...)
                           [--canary 2] [--wave-factor 2] [--max-failed 10%] [--resume]

`agent.__main__` adds these under its `model` command with `add_parsers` and hands the parsed
arguments to `main`. Exit codes: 0 ok, 1 refused (the one-line reason on stderr, from
`__main__`), 2 bad usage (argparse names the argument).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from agent.schema import parse_duration

COMMANDS = ("keygen", "pack", "sign", "push", "status", "rollout")
EXIT_OK = 0

_POLICY_HELP = ("max_latency_ratio (trial and probation p95 over the active model's, default "
                "2.0), probation_s (a duration like 10m; default: the device's [ota] probation), "
                "max_error_rate (default 0.05), min_golden_recall, min_golden_precision "
                "(0..1), shadow (a JSON object)")


def add_parsers(sub: Any) -> None:
    """Add keygen, pack, sign, push and status to `sub`, the `model` command's subparsers."""
    keygen = sub.add_parser(
        "keygen", help="make an Ed25519 key pair to sign releases with",
        description="Write DIR/ota.key (private, PEM, mode 0600: keep it off devices) and "
        "DIR/ota.pub (list it in the devices' [ota] keys). Refuses to overwrite either.")
    keygen.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="directory for ota.key and ota.pub (created if missing)")

    pack = sub.add_parser(
        "pack", help="pack a model directory into a signed release",
        description="Validate MODEL_DIR/manifest.toml and its model and golden files, then "
        "write OUTDIR/<name>-<N>.tar (reproducible: the same inputs give the same bytes) and "
        "OUTDIR/<name>-<N>.release.json, signed by every --key. The packed manifest says "
        "version = N. To roll back, re-pack the previous model as a higher version.")
    pack.add_argument("model_dir", type=Path, metavar="MODEL_DIR",
                      help="a directory with manifest.toml, the model file and its goldens")
    pack.add_argument("--version", required=True, type=_version, metavar="N",
                      help="the release version, higher than every one devices have seen")
    pack.add_argument("--key", required=True, action="append", type=Path, metavar="KEYFILE",
                      help="private key from keygen; repeat for threshold signatures")
    pack.add_argument("--expires", default=30 * 86400.0, type=_expiry, metavar="DURATION",
                      help="devices refuse the release after this long (default: 30d)")
    pack.add_argument("--policy", action="append", default=[], type=_policy_item,
                      metavar="KEY=VALUE", help=f"signed trial and probation policy: "
                      f"{_POLICY_HELP}")
    pack.add_argument("--out", default=Path("."), type=Path, metavar="OUTDIR",
                      help="where the tar and release go (default: the current directory)")

    sign = sub.add_parser(
        "sign", help="add a signature to a release (threshold signing)",
        description="Add the signature of each --key to RELEASE_JSON, replacing an older "
        "one of the same key. With --trust, first check that the signatures of those keys "
        "still verify, so nobody co-signs a release changed after it was signed.")
    sign.add_argument("release_json", type=Path, metavar="RELEASE_JSON")
    sign.add_argument("--key", required=True, action="append", type=Path, metavar="KEYFILE")
    sign.add_argument("--trust", action="append", default=[], type=Path, metavar="PUBFILE",
                      help="public key whose signature must already be there and verify")

    push = sub.add_parser(
        "push", help="publish a release and its artifact to devices",
        description="Upload the artifact once as retained 64 KiB chunks on "
        "fog/_artifacts/<sha256>/<index> (skipped when already there), then publish the "
        "release retained on fog/<device>/models/<name>/deploy for each --device. Exit 0 "
        "once the broker acknowledged everything.")
    push.add_argument("release_json", type=Path, metavar="RELEASE_JSON",
                      help="the release from pack; its .tar is found beside it")
    _broker_arguments(push)
    push.add_argument("--device", required=True, action="append", dest="devices",
                      metavar="ID", help="a device to deploy to; repeat for several")
    push.add_argument("--url", action="append", default=[], dest="urls", metavar="URL",
                      help="an https:// location of the artifact beside the MQTT chunks")

    status = sub.add_parser(
        "status", help="every device's models, from the retained state topics",
        description="A table of each device's active, previous and updating model versions "
        "from fog/<device>/models/<name>/state.")
    _broker_arguments(status)
    status.add_argument("--device", metavar="ID", help="only this device")
    status.add_argument("--name", metavar="NAME", help="only this model")
    status.add_argument("--watch", action="store_true", help="keep printing changes")
    status.add_argument("--json", action="store_true", dest="as_json",
                        help="JSON lines for scripts instead of a table")

    from agent.ota import rollout  # its options; paho is imported only when one runs

    rollout.add_parser(sub, _broker_arguments)


def _broker_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", required=True, metavar="URL",
                   help="mqtt://host:port or mqtts://host:port")
    p.add_argument("--ca", type=Path, metavar="FILE", help="CA certificate of the broker (TLS)")
    p.add_argument("--cert", type=Path, metavar="FILE", help="client certificate (mutual TLS)")
    p.add_argument("--key", type=Path, dest="tls_key", metavar="FILE",
                   help="the client certificate's private key")
    p.add_argument("--username")
    p.add_argument("--password")
    p.add_argument("--prefix", default="fog", help="topic prefix (default: fog)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="give up waiting for the broker after this long (default: 30)")


def main(args: argparse.Namespace) -> int:
    """Run the `model` subcommand in `args`; ReleaseError for a refused input."""
    command = args.model_command
    if command == "keygen":
        return keygen(args.out)
    if command == "pack":
        return pack(args.model_dir, args.version, args.key, args.expires, args.policy,
                    args.out)
    if command == "sign":
        return sign(args.release_json, args.key, args.trust)
    if command == "rollout":
        from agent.ota import rollout

        return rollout.main(args)
    # Transfer and status are the push module's (MQTT clients: operator side only).
    from agent.ota import push as push_mod  # type: ignore[attr-defined,unused-ignore]

    broker: dict[str, Any] = {"ca": args.ca, "cert": args.cert, "key": args.tls_key,
                              "username": args.username, "password": args.password,
                              "prefix": args.prefix, "timeout_s": args.timeout}
    if command == "push":
        code: int = push_mod.push(args.release_json, args.broker, devices=args.devices,
                                  urls=args.urls, **broker)
        return code
    code = push_mod.status(args.broker, device=args.device, name=args.name, watch=args.watch,
                           as_json=args.as_json, **broker)
    return code


def keygen(out: Path) -> int:
    from agent.ota import release

    key_path, pub_path = release.keygen(out)
    kid = release.keyid(release.load_private_key(key_path).public_key())
    print(f"{key_path}: private key, keep it off devices (and offline when you can)")
    print(f"{pub_path}: keyid {kid}, list it in the devices' [ota] keys")
    return EXIT_OK


def pack(model_dir: Path, version: int, key_paths: list[Path], expires_s: float,
         policy_items: list[tuple[str, Any]], out: Path) -> int:
    from agent.ota import pack as packing
    from agent.ota import release

    keys = [release.load_private_key(p) for p in key_paths]  # a bad key: before any work
    policy = release.Policy(**dict(policy_items))
    tar, release_json = packing.pack(model_dir, version, out, keys, expires_s=expires_s,
                                      policy=policy)
    signed = json.loads(release_json.read_bytes())["signed"]
    print(f"{tar}: {signed['artifact']['size']} bytes, sha256 {signed['artifact']['sha256']}")
    print(f"{release_json}: {signed['name']} version {version}, expires {signed['expires']}, "
          f"signed by {', '.join(release.keyid(k.public_key()) for k in keys)}")
    return EXIT_OK


def sign(release_json: Path, key_paths: list[Path], trust: list[Path]) -> int:
    from agent.errors import ReleaseError
    from agent.ota import release

    keys = [release.load_private_key(p) for p in key_paths]
    trusted = release.load_public_keys(trust, where="--trust")
    try:
        doc = json.loads(release_json.read_bytes())
    except OSError as exc:
        raise ReleaseError(f"{release_json}: cannot read: {exc.strerror}") from None
    except ValueError as exc:
        raise ReleaseError(f"{release_json}: not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("signed"), dict):
        raise ReleaseError(f"{release_json}: no signed block: not a release document")
    release.check_signatures(doc, trusted)
    signers = {s.get("keyid") for s in doc.get("signatures", []) if isinstance(s, dict)}
    missing = sorted(set(trusted) - signers)
    if missing:
        raise ReleaseError(f"{release_json}: key {missing[0]} (--trust) has not signed it")
    for k in keys:
        doc = release.cosign(doc, k)
    tmp = release_json.with_name(release_json.name + ".tmp")
    tmp.write_bytes(release.dump(doc))
    tmp.replace(release_json)
    s = doc["signed"]
    print(f"{release_json}: {s.get('name')} version {s.get('version')}, now signed by "
          f"{', '.join(sig['keyid'] for sig in doc['signatures'])}")
    return EXIT_OK


# --- argument types (argparse turns their errors into exit 2 naming the argument) -------


def _version(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _expiry(text: str) -> float:
    from agent.errors import ConfigError

    try:
        seconds = parse_duration(text, "--expires")
    except ConfigError:
        raise argparse.ArgumentTypeError(f"expected a duration like 30d or 12h, got {text!r}"
                                         ) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be longer than 0, got {text!r}")
    return seconds


def _policy_item(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` -> (key, value), checked on its own against the Policy's rules."""
    from agent.errors import ConfigError
    from agent.ota.release import Policy

    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    value: Any
    try:
        if key == "shadow":
            value = json.loads(raw)
        elif key == "probation_s":
            value = parse_duration(raw, key)
        else:
            value = float(raw)
        Policy.from_json({key: value})  # unknown key, type and range, one at a time
    except (ValueError, ConfigError) as exc:
        raise argparse.ArgumentTypeError(f"{key}: {exc}" if key not in str(exc) else str(exc)
                                         ) from None
    return key, value
