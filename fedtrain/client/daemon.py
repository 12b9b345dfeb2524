"""The silo trainer daemon (started as ``torchrun ... -m fedtrain.client.daemon_main``).

It owns, for the whole run, the FSDP-sharded model, the inner AdamW state, the data position
and the error-feedback residual, and answers the mailbox ClientApp on a Unix socket
(:mod:`fedtrain.protocol.localapi`). Rank 0 serves the socket and drives; the other ranks follow
(:class:`~fedtrain.client.sharded.ShardedTrainer`).

Requests (``header["op"]``):
- ``hello``: the run manifest plus the tokenizer file. The daemon checks it
  (:func:`~fedtrain.protocol.manifest.check_manifest`) and refuses with the mismatch, or builds —
  or restores from its work dir — the run's trainer.
- ``round``: round number, work, and either the last outer update (``downlink``, valid on top
  of global version ``base_version``) or full global ``weights``. Replies with the encoded
  update.
- ``finish``: the last outer update.
- ``leave``: the coordinator says this silo is not in the run (``reason``); recorded, answered.
- ``shutdown``: the launcher stops the daemon (it answers, then exits cleanly).

A request for a run this process has not opened (a restarted silo keeps its Flower node id
under node authentication, so the coordinator does not greet it again) first resumes that run
from the work dir (its manifest and newest snapshot); failing that, the error reply carries
``need_hello: true`` so the coordinator sends the manifest again.

What the operator sees: every join, round, refusal and the end of the run is appended to
``<work dir>/events.jsonl`` (:mod:`fedtrain.client.events`), which ``fedtrain client`` prints.

Versions and rollback: the daemon tracks which global version its anchor holds and refuses an
update meant for another version (the coordinator then sends full weights). After each round's
work it snapshots its whole state under ``runs/<run id>/round-<r>/`` and keeps the last two;
a ``round r`` request for a round it already worked on (the coordinator restarted from an
earlier commit) first rolls back to its snapshot from before round ``r``, so no round's work is
applied twice.

Fault injection (a test hook, :mod:`fedtrain.client.inject`): ``FEDTRAIN_FAULTS`` and
``FEDTRAIN_FAULTS_SHARE`` are read once at start; this silo's faults fire in ``round`` requests
as in simulation. Only rank 0 serves requests, so only rank 0 injects; unset, nothing changes.

The parts: this module (requests and the entry point), :mod:`~fedtrain.client.listener` (the
socket loop), :mod:`~fedtrain.client.snapshots` (per-round state) and
:mod:`~fedtrain.client.ranks` (what every rank builds; how ranks > 0 follow),
:mod:`~fedtrain.client.daemon_main` (the process entry point).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from fedtrain.client.events import EVENTS_FILE, EventLog
from fedtrain.client.listener import serve_socket
from fedtrain.client.ranks import announce_top, build_run
from fedtrain.client.snapshots import Snapshots
from fedtrain.runtime.children import peak_rss_bytes

log = logging.getLogger("fedtrain.daemon")

__all__ = ["Daemon", "Refused"]


class Refused(RuntimeError):
    """The request cannot be served; the reason goes back to the coordinator.

    ``need_hello``: the silo has no manifest for the request's run (the coordinator should
    send ``hello`` again)."""

    def __init__(self, reason: str, need_hello: bool = False) -> None:
        super().__init__(reason)
        self.need_hello = need_hello


class Daemon:
    """Rank 0's side: the socket server and the protocol state."""

    def __init__(self, args: argparse.Namespace, faults: Any = None) -> None:
        self.args = args
        self.silo: str = args.silo
        self.faults = faults
        """This silo's fault hooks (a SiloFaults; None: none, the normal case)."""
        self.work_dir = Path(args.work_dir)
        self.signing_key: Any = None
        if args.signing_key:  # the launcher checked the file exists
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
            from cryptography.hazmat.primitives.serialization import load_pem_private_key

            key = load_pem_private_key(Path(args.signing_key).read_bytes(), None)
            if not isinstance(key, Ed25519PrivateKey):
                raise SystemExit(f"--signing-key {args.signing_key}: not an Ed25519 private key")
            self.signing_key = key
        self.run_id: str | None = None
        self.run_dir: Path | None = None
        self.worker: Any = None
        self.heldout: torch.Tensor | None = None
        self.version = -1
        """Global version the anchor holds (-1: none yet)."""
        self.work_round = 0
        """Last round whose work this daemon did."""
        self.events = EventLog(self.work_dir / EVENTS_FILE)
        self.stopping = False
        """Set by a ``shutdown`` request: the socket loop ends after answering it."""

    # -------------------------------------------------------------- run state
    def _open_run(self, manifest: dict[str, Any], tokenizer: bytes) -> None:
        from fedtrain.client.worker import SiloWorker

        run_id = str(manifest["run_id"])
        if self.run_id == run_id:
            return
        if manifest["transport"]["sign_updates"] and self.signing_key is None:
            raise Refused("transport.sign_updates is on but this silo has no --signing-key")
        _precheck(manifest, self.silo)
        if self.worker is not None:
            self.worker.trainer.stop_followers()
        run_dir = self.work_dir / "runs" / run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(manifest["config_toml"])
        (run_dir / "tokenizer.json").write_bytes(tokenizer)
        (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
        announce_top("open", str(run_dir))
        cfg, trainer, sd = build_run(run_dir, self.silo, self.args.data)
        self.worker = SiloWorker(
            trainer,
            run_id=run_id,
            transport=cfg.transport,
            seed=cfg.run.seed,
            signing_key=self.signing_key,
        )
        self.heldout = sd.heldout
        self.run_id, self.run_dir = run_id, run_dir
        snaps = self._snaps().paths()
        resumed: int | None = None
        if snaps:
            self._restore(snaps[-1])
            resumed = self.work_round
            log.info("silo %s resumed run %s at round %d", self.silo, run_id, self.work_round)
        else:
            self.version, self.work_round = -1, 0
            self._snapshot()
            log.info("silo %s joined run %s (%s)", self.silo, run_id, sd.source)
        self.events.emit(
            "joined",
            run_id=run_id,
            preset=cfg.model.preset,
            params=sum(int(t.numel()) for t in trainer.anchor.values()),
            codec=cfg.transport.codec,
            resumed_round=resumed,
        )

    def reopen(self, run_id: str) -> bool:
        """Open ``run_id`` from this work dir (its manifest, tokenizer and newest snapshot), as
        a process that serves the silo for one message does; False if the silo never joined it."""
        if not run_id or Path(run_id).name != run_id or run_id.startswith("."):
            return False
        run_dir = self.work_dir / "runs" / run_id
        if not (run_dir / "manifest.json").exists() or not Snapshots.exist(run_dir):
            return False
        manifest = json.loads((run_dir / "manifest.json").read_text())
        self._open_run(manifest, (run_dir / "tokenizer.json").read_bytes())
        return True

    def _snaps(self) -> Snapshots:
        assert self.run_dir is not None
        return Snapshots(self.run_dir)

    def _snapshot(self) -> None:
        """Write the whole silo state after ``work_round``."""
        self._snaps().write(self.worker, self.version, self.work_round)

    def _restore(self, snap: Path) -> None:
        self.version, self.work_round = Snapshots.restore(self.worker, snap)

    def _rollback_before(self, rnd: int) -> None:
        earlier = self._snaps().before(rnd)
        if earlier is None:
            raise Refused(f"cannot roll back to before round {rnd}: no snapshot that old")
        self._restore(earlier)
        log.info("silo %s rolled back to its state after round %d", self.silo, self.work_round)

    # --------------------------------------------------------------- requests
    def handle(
        self, header: dict[str, Any], blobs: dict[str, bytes]
    ) -> tuple[dict[str, Any], dict[str, bytes]]:
        op = header.get("op")
        try:
            if op == "hello":
                return self._hello(header, blobs)
            if op == "shutdown":
                self.stopping = True
                return {"status": "ok", "silo": self.silo}, {}
            if op == "leave":
                return self._leave(header)
            run_id = str(header.get("run_id", ""))
            if run_id != self.run_id:
                self._resume(run_id)
            if op == "round":
                return self._round(header, blobs)
            if op == "finish":
                return self._finish(header, blobs)
            raise Refused(f"unknown request {op!r}")
        except Refused as e:
            if op == "round":
                self.events.emit("round_failed", round=header.get("round"), reason=str(e))
            err: dict[str, Any] = {"status": "error", "silo": self.silo, "reason": str(e)}
            if e.need_hello:
                err["need_hello"] = True
            return err, {}

    def _resume(self, run_id: str) -> None:
        """Open ``run_id`` from the work dir (a restarted daemon: the coordinator does not greet
        a node it knows again); Refused with ``need_hello`` when this silo never joined it."""
        try:
            self.reopen(run_id)
        except ValueError as e:
            raise Refused(str(e)) from None
        if self.worker is None or run_id != self.run_id:
            raise Refused("no manifest for this run yet (hello first)", need_hello=True)

    def _leave(self, header: dict[str, Any]) -> tuple[dict[str, Any], dict[str, bytes]]:
        reason = str(header.get("reason") or "the coordinator left this silo out of the run")
        log.warning("silo %s: the coordinator says: %s", self.silo, reason)
        self.events.emit("refused", run_id=header.get("run_id"), reason=reason)
        return {"status": "ok", "silo": self.silo}, {}

    def _status(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "silo": self.silo,
            "daemon_pid": os.getpid(),
            "daemon_peak_rss": peak_rss_bytes(),
            "version": self.version,
            "work_round": self.work_round,
            "snapshots": self._snaps().versions() if self.worker is not None else [],
            "nproc": self.worker.trainer.world if self.worker is not None else None,
        }

    def _hello(
        self, header: dict[str, Any], blobs: dict[str, bytes]
    ) -> tuple[dict[str, Any], dict[str, bytes]]:
        from fedtrain.protocol.manifest import check_manifest

        manifest = header["manifest"]
        try:
            problems = check_manifest(manifest, blobs.get("tokenizer", b""))
            if problems:
                raise Refused("manifest mismatch: " + "; ".join(problems))
            try:
                self._open_run(manifest, blobs["tokenizer"])
            except ValueError as e:
                raise Refused(str(e)) from None
        except Refused as e:
            self.events.emit("refused", run_id=manifest.get("run_id"), reason=str(e))
            raise
        return self._status(), {}

    def _apply(self, header: dict[str, Any], blobs: dict[str, bytes]) -> bytes | None:
        """Settle weights/version before work; return the downlink to apply (or None)."""
        from fedtrain.transport.payload import decode_payload

        if "weights" in blobs:
            self.worker.trainer.set_global(decode_payload(blobs["weights"]).tensors)
            if self.worker.feedback is not None:
                self.worker.feedback.discard()
            self.version = int(header["version"])
            return None
        if "downlink" in blobs:
            base = int(header["base_version"])
            if self.version != base:
                held, self.version = self.version, -1
                raise Refused(
                    f"needs full weights: holds global version {held}, the update applies to {base}"
                )
            self.version = base + 1
            return blobs["downlink"]
        return None

    def _round(
        self, header: dict[str, Any], blobs: dict[str, bytes]
    ) -> tuple[dict[str, Any], dict[str, bytes]]:
        from fedtrain.protocol.work import TrainWork, WorkFormatError, work_from_json

        rnd = int(header["round"])
        if self.faults is not None:
            self.faults.before_work(rnd)
        missed = list(range(self.work_round + 1, rnd)) if self.work_round else []
        if self.work_round >= rnd:
            self._rollback_before(rnd)
        downlink = self._apply(header, blobs)
        try:
            work = work_from_json(header["work"])
        except WorkFormatError as e:
            raise Refused(str(e)) from None
        if not isinstance(work, TrainWork):
            raise Refused(f"work of kind {work.kind!r} is not available in deployment")
        t0 = time.perf_counter()
        result = self.worker.handle(rnd, work, downlink)
        compute_s = time.perf_counter() - t0
        heldout = self.worker.trainer.loss_on(self.heldout) if self.heldout is not None else None
        self.work_round = rnd
        self._snapshot()
        reply = {
            **self._status(),
            "round": rnd,
            "steps": result.stats.steps,
            "tokens": result.stats.tokens,
            "train_loss": result.stats.mean_loss,
            "heldout_loss": heldout,
            "compute_s": round(compute_s, 4),
            "step": self.worker.trainer.step,
        }
        log.info(
            "round %d: %d steps, train loss %.4f, held-out %.4f, %.1fs",
            rnd,
            result.stats.steps,
            result.stats.mean_loss,
            heldout if heldout is not None else float("nan"),
            compute_s,
        )
        payload = result.payload
        if self.faults is not None:
            deadline = header.get("deadline_unix")
            try:
                payload = self.faults.reply(
                    rnd,
                    payload,
                    key=self.worker.signing_key,
                    deadline_unix=None if deadline is None else float(deadline),
                )
            except ValueError as e:
                raise Refused(f"injected fault in round {rnd}: {e}") from None
        self.events.emit(
            "round",
            run_id=self.run_id,
            round=rnd,
            steps=result.stats.steps,
            loss=result.stats.mean_loss,
            heldout_loss=heldout,
            bytes_up=len(payload),
            bytes_down=sum(len(b) for b in blobs.values()),
            seconds=round(compute_s, 3),
            missed=missed,
        )
        return reply, {"payload": payload}

    def _finish(
        self, header: dict[str, Any], blobs: dict[str, bytes]
    ) -> tuple[dict[str, Any], dict[str, bytes]]:
        downlink = self._apply(header, blobs)
        if downlink is not None:
            self.worker.receive(downlink)
        log.info(
            "silo %s: run %s finished at global version %d", self.silo, self.run_id, self.version
        )
        self.events.emit("finished", run_id=self.run_id, version=self.version)
        return self._status(), {}

    # ----------------------------------------------------------------- server
    def serve(self) -> None:
        """Answer the mailbox on the daemon's socket until the launcher is gone."""
        a = self.args
        serve_socket(
            a.socket,
            a.ready_file,
            a.parent_pid,
            self.handle,
            silo=self.silo,
            done=lambda: self.stopping,
        )

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.trainer.stop_followers()
        announce_top("exit", "")


def _precheck(manifest: dict[str, Any], silo: str) -> None:
    """Refuse on rank 0, before the other ranks start building, what would fail there."""
    import tomllib

    from fedtrain.config import config_from_dict

    cfg = config_from_dict(tomllib.loads(manifest["config_toml"]))
    if silo not in cfg.silo_names():
        raise Refused(f"silo {silo!r} is not in this run (silos: {', '.join(cfg.silo_names())})")
    world = dist.get_world_size()
    if cfg.train.batch_size % world:
        raise Refused(
            f"train.batch_size = {cfg.train.batch_size} does not split over this silo's "
            f"{world} processes (--nproc)"
        )
