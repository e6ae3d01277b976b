"""Signed release documents: what a device checks before it downloads a byte.

A release is one JSON document:

    {"signed": {"type": "fogwhisk-model-release", "spec": 1, "name", "version",
                "expires", "artifact": {"sha256", "size"},
                "model": {"sha256", "inputs", "outputs", "labels_sha256"}, "policy": {...}},
     "signatures": [{"keyid", "sig"}],
     "locations": ["https://..."]}            # optional, unsigned: where else to fetch

Each signature is Ed25519 over `canonical(signed)`; `keyid` is the first 16 hex
digits of sha256 of the raw public key. `parse_and_verify` checks the signatures
over the parsed `signed` block *before* it reads any field of it, so what it returns
is exactly what the trusted keys signed. Version ordering against what the device
ran or rejected is the controller's check: only it knows the device's history.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from agent.errors import ConfigError, ReleaseError
from agent.ota.shadow import ShadowPolicy

RELEASE_TYPE = "fogwhisk-model-release"
SPEC = 1
MAX_DOCUMENT_BYTES = 64 * 1024  # a release is a few hundred bytes; no parser sees more
MAX_SIGNATURES = 32
MAX_LOCATIONS = 16
KEY_FILE, PUB_FILE = "ota.key", "ota.pub"

_HEX64 = re.compile(r"[0-9a-f]{64}")
_SIGNED_KEYS = frozenset({"type", "spec", "name", "version", "expires", "artifact", "model",
                          "policy"})
_TOP_KEYS = frozenset({"signed", "signatures", "locations"})


def canonical(obj: Any) -> bytes:
    """The bytes a signature covers: sorted keys, no whitespace, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()


def keyid(public_key: Ed25519PublicKey) -> str:
    """First 16 hex digits of sha256 of the raw 32-byte public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


# --- keys -------------------------------------------------------------------------------


def keygen(out_dir: Path) -> tuple[Path, Path]:
    """Write `out_dir/ota.key` (private, PEM, 0600) and `out_dir/ota.pub`; never overwrite."""
    key_path, pub_path = out_dir / KEY_FILE, out_dir / PUB_FILE
    for path in (key_path, pub_path):
        if path.exists() or path.is_symlink():
            raise ReleaseError(f"{path} exists: refusing to overwrite a key")
    out_dir.mkdir(parents=True, exist_ok=True)
    private = Ed25519PrivateKey.generate()
    key_pem = private.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    pub_pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    # O_EXCL: a file that appeared since the check above is not overwritten either.
    for path, data, mode in ((key_path, key_pem, 0o600), (pub_path, pub_pem, 0o644)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # whatever the umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return key_path, pub_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The operator's signing key (unencrypted PKCS#8 PEM, as `keygen` writes it)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ReleaseError(f"{path}: cannot read the signing key: {exc.strerror}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ReleaseError(f"{path}: not an unencrypted Ed25519 private key in PEM "
                           f"(fogwhisk model keygen writes one)") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ReleaseError(f"{path}: a {type(key).__name__} private key, not Ed25519")
    return key


def load_public_keys(paths: Sequence[Path], where: str = "ota.keys"
                     ) -> dict[str, Ed25519PublicKey]:
    """The device's trusted keys by keyid; a file that is no Ed25519 public key is a
    ConfigError naming `where` and the file (the agent refuses to start rather than
    trust nothing)."""
    keys: dict[str, Ed25519PublicKey] = {}
    for path in paths:
        here = f"{where}: {path}"
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{here}: cannot read: {exc.strerror}") from exc
        if b"PRIVATE KEY" in data:
            raise ConfigError(f"{here} is a private key: give devices the .pub file only")
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{here}: not a public key in PEM") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(f"{here}: a {type(key).__name__}, not an Ed25519 public key")
        keys[keyid(key)] = key
    return keys


# --- signing ----------------------------------------------------------------------------


def _signature(signed: Mapping[str, Any], private_key: Ed25519PrivateKey) -> dict[str, str]:
    sig = private_key.sign(canonical(signed))
    return {"keyid": keyid(private_key.public_key()), "sig": base64.b64encode(sig).decode()}


def sign(signed: Mapping[str, Any], private_key: Ed25519PrivateKey) -> dict[str, Any]:
    """A release document with one signature over `signed`."""
    return {"signed": dict(signed), "signatures": [_signature(signed, private_key)]}


def cosign(doc: Mapping[str, Any], private_key: Ed25519PrivateKey) -> dict[str, Any]:
    """`doc` with this key's signature added (replacing an earlier one of the same key)."""
    mine = _signature(doc["signed"], private_key)
    others = [s for s in doc.get("signatures", []) if s.get("keyid") != mine["keyid"]]
    return {**doc, "signatures": [*others, mine]}


