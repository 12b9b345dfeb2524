"""The trainer daemon's process entry point: ``torchrun ... -m fedtrain.client.daemon_main``.

Every rank joins the process group; rank 0 serves the mailbox (:class:`~fedtrain.client.daemon.
Daemon`), the others follow it (:func:`~fedtrain.client.ranks.follow`). A ``shutdown`` request
from the launcher ends rank 0's loop, which tells the other ranks to exit, so every rank leaves
cleanly and torchrun exits 0 (no signal, no torchrun traceback).

A rank that fails writes its one-line reason (``ExcType: message``) to ``<work dir>/daemon.error``
(the first failing rank wins: the others then fail on the broken process group), so the
launcher can show the real reason instead of torchrun's failure report.
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

__all__ = ["main", "write_error"]

log = logging.getLogger("fedtrain.daemon")


def write_error(work_dir: str | Path, message: str) -> None:
    """Record ``message`` as the daemon's failure unless a rank already recorded one."""
    from fedtrain.client.events import ERROR_FILE

    line = " ".join(message.split())  # one line
    with contextlib.suppress(OSError), (Path(work_dir) / ERROR_FILE).open("x") as f:
        f.write(line + "\n")


def _refuse_to_start(message: str, work_dir: str) -> int:
    """Print ``message`` and return the exit code; under torchrun, also hand it to torchrun's
    error file, so its failure report (the end of the log the launcher shows) names it."""
    print(f"fedtrain.client.daemon: {message}", file=sys.stderr, flush=True)
    write_error(work_dir, message)
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
        return _refuse_to_start(str(e), args.work_dir)
    if faults is not None and os.environ.get("RANK", "0") == "0":
        log.warning("%s", faults.describe())
    try:
        return _run(args, faults)
    except KeyboardInterrupt:
        return 130
    except SystemExit as e:  # a bad argument found while starting (e.g. the signing key)
        if isinstance(e.code, str):
            write_error(args.work_dir, e.code)
        raise
    except Exception as e:
        write_error(args.work_dir, f"{type(e).__name__}: {e}")
        raise


def _run(args: argparse.Namespace, faults: object) -> int:
    import torch
    import torch.distributed as dist

    from fedtrain.client.daemon import Daemon
    from fedtrain.client.ranks import follow

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
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from fedtrain.client.sharded import exit_rank

    exit_rank(main())
