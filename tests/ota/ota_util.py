"""OTA test helpers: operator keys and releases packed from an own model (catalog shapes-ssd).

`NOW` is the clock every release here is packed and verified against, so expiry
is exact and two packs of one model give identical bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from agent.ota import release
from agent.vision.models import CATALOG

NOW = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
SHAPES = CATALOG / "shapes-ssd"
MAX = 64 * 2**20


@dataclass(frozen=True)
class Keys:
    """An operator key pair as `fogwhisk model keygen` writes it."""

    key_path: Path
    pub_path: Path
    private: Ed25519PrivateKey
    public: Ed25519PublicKey
    keyid: str


@dataclass(frozen=True)
class Packed:
    """A packed release: the artifact, the release document and its bytes."""

    tar: Path
    release_json: Path
    doc: bytes


def make_keys(directory: Path) -> Keys:
    key_path, pub_path = release.keygen(directory)
    private = release.load_private_key(key_path)
    public = private.public_key()
    return Keys(key_path, pub_path, private, public, release.keyid(public))
