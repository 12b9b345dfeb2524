"""Fault injection in a deployed silo's trainer daemon (a test hook; unset, nothing changes).

``FEDTRAIN_FAULTS`` (comma-separated ``KIND@SILO:ROUND[=VALUE]``, see
:mod:`fedtrain.transport.faults`) is read once when the daemon starts; this silo's faults fire in
its ``round`` requests as they do in simulation:

- ``kill`` SIGKILLs rank 0 before any work (torchrun then stops the other ranks and exits, and
  ``fedtrain client`` fails with the daemon);
- ``delay`` sleeps VALUE seconds before replying;
- ``drop`` does the round's work and holds the reply until one second past the round's deadline
  (the coordinator sends it with the work), so the coordinator never sees it in its round —
  the reply then reaches a round that no longer waits for it;
- ``impersonate`` sends another silo's honest payload of the same round instead of its own:
  silos that should leak their payloads (colluding, or captured on the path) share a directory
  named by ``FEDTRAIN_FAULTS_SHARE``, where every daemon with it set writes each honest reply
  (``round-<r>/<silo>.bin``); the impersonator waits for one of another silo's;
- the payload kinds replace the honest reply, signed with the silo's own key.

``duplicate`` cannot be injected by a deployed silo (Flower carries exactly one reply per
message) and is refused at start, as is ``impersonate`` without a shared directory.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedtrain.storage.rundir import atomic_write_bytes
from fedtrain.transport.faults import Fault, FaultPlan, parse_fault, tamper

__all__ = ["FAULTS_ENV", "SHARE_ENV", "SiloFaults"]

log = logging.getLogger("fedtrain.daemon")

FAULTS_ENV = "FEDTRAIN_FAULTS"
SHARE_ENV = "FEDTRAIN_FAULTS_SHARE"
DEPLOYED_NEVER = ("duplicate",)
"""Kinds a deployed silo cannot inject: Flower carries exactly one reply per message."""


class SiloFaults:
    """One deployed silo's injected faults and its shared payload directory."""

    def __init__(
        self,
        silo: str,
        plan: FaultPlan | None,
        share: Path | None = None,
        *,
        wait_s: float = 120.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.silo, self.plan, self.share = silo, plan, share
        self.wait_s = wait_s
        """How long ``impersonate`` waits for another silo's payload of the round."""
        self.clock, self.sleep = clock, sleep

    @classmethod
    def from_env(cls, silo: str, environ: Mapping[str, str] = os.environ) -> SiloFaults | None:
        """This silo's hooks from the environment, or None when neither variable is set.

        ValueError naming the spec for a malformed one or a kind a deployed silo cannot inject;
        every spec is checked, also those for other silos (one variable may serve several).
        """
        text = environ.get(FAULTS_ENV, "")
        share = Path(environ[SHARE_ENV]) if environ.get(SHARE_ENV, "").strip() else None
        mine: list[Fault] = []
        for spec in (s.strip() for s in text.split(",")):
            if not spec:
                continue
            try:
                fault = parse_fault(spec)
            except ValueError as e:
                raise ValueError(f"{FAULTS_ENV}: {e}") from None
            if fault.kind in DEPLOYED_NEVER:
                raise ValueError(
                    f"{FAULTS_ENV}: fault {spec!r}: {fault.kind} cannot be injected by a deployed "
                    "silo (Flower carries exactly one reply per message; simulation only)"
                )
            if fault.kind == "impersonate" and share is None:
                raise ValueError(
                    f"{FAULTS_ENV}: fault {spec!r}: impersonate needs {SHARE_ENV}, a directory "
                    "the silos share their payloads in"
                )
            if fault.silo == silo:
                mine.append(fault)
        if not mine and share is None:
            return None
        return cls(silo, FaultPlan(mine) if mine else None, share)

    def describe(self) -> str:
        faults = ", ".join(map(str, self.plan.faults)) if self.plan is not None else "none"
        shared = f"; payloads shared in {self.share}" if self.share is not None else ""
        return f"fault injection on for silo {self.silo}: {faults}{shared}"

    def at(self, rnd: int) -> list[Fault]:
        return self.plan.at(self.silo, rnd) if self.plan is not None else []

    def before_work(self, rnd: int) -> None:
        """``kill``: die before any work, like the simulation's killed silo."""
        for f in self.at(rnd):
            if f.kind == "kill":
                log.warning("injected fault %s: SIGKILL to rank 0 (pid %d)", f, os.getpid())
                os.kill(os.getpid(), signal.SIGKILL)

    def reply(
        self, rnd: int, payload: bytes, *, key: Any = None, deadline_unix: float | None = None
    ) -> bytes:
        """What this silo sends instead of its honest ``payload`` (ValueError: cannot)."""
        if self.share is not None:
            mine = self._shared(rnd, self.silo)
            mine.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(mine, payload)
        if self.plan is None:
            return payload
        previous = self.plan.remember(self.silo, payload)
        for f in self.at(rnd):
            if f.kind == "delay":
                log.warning("injected fault %s: replying %gs late", f, f.value)
                self.sleep(f.value)
                continue
            if f.kind == "drop":
                self._hold_past(f, deadline_unix)
                continue
            other = self._other(rnd) if f.kind == "impersonate" else None
            payload = tamper(f, payload, key=key, previous=previous, other=other)[0]
            log.warning("injected fault %s: round %d reply replaced", f, rnd)
        return payload

    def _hold_past(self, f: Fault, deadline_unix: float | None) -> None:
        if deadline_unix is None:
            raise ValueError("drop needs the round's deadline, which this coordinator did not send")
        hold = max(0.0, deadline_unix + 1.0 - self.clock())
        log.warning("injected fault %s: holding the reply %.1fs, past the round's end", f, hold)
        self.sleep(hold)

    def _shared(self, rnd: int, silo: str) -> Path:
        assert self.share is not None
        return self.share / f"round-{rnd:06d}" / f"{silo}.bin"

    def _other(self, rnd: int) -> bytes:
        """Another silo's honest payload of round ``rnd`` from the shared directory."""
        assert self.share is not None  # from_env refuses impersonate without it
        folder = self._shared(rnd, self.silo).parent
        give_up = self.clock() + self.wait_s
        while True:
            others = sorted(p for p in folder.glob("*.bin") if p.stem != self.silo)
            if others:
                return others[0].read_bytes()
            if self.clock() > give_up:
                raise ValueError(
                    f"no other silo's payload of round {rnd} appeared in {folder} "
                    f"within {self.wait_s:.0f}s"
                )
            self.sleep(0.2)
