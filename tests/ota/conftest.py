"""OTA fixtures: operator keys, a release packed from shapes-ssd (helpers: ota_util)."""

from __future__ import annotations

from pathlib import Path

import pytest
from ota_util import NOW, SHAPES, Keys, Packed, make_keys  # type: ignore[import-not-found]

from agent.ota import pack as packing


@pytest.fixture(scope="session")
def ota_keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("ota-keys"))


@pytest.fixture(scope="session")
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    """A second operator's key pair (threshold signatures, unknown keys)."""
    return make_keys(tmp_path_factory.mktemp("ota-keys-2"))


@pytest.fixture(scope="session")
def third_keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("ota-keys-3"))


@pytest.fixture
def packed(tmp_path: Path, ota_keys: Keys) -> Packed:
    """shapes-ssd packed as version 2, signed by `ota_keys`, at NOW."""
    tar, release_json = packing.pack(SHAPES, 2, tmp_path / "out", ota_keys.private, now=NOW)
    return Packed(tar, release_json, release_json.read_bytes())
