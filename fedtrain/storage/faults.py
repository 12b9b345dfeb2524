"""Test-only crash injection: SIGKILL this process at a named phase of a given round.

Set ``FEDTRAIN_KILL_AT=PHASE@ROUND`` (e.g. ``state_written@2``) in the environment of a run;
the run store calls :meth:`KillSwitch.check` at each phase of the commit protocol, so crash
tests are reproducible. Unset, it does nothing.
"""

from __future__ import annotations

import os
import signal

__all__ = ["PHASES", "KillSwitch"]

PHASES = (
    "round_started",  # the round is marked started in the index
    "updates_stored",  # every reply's payload is a blob and indexed
    "blob_tmp_written",  # inside a blob write: temp file written, not yet renamed
    "state_written",  # every blob of the new state is written, round not yet committed
    "committed",  # the index says committed; metrics.jsonl not yet appended
    "pruned_index",  # old rounds no longer reference their blobs; the blobs not yet deleted
    "published",  # metrics.jsonl appended, old checkpoints pruned
)


class KillSwitch:
    def __init__(self, spec: str | None = None) -> None:
        spec = spec if spec is not None else os.environ.get("FEDTRAIN_KILL_AT", "")
        self.phase, self.round = None, None
        if spec:
            phase, _, rnd = spec.partition("@")
            if phase not in PHASES or not rnd.isdigit():
                raise ValueError(
                    f"FEDTRAIN_KILL_AT={spec!r}: expected PHASE@ROUND, PHASE one of {list(PHASES)}"
                )
            self.phase, self.round = phase, int(rnd)
        self.current_round = 0

    def check(self, phase: str, rnd: int | None = None) -> None:
        """Kill the process now if this is the configured (phase, round)."""
        rnd = self.current_round if rnd is None else rnd
        if self.phase == phase and self.round == rnd:
            os.kill(os.getpid(), signal.SIGKILL)
