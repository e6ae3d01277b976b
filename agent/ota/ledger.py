"""The ledger of the OTA controller: each model's update state, persisted, then reported.

Every transition (`agent.ota.state.step`) is saved to `<data_dir>/ota/<name>.json`
before it is acted on, then published retained on
<prefix>/<device>/models/<name>/state through the outbox (lane `STATE_PRIORITY`:
ahead of events, dropped last). Beside it, per model, the release document of the
update in hand (`<name>.release.json`, verified again as of its acceptance at a
restart) and a release waiting for probation to end (`<name>.deferred.json`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from agent.config import Config
from agent.errors import ReleaseError
from agent.messages import Done, Outgoing
from agent.ota import release, shadow
from agent.ota.release import Release
from agent.ota.state import Event, ModelState, Timeouts, document, step
from agent.ota.store import VersionStore

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

log = logging.getLogger(__name__)

STATE_PRIORITY = 10  # the state report's outbox lane: ahead of events, dropped last
DOWNLOAD_S = 3600.0
VERIFY_S = 600.0
TRIAL_STATE_S = 300.0  # the trial child has its own, shorter, `trial_timeout`


class Ledger:
    """Each model's `ModelState`: stepped, saved, reported; and the files beside it."""

    def __init__(self, cfg: Config, store: VersionStore, keys: Mapping[str, Ed25519PublicKey],
                 submit: Callable[[list[Outgoing], Done | None], None]) -> None:
        self.cfg = cfg
        self.store = store
        self.keys = keys
        self.submit = submit
        self.prefix = cfg.device.prefix
        self.device = cfg.device.id
        self.states: dict[str, ModelState] = {}
        self.locks: dict[str, asyncio.Lock] = {}

    async def apply(self, name: str, e: Event) -> ModelState:
        """Step the machine, persist the new state, then report it."""
        lock = self.locks.setdefault(name, asyncio.Lock())
        async with lock:
            s = self.states.get(name) or ModelState(name)
            new = step(s, e)
            if new is s:
                return s
            self.states[name] = new
            await asyncio.to_thread(self.store.save_state, new)
            self.publish(new)
            return new

    def publish(self, s: ModelState) -> None:
        topic = f"{self.prefix}/{self.device}/models/{s.name}/state"
        payload = json.dumps(document(s), separators=(",", ":")).encode()
        self.submit([Outgoing(topic, payload, f"{self.device}:ota:{s.name}:{s.seq}", "ota",
                              priority=STATE_PRIORITY, qos=1, retain=True,
                              created=time.time())], None)

    def state(self, name: str) -> str | None:
        u = self.states[name].update
        return u.state if u is not None else None

    def timeouts(self, r: Release | None) -> Timeouts:
        sp = r.policy.shadow_policy if r is not None else None
        return Timeouts(download_s=DOWNLOAD_S, verify_s=VERIFY_S,
                        trial_s=max(TRIAL_STATE_S, float(self.cfg.ota.trial_timeout) + 60.0),
                        probation_s=self.probation_s(r),
                        shadow_s=None if sp is not None and sp.mode == "observe" else
                        (sp or shadow.ShadowPolicy()).max_duration_s + 60.0)

    def probation_s(self, r: Release | None) -> float:
        if r is not None and r.policy.probation_s is not None:
            return float(r.policy.probation_s)
        return float(self.cfg.ota.probation)

    def path(self, name: str, what: str) -> Path:
        self.store.ota_dir.mkdir(parents=True, exist_ok=True)
        return self.store.ota_dir / f"{name}.{what}.json"

    def read_release(self, name: str) -> Release | None:
        """The persisted release of the update in hand, verified again as of its acceptance
        (it may have expired since: that was checked when it arrived)."""
        try:
            saved = json.loads(self.path(name, "release").read_bytes())
            return release.parse_and_verify(
                saved["doc"].encode(), topic_name=name, keys=self.keys,
                threshold=self.cfg.ota.threshold, max_bytes=self.cfg.ota.max_model_bytes,
                now=datetime.fromtimestamp(float(saved["accepted"]), UTC))
        except (OSError, ValueError, KeyError, TypeError, ReleaseError) as exc:
            log.error("ota: model %s: the saved release is unusable: %s", name, exc)
            return None

    def read_deferred(self, name: str) -> bytes | None:
        try:
            return self.path(name, "deferred").read_bytes()
        except OSError:
            return None

    def clean_incoming(self, releases: dict[str, Release]) -> None:
        """Remove downloads and extractions no unfinished update needs."""
        if not self.store.incoming.is_dir():
            return
        keep = set()
        for n, r in releases.items():
            if self.states[n].busy:
                keep |= {r.artifact_sha256, f"{n}-{r.version}"}
        for item in self.store.incoming.iterdir():
            if item.name.split(".")[0] in keep:
                continue
            if item.is_dir():
                shutil.rmtree(item, ignore_errors=True)
            else:
                item.unlink(missing_ok=True)
