"""`fogwhisk model rollout`: a release goes out in waves, and stops itself.

    canaries (--canary, default 2) -> waves growing by --wave-factor (4, 8, 16, ...)

Each wave is pushed as `fogwhisk model push` pushes (agent.ota.push) and watched on the
devices' retained state reports until every device in it is committed, rejected, rolled
back or timed out (--wave-timeout). The rollout stops itself when

  - the failed devices (rejected, rolled back, timed out) reach --max-failed of the devices
    pushed so far: the share of the finished ones is then at least as high, whatever the
    others still do (decided as soon as it is certain, at the latest when the wave ends);
  - the canaries' median shadow agreement (`update.shadow.f1` of their reports) is under
    --min-agreement (no canary reporting one: the gate is skipped, the summary says so).

Then no further device gets the release, and the pushed devices that have not finished
are told to drop it: an empty retained deploy, which also removes the retained release
from the broker (docs/ota.md, "Rollouts", says why this and not a signed cancel).

The rollout's own state is retained on the broker, so a closed laptop or a kill -9
loses nothing (--resume continues it without pushing a device twice) and a second
operator sees the same rollout (--watch):

    <prefix>/_rollouts/<name>-<version>        the plan, the waves pushed, the decisions
    <prefix>/_rollouts/<name>-<version>/owner  the process running it; its last will
                                               clears it when the connection dies

The modules, one noun each:

    plan     the options, the devices and the waves (pure)
    fleet    the devices' state reports and the counts the decisions read
    gates    --max-failed, --min-agreement and `judge`: what to do next (pure)
    record   the rollout's retained record and its owner
    watch    the connection to the broker (paho, imported only when a rollout runs)
    report   the live table, the summary (text or JSON), the exit code
    run      one run: start or resume or follow, push the waves, act on the decisions
    cli      the command line

Operator side only: paho is imported when a rollout runs, not with the CLI.
"""

from agent.ota.rollout.cli import add_parser, main
from agent.ota.rollout.fleet import (
    CANCELLED,
    DONE,
    FAILED,
    FINAL,
    MAX_REPORT_BYTES,
    Fleet,
    Report,
    read_report,
)
from agent.ota.rollout.gates import Agreement, Verdict, agreement, judge
from agent.ota.rollout.plan import MaxFailed, Options, check_devices, plan_waves, read_devices
from agent.ota.rollout.record import KIND, SPEC, Record
from agent.ota.rollout.report import EXIT_ABORTED, EXIT_OK, SHOW_S, SHOWN_FAILURES
from agent.ota.rollout.run import TICK_S, rollout

__all__ = [
    "CANCELLED", "DONE", "EXIT_ABORTED", "EXIT_OK", "FAILED", "FINAL", "KIND",
    "MAX_REPORT_BYTES", "SHOWN_FAILURES", "SHOW_S", "SPEC", "TICK_S", "Agreement", "Fleet",
    "MaxFailed", "Options", "Record", "Report", "Verdict", "add_parser", "agreement",
    "check_devices", "judge", "main", "plan_waves", "read_devices", "read_report", "rollout",
]
