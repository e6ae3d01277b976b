"""What `run` needs from this machine, checked before it starts (and by check-config).

The model and runtime checks import `agent.vision` lazily: only a config with a
detect step needs it.
"""

from __future__ import annotations

import importlib.util
import os
import ssl
from urllib.parse import urlsplit

from agent.config.broker import BrokerConfig
from agent.config.load import Config
from agent.config.pipeline import is_file_source
from agent.errors import ConfigError


def preflight(cfg: Config) -> None:
    """What `run` needs from this machine, checked before it starts (and by check-config).

    TLS files that load, models that are known and fetched with the sha256 their
    manifest names (and the labels a step asks for), runtimes that exist, video files
    that exist, OpenCV for a camera. Kept out of `load` so that `fogwhisk outbox` and
    the unit writer work before certificates arrive. A missing model stops `run`
    here with exit 2, which systemd does not restart (RestartPreventExitStatus=2).
    """
    for which in ("local", "uplink"):
        broker: BrokerConfig = getattr(cfg, which)
        if any(urlsplit(u).scheme in ("mqtts", "ssl") for u in broker.urls):
            _check_tls(broker, f"{cfg.source}: {which}")
    detects = []
    for i, p in enumerate(cfg.pipelines):
        where = f"{cfg.source}: pipeline[{i}] ({p.name})"
        cam = p.trigger.camera
        if cam is not None and is_file_source(cam) and not os.path.isfile(cam):
            raise ConfigError(f"{where}.trigger.camera: no video file {cam}")
        if cam is not None and importlib.util.find_spec("cv2") is None:
            raise ConfigError(f"{where}.trigger.camera: reading a camera needs OpenCV, which "
                              "this install lacks: install fogwhisk[vision] "
                              "(pip install 'fogwhisk[vision]')")
        detects += [(f"{where}.steps[{k}] (detect)", s.params)
                    for k, s in enumerate(p.steps) if s.action == "detect"]
    if detects:
        _check_runtimes(cfg)
    for where, params in detects:
        _check_model(cfg, params.model, params.labels, where)


def _check_tls(broker: BrokerConfig, where: str) -> None:
    """Each file readable, then loaded as `agent.mqtt` loads them, so a bad one names itself."""
    for key in ("ca", "cert", "key"):
        path = getattr(broker, key)
        if path is None:
            continue
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as exc:
            raise ConfigError(f"{where}.{key}: {path}: cannot read: {exc.strerror}") from None
    try:
        ctx = ssl.create_default_context(cafile=broker.ca)
    except ssl.SSLError as exc:
        raise ConfigError(f"{where}.ca: {broker.ca}: not a PEM CA certificate: "
                          f"{exc.reason or exc}") from None
    if broker.cert is None:
        return
    try:
        # An encrypted key would make OpenSSL ask on the terminal; under systemd there is none.
        ctx.load_cert_chain(broker.cert, broker.key, password=lambda: b"")
    except ssl.SSLError as exc:
        raise ConfigError(f"{where}.cert, {where.rpartition(': ')[2]}.key: {broker.cert} and "
                          f"{broker.key or 'no key'} are not a certificate and its own "
                          f"unencrypted key: {exc.reason or exc}") from None


def _check_runtimes(cfg: Config) -> None:
    from agent.vision import runtimes  # numpy: only for configs that run a model

    unknown = [r for r in cfg.runtime.fallback if r not in runtimes.RUNTIMES]
    if unknown:
        raise ConfigError(f"{cfg.source}: runtime.fallback: unknown runtime {unknown[0]!r} "
                          f"(known: {', '.join(sorted(runtimes.RUNTIMES))})")


def _check_model(cfg: Config, name: str, labels: tuple[str, ...], where: str) -> None:
    """The model `detect` would resolve: same store, same models dir, same sha256 check."""
    from agent.errors import ModelError
    from agent.vision.models import ModelStore

    try:
        ref = ModelStore(models_dir=cfg.models_dir).resolve(name)
    except ModelError as exc:
        raise ConfigError(f"{where}.model: {exc}") from None
    missing = [label for label in labels if label not in ref.manifest.labels]
    if missing:
        raise ConfigError(f"{where}.labels: model {name!r} has no label {missing[0]!r} "
                          f"(it has: {', '.join(ref.manifest.labels)})")
