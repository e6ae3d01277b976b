"""The group commit's cadence: when the next commit starts, and what waits meanwhile.

A commit starts `commit_interval_ms` after the previous one started at the
soonest; enough inputs waiting (`early`, a share of the broker's inbound window)
or the sender waiting for deletes (`hurry`) end the interval at once. While input
is sparse it waits in its socket during each commit and until the next may start,
and is then read in one go; so do PUBACKs (`quiet`): a few loop wake-ups per
commit instead of a few per message. One timer per commit, never one per message.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

# Inputs waiting for their commit that end the commit interval early, as a share of
# how many unacknowledged messages the broker may send (`Intake.inbound_window`): it
# sends nothing more until they are acknowledged. Without an intake: Mosquitto's
# default limit of 20.
EARLY_SHARE = 0.75
EARLY_INPUTS = 16


class Pausable(Protocol):
    """A connection whose input may wait in its socket for a while (`Outbox.quiet`)."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class Intake(Pausable, Protocol):
    """Where the input comes from (the local broker's connection)."""

    @property
    def inbound_window(self) -> int: ...


class Cadence:
    """The commit interval's clock and the sockets that wait for it (loop thread only)."""

    def __init__(self) -> None:
        self.wake = asyncio.Event()  # something waits for a commit
        self.window: asyncio.Future[None] | None = None  # the commit interval running
        self.early = EARLY_INPUTS  # inputs waiting that end it early
        self.urgent = False  # the sender waits for deletes: commit without waiting
        # The local broker's connection (`intake`) and the uplink's (`quiet`).
        self.intake: Intake | None = None
        self.quiet: list[Pausable] = []
        self.holding = False

    def follow_intake(self) -> None:
        """Size `early` to the intake's window (its MQTT version may change at a reconnect)."""
        if self.intake is not None:
            self.early = max(1, int(self.intake.inbound_window * EARLY_SHARE))

    def hurry(self) -> None:
        """Start the next commit now, without waiting for the commit interval."""
        if not self.urgent:
            self.urgent = True
            self.wake.set()
            self.end_window()

    def end_window(self) -> None:
        window = self.window
        if window is not None and not window.done():
            window.set_result(None)

    def hold(self, on: bool) -> None:
        """Leave the input in its socket (on) or read it as it comes (off)."""
        intake = self.intake
        if intake is not None and on != self.holding:
            self.holding = on
            if on:
                intake.pause_reading()
            else:
                intake.resume_reading()

    async def until(self, when: float) -> None:
        """Wait until the loop's clock reads `when`, or less: enough inputs (`submit`) or
        the sender waiting for deletes (`settle_soon`) end the wait early. One timer per
        commit, never one per message."""
        loop = asyncio.get_running_loop()
        wait = when - loop.time()
        if wait <= 0:
            return
        self.window = window = loop.create_future()
        timer = loop.call_later(wait, _resolve, window)
        try:
            await window
        finally:
            timer.cancel()
            self.window = None

    async def quiet_until(self, until: float) -> None:
        """Sparse input: until the next commit may start (`until`), what comes waits in
        the sockets (the input's, and those in `quiet`); then it is read in one go.
        One loop wake-up per commit interval instead of one per message or PUBACK."""
        for p in self.quiet:
            p.pause_reading()
        try:
            if not self.urgent:
                await self.until(until)
        finally:
            self.hold(False)
            for p in self.quiet:
                p.resume_reading()
        # The loop polls the sockets in its next iteration and runs their callbacks
        # (submits, PUBACKs) in the one after: then the next commit takes all of it.
        await asyncio.sleep(0)
        await asyncio.sleep(0)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
