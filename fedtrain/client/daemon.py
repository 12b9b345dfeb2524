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
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from fedtrain.runtime.children import peak_rss_bytes

log = logging.getLogger("fedtrain.daemon")

__all__ = ["main"]

KEEP_SNAPSHOTS = 2


class Refused(RuntimeError):
    """The request cannot be served; the reason goes back to the coordinator."""


def _build(run_dir: Path, silo: str, data: str | None) -> tuple[Any, Any, Any]:
    """(cfg, ShardedTrainer, SiloData) for the run whose manifest is in ``run_dir`` (all ranks)."""
    from fedtrain.client.sharded import ShardedTrainer
    from fedtrain.config import load_config
    from fedtrain.data.prepare import silo_data
    from fedtrain.data.stream import TokenStream
    from fedtrain.data.tokenizer import load_tokenizer
    from fedtrain.models.llama import build_model
    from fedtrain.models.presets import PRESETS

    cfg = load_config(run_dir / "config.toml")
    tok = load_tokenizer(run_dir / "tokenizer.json")
    sd = silo_data(cfg, silo, tok, data)
    model = build_model(
        PRESETS[cfg.model.preset], tok.vocab_size, cfg.run.seed, tie=cfg.model.tie_embeddings
    )
    trainer = ShardedTrainer(
        silo, model, TokenStream(sd.tokens, cfg.run.seed, silo), cfg.train, cfg.total_inner_steps()
    )
    return cfg, trainer, sd


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
        _announce_top("open", str(run_dir))
        cfg, trainer, sd = _build(run_dir, self.silo, self.args.data)
        self.worker = SiloWorker(
            trainer,
            run_id=run_id,
            transport=cfg.transport,
            seed=cfg.run.seed,
            signing_key=self.signing_key,
        )
        self.heldout = sd.heldout
        self.run_id, self.run_dir = run_id, run_dir
        snaps = self._snapshots()
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
        if not (run_dir / "manifest.json").exists() or not self._has_snapshot(run_dir):
            return False
        manifest = json.loads((run_dir / "manifest.json").read_text())
        self._open_run(manifest, (run_dir / "tokenizer.json").read_bytes())
        return True

    @staticmethod
    def _has_snapshot(run_dir: Path) -> bool:
        return any((p / "state.json").exists() for p in run_dir.glob("round-*"))

    def _snapshots(self) -> list[Path]:
        assert self.run_dir is not None
        return sorted(p for p in self.run_dir.glob("round-*") if (p / "state.json").exists())

    def _snapshot(self) -> None:
        """Write the whole silo state after ``work_round`` (atomic: temp dir, then rename)."""
        from safetensors.torch import save_file

        assert self.run_dir is not None
        final = self.run_dir / f"round-{self.work_round:06d}"
        tmp = self.run_dir / f".tmp-round-{self.work_round:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        tensors, meta = self.worker.state_tensors()
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "rank0.safetensors"))
        self.worker.trainer.save_shards(tmp)
        state = {"version": self.version, "work_round": self.work_round, "meta": meta}
        (tmp / "state.json").write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in self._snapshots()[:-KEEP_SNAPSHOTS]:
            shutil.rmtree(old, ignore_errors=True)

    def _restore(self, snap: Path) -> None:
        from safetensors.torch import load_file

        state = json.loads((snap / "state.json").read_text())
        self.worker.load_state_tensors(load_file(str(snap / "rank0.safetensors")), state["meta"])
        self.worker.trainer.load_shards(snap)
        self.version, self.work_round = int(state["version"]), int(state["work_round"])

    def _rollback_before(self, rnd: int) -> None:
        earlier = [s for s in self._snapshots() if _work_round(s) < rnd]
        if not earlier:
            raise Refused(f"cannot roll back to before round {rnd}: no snapshot that old")
        self._restore(earlier[-1])
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
            "snapshots": self._snapshot_versions() if self.worker is not None else [],
            "nproc": self.worker.trainer.world if self.worker is not None else None,
        }

    def _snapshot_versions(self) -> list[list[int]]:
        """``[work_round, version]`` of each kept snapshot, oldest first."""
        out = []
        for snap in self._snapshots():
            state = json.loads((snap / "state.json").read_text())
            out.append([int(state["work_round"]), int(state["version"])])
        return out

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
        from fedtrain.strategies.base import Work

        rnd = int(header["round"])
        if self.faults is not None:
            self.faults.before_work(rnd)
        if self.work_round >= rnd:
            self._rollback_before(rnd)
        downlink = self._apply(header, blobs)
        w = header["work"]
        if w["kind"] != "train":
            raise Refused(f"work of kind {w['kind']!r} is not available in deployment")
        work = Work(kind=w["kind"], steps=int(w["steps"]), names=w.get("names"), extra=w["extra"])
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
        from fedtrain.protocol.localapi import LocalAPIError, read_frame, write_frame

        path = self.args.socket
        if os.path.exists(path):
            os.unlink(path)
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(path)
        os.chmod(path, 0o600)
        srv.listen(8)
        srv.settimeout(1.0)
        Path(self.args.ready_file).write_text(str(os.getpid()))
        log.info("silo %s trainer daemon listening on %s", self.silo, path)
        parent = self.args.parent_pid
        while True:
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                if parent and not _alive(parent):
                    log.info("launcher %d is gone; stopping", parent)
                    return
                continue
            with conn:
                conn.settimeout(None)
                try:
                    header, blobs = read_frame(conn)
                except LocalAPIError as e:
                    log.warning("bad request on the local socket: %s", e)
                    continue
                reply, out = self.handle(header, blobs)
                try:
                    write_frame(conn, reply, out)
                except OSError as e:
                    log.warning("could not answer the mailbox: %s", e)

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.trainer.stop_followers()
        _announce_top("exit", "")


def _work_round(snapshot: Path) -> int:
    """The round a snapshot directory (``round-<r>``) was written after."""
    return int(snapshot.name.removeprefix("round-"))


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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _announce_top(op: str, arg: str) -> None:
    if dist.get_world_size() > 1:
        dist.broadcast_object_list([(op, arg)], src=0)


def _follow(args: argparse.Namespace) -> None:
    """Ranks > 0: build the trainer for each run rank 0 opens and follow its operations."""
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        op, arg = box[0]
        if op == "exit":
            return
        _, trainer, _ = _build(Path(arg), args.silo, args.data)
        trainer.follow()


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
            _follow(args)
        dist.barrier()
    except KeyboardInterrupt:
        return 130
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from fedtrain.client.sharded import exit_rank

    exit_rank(main())
