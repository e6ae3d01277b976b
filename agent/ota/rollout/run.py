"""One run of `fogwhisk model rollout`: start (or resume, or follow) the rollout, push
its waves, act on each decision, and when it stops itself tell the devices in flight to
drop the release: an empty retained deploy, which also removes the retained release from
the broker (docs/ota.md, "Rollouts", says why this and not a signed cancel).
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO

from agent.errors import ConfigError, OtaError
from agent.ota.rollout.fleet import FINAL, Fleet
from agent.ota.rollout.gates import agreement, judge
from agent.ota.rollout.plan import Options, check_devices, plan_waves
from agent.ota.rollout.record import Record, owner_text
from agent.ota.rollout.report import EXIT_ABORTED, Screen, Timings, duration, few, summary
from agent.ota.rollout.watch import Watch

if TYPE_CHECKING:
    from agent.ota.push import _Release

TICK_S = 0.25  # decisions look at the clock (wave deadlines) at least this often


class _Run:
    """One run of the command: the connection, the record, the fleet and the output."""

    def __init__(self, release_json: Path, broker: Any, *, prefix: str, urls: Sequence[str],
                 out: TextIO, err: TextIO, as_json: bool, tick_s: float) -> None:
        from agent.ota import push as pushing  # paho: only when a rollout runs

        self.release_json = release_json
        self.rel: _Release = pushing._read_release(release_json)
        self.release_sha = hashlib.sha256(self.rel.raw).hexdigest()
        self.prefix = prefix
        self.urls = list(urls)
        self.tick_s = tick_s
        self.watch = Watch(self.rel, broker, prefix)
        self.rec: Record | None = None
        self.decided_at: float | None = None  # when the wave in hand was decided (monotonic)
        self.timings = Timings()
        self.screen = Screen(out, err, as_json)

    @property
    def fleet(self) -> Fleet:
        """The devices as reported (kept by the connection, made from the record)."""
        return self.watch.fleet

    def save(self) -> None:
        rec = self.rec
        assert rec is not None
        rec.updated = round(time.time(), 3)
        rec.summary = summary(rec, self.fleet)
        self.watch.publish([(self.watch.topic,
                             json.dumps(rec.to_json(), separators=(",", ":")).encode())])

    def report(self) -> int:
        """The final summary; 0 when the rollout succeeded, 1 when it aborted."""
        rec = self.rec
        assert rec is not None
        return self.screen.report(rec, summary(rec, self.fleet, self.timings))

    # starting

    def start(self, devices: Sequence[str] | None, options: Options | None,
              mode: Literal["new", "resume", "watch"]) -> None:
        self.watch.subscribe(self.watch.topic, self.watch.owner_topic)
        existing = Record.from_json(self.watch.record_raw) if self.watch.record_raw else None
        owner = owner_text(self.watch.owner_raw)
        what = f"{self.rel.name} version {self.rel.version}"
        if mode != "new" and existing is None:
            raise OtaError(f"no rollout of {what} on {self.watch.broker.shown} "
                           f"({self.watch.topic})")
        if mode == "new" and existing is not None and not existing.over:
            raise OtaError(f"a rollout of {what} is on the broker ({existing.status}, wave "
                           f"{existing.wave + 1} of {len(existing.waves)}"
                           + (f", run by {owner}" if owner else "")
                           + "): --resume continues it, --watch follows it")
        if mode != "new" and existing is not None and existing.release != self.release_sha:
            raise OtaError(f"the rollout of {what} on the broker deploys another release "
                           f"document (sha256 {existing.release[:16]}...), not "
                           f"{self.release_json}")
        if mode == "resume" and owner and existing is not None and not existing.over:
            raise OtaError(f"the rollout of {what} is being run by {owner} (its connection "
                           f"is open): --watch follows it. If that process is gone and its "
                           f"broker never noticed, clear {self.watch.owner_topic} (retained) "
                           "first")
        if mode == "new" and existing is not None and existing.status == "aborted" \
                and existing.release == self.release_sha and existing.cancelled:
            raise OtaError(f"the rollout of this release document stopped and told "
                           f"{len(existing.cancelled)} devices to drop it; a device answers "
                           "one release document once, so they would stay silent: pack it "
                           "again (a new document, of this version or a higher one) to retry")
        if mode == "new":
            assert devices is not None and options is not None
            if existing is not None:
                self.screen.say(f"replacing the finished rollout of {what} ({existing.status}"
                                + (f": {existing.reason}" if existing.reason else "") + ")")
            now = round(time.time(), 3)
            self.rec = Record(self.rel.name, self.rel.version, self.release_sha, options,
                              plan_waves(devices, options.canary, options.wave_factor),
                              started=now)
        else:
            assert existing is not None
            self.rec = existing
            if devices is not None and list(devices) != [d for w in existing.waves for d in w]:
                raise ConfigError("--resume/--watch: the devices given differ from the "
                                  "rollout's on the broker (leave them out)")
        rec = self.rec
        self.watch.fleet = Fleet(rec.version, (d for w in rec.waves for d in w))
        if mode != "watch":
            self.watch.own()
        t0 = time.perf_counter()
        self.watch.subscribe(self.watch.state_filter)
        self.timings.loaded_s = time.perf_counter() - t0
        self.sync()
        if mode == "new":
            rec.decide(f"planned: {len(rec.waves)} waves of "
                       f"{', '.join(str(len(w)) for w in rec.waves)} devices")
            self.save()

    def sync(self) -> None:
        """Bring the fleet to the record: the waves pushed, the devices timed out."""
        rec = self.rec
        assert rec is not None
        for w in sorted(rec.pushed):
            self.fleet.push(rec.waves[w], {d: rec.stale[d] for d in rec.waves[w]
                                           if d in rec.stale})
        for d, why in rec.timed_out.items():
            self.fleet.time_out(d, why)
        if rec.status in ("aborting", "aborted"):
            self.fleet.cancel(rec.cancelled)

    # driving

    def drive(self) -> None:
        rec = self.rec
        assert rec is not None
        seen = -1
        while True:
            self.watch.check_lost()
            if rec.status == "aborting":
                self.cancel()
                continue
            if rec.over:
                return
            w = rec.wave
            if w not in rec.pushed:
                self.push_wave(w)
                continue
            t0 = time.perf_counter()
            v = judge(rec, self.fleet, time.time())
            self.timings.judge_s.append(time.perf_counter() - t0)
            if v.action == "wait":
                self.screen.show(rec, self.fleet)
                seen = self.fleet.wait(seen, self.tick_s)
                continue
            if v.action == "time_out":
                why = f"no final state within {duration(rec.options.wave_timeout_s)}"
                for d in v.devices:
                    last = self.fleet.outcome(d)
                    with self.fleet.cond:
                        before = self.fleet.reports.get(d) if d in rec.stale else None
                    if last == "waiting" and before is not None:
                        last += (f"; before this push it had reported {before.state}: "
                                 f"{before.reason}")
                    rec.timed_out[d] = f"{why} (last: {last})"
                    self.fleet.time_out(d, rec.timed_out[d])
                text = f"wave {w + 1}: {len(v.devices)} timed out: {few(list(v.devices))}"
                rec.decide(text)
                self.screen.say(text)
                self.save()
                self.decided_at = time.monotonic()
                continue
            if v.action == "abort":
                self.screen.say(f"abort: {v.reason}")
                rec.status, rec.reason = "aborting", v.reason
                rec.cancelled = sorted(d for d in self.fleet.pushed
                                       if self.fleet.outcome(d) not in FINAL)
                rec.decide(f"abort: {v.reason}")
                self.save()
                continue
            pushed, failed, _ = self.fleet.tally()
            text = f"wave {w + 1} finished: {failed} of {pushed} pushed devices failed so far"
            if w == 0:
                gate = agreement(self.fleet, rec.waves[0], rec.options.min_agreement)
                text += f"; canary agreement: {gate.text()}"
            rec.decide(text)
            self.screen.say(text)
            if v.action == "done":
                rec.status = "succeeded"
                rec.decide("succeeded")
                self.save()
                return
            self.decided_at = max(self.fleet.last_done, self.decided_at or 0.0)
            rec.wave = w + 1

    def push_wave(self, w: int) -> None:
        rec = self.rec
        assert rec is not None
        devices = rec.waves[w]
        t0 = time.monotonic()
        if w > 0 and self.decided_at is not None:
            self.timings.decide_ms[w] = (t0 - self.decided_at) * 1000
        todo = devices
        if w in rec.pushing:  # resumed: the push began; only the devices without the release
            have = self.watch.deployed(devices)
            todo = [d for d in devices if d not in have]
        else:
            rec.stale.update(self.fleet.stale_of(devices))
            rec.pushing[w] = round(time.time(), 3)
            rec.decide(f"wave {w + 1}: pushing to {len(devices)} devices")
            self.save()
        if todo:
            b = self.watch.broker
            self.watch.push_mod.push(self.release_json, b.url, devices=todo, urls=self.urls,
                                     ca=b.ca, cert=b.cert, key=b.key, username=b.username,
                                     password=b.password, prefix=self.prefix,
                                     timeout_s=b.timeout_s, out=io.StringIO())
        rec.pushed[w] = round(time.time(), 3)
        self.fleet.push(devices, {d: rec.stale[d] for d in devices if d in rec.stale})
        rec.decide(f"wave {w + 1}: deployed to {len(todo)} devices"
                   + (f" ({len(devices) - len(todo)} had it already)" if todo != devices
                      else ""))
        self.save()
        self.timings.push_ms[w] = (time.monotonic() - t0) * 1000
        label = "canaries" if w == 0 else f"{len(devices)} devices"
        self.screen.say(f"wave {w + 1} of {len(rec.waves)} ({label}): deployed to {len(todo)}")

    def cancel(self) -> None:
        """Empty retained deploys to the devices that have not finished: they drop the
        release, and no device connecting later finds it on the broker."""
        rec = self.rec
        assert rec is not None
        self.fleet.cancel(rec.cancelled)
        if rec.cancelled:
            self.watch.publish([(f"{self.prefix}/{d}/models/{rec.name}/deploy", b"")
                                for d in rec.cancelled])
            n = len(rec.cancelled)
            self.screen.say(f"told {n} device{'' if n == 1 else 's'} in flight to drop the "
                            f"release: {few(rec.cancelled)}")
        rec.status = "aborted"
        self.save()

    # watching someone else's rollout

    def follow(self) -> None:
        rec = self.rec
        assert rec is not None
        seen, orphaned = -1, False
        while not rec.over:
            self.watch.check_lost()
            self.screen.show(rec, self.fleet)
            seen = self.fleet.wait(seen, self.tick_s)
            with self.watch.session.cond:
                raw, owner = self.watch.record_raw, self.watch.owner_raw
            if not owner and not orphaned:
                self.screen.say("nobody runs this rollout now (no owner on the broker): "
                                "--resume continues it; watching until someone does")
            orphaned = not owner
            if raw:
                new = Record.from_json(raw)
                if new.updated != rec.updated:
                    for d in new.decisions[len(rec.decisions):]:
                        self.screen.say(d["decision"])
                    self.rec = rec = new
                    self.sync()


def rollout(release_json: Path, broker_url: str, *, devices: Sequence[str] | None = None,
            options: Options | None = None, resume: bool = False, watch: bool = False,
            as_json: bool = False, urls: Sequence[str] = (), ca: Path | None = None,
            cert: Path | None = None, key: Path | None = None, username: str | None = None,
            password: str | None = None, prefix: str = "fog", timeout_s: float = 30.0,
            out: TextIO | None = None, err: TextIO | None = None,
            tick_s: float = TICK_S) -> int:
    """Run (or --resume, or --watch) the rollout of `release_json`; 0 when every wave was
    pushed and no gate stopped it, 1 when it aborted (the reason on `err`); raises
    ConfigError, ConnectError, OtaError or ReleaseError when it cannot run."""
    from agent.ota.push import Broker

    out, err = out or sys.stdout, err or sys.stderr
    if devices is not None:
        check_devices(devices)
    mode: Literal["new", "resume", "watch"] = "watch" if watch else (
        "resume" if resume else "new")
    if mode == "new" and devices is None:
        raise ConfigError("--devices FILE or --device ID is needed to start a rollout")
    broker = Broker(broker_url, ca, cert, key, username, password, timeout_s)
    r = _Run(release_json, broker, prefix=prefix, urls=urls, out=out, err=err,
             as_json=as_json, tick_s=tick_s)
    if mode != "watch":
        # A missing or altered artifact stops it before anything is sent.
        pushing = r.watch.push_mod
        pushing._check_artifact(pushing._artifact_beside(release_json), r.rel)
        # The broker clears the owner when this connection dies without a DISCONNECT.
        r.watch.client.will_set(r.watch.owner_topic, None, qos=1, retain=True)
    with r.watch.session:
        try:
            r.start(devices, options or Options(), mode)
            assert r.rec is not None
            if not r.rec.over:
                if mode == "watch":
                    r.follow()
                else:
                    r.drive()
        except KeyboardInterrupt:
            print("fogwhisk: interrupted; the rollout stays on the broker: --resume "
                  "continues it", file=err, flush=True)
            return EXIT_ABORTED
        finally:
            r.watch.close()
        return r.report()