def dump(doc: Mapping[str, Any]) -> bytes:
    """A release document as written to disk and published: indented, sorted, UTF-8."""
    return (json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


# --- the verified release ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Policy:
    """How the device judges the new model (signed, so a release cannot be loosened)."""

    max_latency_ratio: float = 2.0  # trial and probation p95 / the active model's p95
    probation_s: float | None = None  # None: the device's [ota] probation
    max_error_rate: float = 0.05  # inference errors / frames during probation
    shadow: dict[str, Any] | None = None  # kept raw for shadow evaluation
    min_golden_recall: float | None = None
    min_golden_precision: float | None = None

    def __post_init__(self) -> None:
        if not self.max_latency_ratio > 0:
            raise ValueError("policy.max_latency_ratio must be above 0")
        if self.probation_s is not None and not self.probation_s >= 0:
            raise ValueError("policy.probation_s must be 0 or more")
        for name in ("max_error_rate", "min_golden_recall", "min_golden_precision"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise ValueError(f"policy.{name} must lie in [0, 1]")

    @property
    def shadow_policy(self) -> ShadowPolicy | None:
        """`shadow` parsed (validated when the release was read), None when not set."""
        return None if self.shadow is None else ShadowPolicy.from_json(self.shadow)

    def to_json(self) -> dict[str, Any]:
        """The signed `policy` table: both ratios always, the optional keys when set."""
        out: dict[str, Any] = {"max_latency_ratio": self.max_latency_ratio,
                               "max_error_rate": self.max_error_rate}
        for name in ("probation_s", "shadow", "min_golden_recall", "min_golden_precision"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    @classmethod
    def from_json(cls, raw: object, where: str = "policy") -> Policy:
        """ValueError naming the key for anything but the known keys with sane values."""
        if not isinstance(raw, dict):
            raise ValueError(f"{where} is not an object")
        known = {f for f in cls.__dataclass_fields__}
        args: dict[str, Any] = {}
        for key, given in raw.items():
            value = given
            if key not in known:
                raise ValueError(f"{where} key {key!r} is not known to this agent")
            if key == "shadow":
                if value is not None and not isinstance(value, dict):
                    raise ValueError(f"{where}.shadow must be an object")
                if value is not None:  # every key known, every value sane
                    ShadowPolicy.from_json(value, f"{where}.shadow")
            elif value is not None and (not isinstance(value, int | float)
                                        or isinstance(value, bool)
                                        or not math.isfinite(value)):
                raise ValueError(f"{where}.{key} must be a number, got {value!r}")
            elif value is not None:
                value = float(value)
            elif key in ("max_latency_ratio", "max_error_rate"):
                raise ValueError(f"{where}.{key} must be a number, got null")
            args[key] = value
        return cls(**args)


@dataclass(frozen=True, slots=True)
class Release:
    """A verified release: every field below `locations` was signed by trusted keys."""

    name: str
    version: int
    expires: datetime
    artifact_sha256: str
    artifact_size: int
    model_sha256: str
    inputs: tuple[dict[str, Any], ...]  # {"shape": [1, 96, 96, 3], "dtype": "uint8"}
    outputs: tuple[dict[str, Any], ...]
    labels_sha256: str
    policy: Policy
    locations: tuple[str, ...]  # unsigned https URLs (`model push --url`); integrity: sha256
    raw: bytes = field(repr=False)  # the exact document, to persist and to report
    keyids: tuple[str, ...] = ()  # the trusted keys whose signatures verified


def labels_sha256(labels: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(labels).encode()).hexdigest()


def format_time(t: datetime) -> str:
    """RFC 3339 UTC with whole seconds: 2030-01-31T12:00:00Z."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: object) -> datetime:
    if not isinstance(text, str) or not text.endswith(("Z", "z", "+00:00")):
        raise ValueError(f"expires must be an RFC 3339 UTC time like 2030-01-31T12:00:00Z, "
                         f"got {text!r}")
    try:
        t = datetime.fromisoformat(text[:-1] + "+00:00" if text[-1] in "Zz" else text)
    except ValueError:
        raise ValueError(f"expires must be an RFC 3339 UTC time like 2030-01-31T12:00:00Z, "
                         f"got {text!r}") from None
    return t.astimezone(UTC)


def parse_and_verify(doc: bytes, *, topic_name: str, keys: Mapping[str, Ed25519PublicKey],
                     threshold: int, max_bytes: int, now: datetime) -> Release:
    """The release in `doc` if `threshold` distinct trusted keys signed it, it has not
    expired, it names `topic_name` and its artifact fits `max_bytes`; else ReleaseError
    with a one-line reason."""
    if threshold < 1:
        raise ValueError(f"threshold must be at least 1, got {threshold}")
    if now.tzinfo is None:
        raise ValueError("now must be an aware datetime (UTC)")
    obj = _parse(doc)
    signed = obj["signed"]
    trusted = _verify_signatures(obj, keys, threshold)
    try:
        r = _read_signed(signed)
        locations = _read_locations(obj.get("locations", []))
    except ValueError as exc:
        raise ReleaseError(_one_line(str(exc))) from None
    name, version, expires, artifact_sha, size, model_sha, inputs, outputs, labels, policy = r
    if now >= expires:
        raise ReleaseError(f"expired at {format_time(expires)} (now {format_time(now)}): "
                           f"the operator must re-pack or re-sign it")
    if name != topic_name:
        raise ReleaseError(f"release names model {name!r}, the deploy topic {topic_name!r}")
    if size > max_bytes:
        raise ReleaseError(f"artifact is {size} bytes, more than max_model_bytes {max_bytes}")
    return Release(name=name, version=version, expires=expires, artifact_sha256=artifact_sha,
                   artifact_size=size, model_sha256=model_sha, inputs=inputs, outputs=outputs,
                   labels_sha256=labels, policy=policy, locations=locations, raw=bytes(doc),
                   keyids=trusted)


def check_signatures(doc: Mapping[str, Any], keys: Mapping[str, Ed25519PublicKey]) -> None:
    """ReleaseError if a signature from one of `keys` does not verify (operator side:
    a co-signer never adds its signature to a document changed after signing)."""
    for s in doc.get("signatures", []):
        if isinstance(s, dict) and s.get("keyid") in keys and not _valid(
                keys[s["keyid"]], s.get("sig"), doc["signed"]):
            raise ReleaseError(f"bad signature from key {s['keyid']}: the signed block is not "
                               f"the one it signed")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _parse(doc: bytes) -> dict[str, Any]:
    if len(doc) > MAX_DOCUMENT_BYTES:
        raise ReleaseError(f"release document is {len(doc)} bytes, more than "
                           f"{MAX_DOCUMENT_BYTES}")

    def refuse(value: str) -> Any:
        raise ValueError(f"{value} is not a JSON number")

    def finite(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(f"{text} is out of range")
        return value

    try:
        obj = json.loads(doc.decode("utf-8"), parse_constant=refuse, parse_float=finite)
    except UnicodeDecodeError:
        raise ReleaseError("not JSON: not UTF-8") from None
    except ValueError as exc:  # JSONDecodeError, too many digits, NaN
        raise ReleaseError(_one_line(f"not JSON: {exc}")) from None
    except RecursionError:
        raise ReleaseError("not JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise ReleaseError(f"not a JSON object but a {type(obj).__name__}")
    unknown = sorted(set(obj) - _TOP_KEYS)
    if unknown:
        raise ReleaseError(f"unknown key {unknown[0]!r} beside signed, signatures and locations")
    if not isinstance(obj.get("signed"), dict):
        raise ReleaseError("no signed block (an object under 'signed')")
    return obj


def _valid(key: Ed25519PublicKey, sig: object, signed: object) -> bool:
    if not isinstance(sig, str):
        return False
    try:
        key.verify(base64.b64decode(sig, validate=True), canonical(signed))
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


def _verify_signatures(obj: dict[str, Any], keys: Mapping[str, Ed25519PublicKey],
                       threshold: int) -> tuple[str, ...]:
    sigs = obj.get("signatures")
    if not sigs:
        raise ReleaseError("unsigned: no signatures")
    if not isinstance(sigs, list) or len(sigs) > MAX_SIGNATURES:
        raise ReleaseError(f"signatures must be a list of at most {MAX_SIGNATURES} objects")
    valid: list[str] = []
    bad: list[str] = []
    seen: list[str] = []
    for s in sigs:
        if not isinstance(s, dict) or not isinstance(s.get("keyid"), str) \
                or not isinstance(s.get("sig"), str) or set(s) != {"keyid", "sig"}:
            raise ReleaseError("a signature must be an object with a keyid and a sig")
        kid = s["keyid"]
        seen.append(kid[:16])
        if kid not in keys:
            continue
        try:
            raw = base64.b64decode(s["sig"], validate=True)
        except (binascii.Error, ValueError):
            raise ReleaseError(f"signature of key {kid} is not base64") from None
        try:
            keys[kid].verify(raw, canonical(obj["signed"]))
        except InvalidSignature:
            bad.append(kid)
            continue
        if kid not in valid:
            valid.append(kid)
    if len(valid) >= threshold:
        return tuple(valid)
    if not valid and not bad:
        raise ReleaseError(f"unknown key: signed by {', '.join(seen)}; this device trusts "
                           f"{', '.join(sorted(keys)) or 'no key'}")
    parts = []
    if bad:
        parts.append(f"bad signature from key {bad[0]}: the signed block is not the one it "
                     f"signed")
    if threshold > 1 or not bad:
        n = len(valid)
        parts.append(f"{n} valid signature{'' if n == 1 else 's'} from trusted keys, "
                     f"threshold is {threshold}")
    raise ReleaseError("; ".join(parts))


def _hex64(value: object, where: str) -> str:
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise ValueError(f"{where} must be 64 lowercase hex digits")
    return value


def _int(value: object, where: str, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{where} must be an integer of at least {minimum}, got {value!r}")
    return value


def _table(value: object, where: str, keys: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be an object")
    if set(value) != keys:
        odd = sorted(set(value) ^ keys)
        raise ValueError(f"{where} must have exactly the keys {', '.join(sorted(keys))} "
                         f"({odd[0]!r} is {'missing' if odd[0] in keys else 'unknown'})")
    return value


def _tensors(value: object, where: str) -> tuple[dict[str, Any], ...]:
    if not isinstance(value, list) or len(value) > 64:
        raise ValueError(f"{where} must be a list of tensors")
    out = []
    for i, item in enumerate(value):
        t = _table(item, f"{where}[{i}]", {"shape", "dtype"})
        shape, dtype = t["shape"], t["dtype"]
        if not isinstance(shape, list) or len(shape) > 8 or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= -1 for d in shape):
            raise ValueError(f"{where}[{i}].shape must be a list of integers")
        if not isinstance(dtype, str) or not re.fullmatch(r"[a-z0-9]{1,16}", dtype):
            raise ValueError(f"{where}[{i}].dtype must be a numpy dtype name")
        out.append({"shape": list(shape), "dtype": dtype})
    return tuple(out)


def _read_signed(s: dict[str, Any]) -> tuple[Any, ...]:
    unknown = sorted(set(s) - _SIGNED_KEYS)
    if unknown:
        raise ValueError(f"signed block has unknown key {unknown[0]!r}")
    missing = sorted(_SIGNED_KEYS - set(s))
    if missing:
        raise ValueError(f"signed block has no {missing[0]!r}")
    if s["type"] != RELEASE_TYPE:
        raise ValueError(f"type is {s['type']!r}, not {RELEASE_TYPE!r}")
    if s["spec"] != SPEC or isinstance(s["spec"], bool):
        raise ValueError(f"spec {s['spec']!r} is not supported by this agent (it reads {SPEC})")
    name = s["name"]
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
        raise ValueError(f"name {name!r} is no model name")
    version = _int(s["version"], "version", 1)
    expires = parse_time(s["expires"])
    artifact = _table(s["artifact"], "artifact", {"sha256", "size"})
    artifact_sha = _hex64(artifact["sha256"], "artifact.sha256")
    size = _int(artifact["size"], "artifact.size", 1)
    model = _table(s["model"], "model", {"sha256", "inputs", "outputs", "labels_sha256"})
    model_sha = _hex64(model["sha256"], "model.sha256")
    inputs = _tensors(model["inputs"], "model.inputs")
    outputs = _tensors(model["outputs"], "model.outputs")
    labels = _hex64(model["labels_sha256"], "model.labels_sha256")
    policy = Policy.from_json(s["policy"])
    return name, version, expires, artifact_sha, size, model_sha, inputs, outputs, labels, policy


def _read_locations(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_LOCATIONS or not all(
            isinstance(u, str) and u.startswith("https://") and len(u) < 2048
            and u.isprintable() for u in value):
        raise ValueError(f"locations must be a list of at most {MAX_LOCATIONS} https URLs")
    return tuple(value)
