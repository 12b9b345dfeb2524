"""The silo trainer daemon: ``torchrun --nproc-per-node N -m fedtrain.client.daemon ...``.

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
:mod:`~fedtrain.client.ranks` (what every rank builds; how ranks > 0 follow).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from fedtrain.client.listener import serve_socket
from fedtrain.client.ranks import announce_top, build_run, follow
from fedtrain.client.snapshots import Snapshots
from fedtrain.runtime.children import peak_rss_bytes

log = logging.getLogger("fedtrain.daemon")

__all__ = ["Daemon", "Refused", "main"]


class Refused(RuntimeError):
    """The request cannot be served; the reason goes back to the coordinator."""


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
        if snaps:
            self._restore(snaps[-1])
            log.info("silo %s resumed run %s at round %d", self.silo, run_id, self.work_round)
        else:
            self.version, self.work_round = -1, 0
            self._snapshot()
            log.info("silo %s joined run %s (%s)", self.silo, run_id, sd.source)

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
            if self.worker is None or header.get("run_id") != self.run_id:
                raise Refused("no manifest for this run yet (hello first)")
            if op == "round":
                return self._round(header, blobs)
            if op == "finish":
                return self._finish(header, blobs)
            raise Refused(f"unknown request {op!r}")
        except Refused as e:
            return {"status": "error", "silo": self.silo, "reason": str(e)}, {}

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
        problems = check_manifest(manifest, blobs.get("tokenizer", b""))
        if problems:
            raise Refused("manifest mismatch: " + "; ".join(problems))
        try:
            self._open_run(manifest, blobs["tokenizer"])
        except ValueError as e:
            raise Refused(str(e)) from None
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
        return self._status(), {}

    # ----------------------------------------------------------------- server
    def serve(self) -> None:
        """Answer the mailbox on the daemon's socket until the launcher is gone."""
        a = self.args
        serve_socket(a.socket, a.ready_file, a.parent_pid, self.handle, silo=self.silo)

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


def _refuse_to_start(message: str) -> int:
    """Print ``message`` and return the exit code; under torchrun, also hand it to torchrun's
    error file, so its failure report (the end of the log the launcher shows) names it."""
    print(f"fedtrain.client.daemon: {message}", file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        with contextlib.suppress(OSError):
            Path(error_file).write_text(
                json.dumps({"message": message, "timestamp": int(time.time())})
            )
    return 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedtrain.client.daemon")
    p.add_argument("--silo", required=True)
    p.add_argument("--work-dir", required=True)
    p.add_argument("--socket", required=True)
    p.add_argument("--ready-file", required=True)
    p.add_argument("--data", default=None)
    p.add_argument("--signing-key", default=None)
    p.add_argument("--parent-pid", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s daemon[{os.environ.get('RANK', '0')}] %(message)s",
        stream=sys.stderr,
    )
    from fedtrain.client.inject import SiloFaults

    try:
        faults = SiloFaults.from_env(args.silo)
    except ValueError as e:  # before the process group: every rank exits with the one line
        return _refuse_to_start(str(e))
    if faults is not None and os.environ.get("RANK", "0") == "0":
        log.warning("%s", faults.describe())
    # NCCL with one GPU per local rank where there are GPUs, gloo on CPU.
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=timedelta(days=30))
    world = dist.get_world_size()
    threads = args.threads or max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    try:
        if dist.get_rank() == 0:
            daemon = Daemon(args, faults)
            try:
                daemon.serve()
            finally:
                daemon.stop()
        else:
            follow(args.silo, args.data)
        dist.barrier()
    except KeyboardInterrupt:
        return 130
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from fedtrain.client.sharded import exit_rank

    exit_rank(main())
