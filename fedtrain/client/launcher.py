"""``fedtrain client --silo NAME --server HOST:PORT``: a silo's processes.

1. The trainer daemon: ``torchrun --standalone --nproc-per-node N -m fedtrain.client.daemon``
   (FSDP2 over N local processes; gloo on CPU), listening on a Unix socket in the work dir.
2. A ``flower-supernode`` connected to the coordinator, whose ``--node-config`` names the silo
   and the daemon's socket; its ClientApp (:mod:`fedtrain.client.app`) is the mailbox.

Both are watched (:class:`~fedtrain.client.supernode.Watch`): the SuperNode is reconnected
when the coordinator goes away or no longer knows it, a refused node activation is retried for a
bounded time, and the daemon's events (:mod:`fedtrain.client.events`) are printed, one line
each. The command exits 0 when the run finishes (``--stay``: keeps serving the next run), 3 when
the silo is refused or not in the run, 1 with the daemon's own reason when it fails. Ctrl-C stops
both: the daemon first, over its socket (a clean exit), then what is left. The daemon's state
lives in the work dir, so starting the command again resumes where the silo was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fedtrain.client.events import ERROR_FILE, EVENTS_FILE, EventTail, failure_reason
from fedtrain.client.supernode import Watch, say, supernode_command
from fedtrain.runtime.children import (
    Children,
    Stop,
    free_port,
    install_stop_handlers,
    stop_flower_apps,
)

__all__ = ["ClientOptions", "check_data", "run_client"]


@dataclass(slots=True)
class ClientOptions:
    silo: str
    server: str
    data: str | None = None
    nproc: int = 1
    work_dir: Path | None = None
    tls_ca: Path | None = None
    auth_key: Path | None = None
    signing_key: Path | None = None
    threads: int = 0
    stay: bool = False
    """Keep serving after a run finishes (the next run reaches the same daemon)."""


def _socket_path(work_dir: Path) -> str:
    path = work_dir / "daemon.sock"
    if len(str(path)) < 100:  # AF_UNIX paths are limited to ~108 bytes
        return str(path)
    digest = hashlib.sha256(str(work_dir).encode()).hexdigest()[:16]
    return str(Path(tempfile.gettempdir()) / f"fedtrain-{digest}.sock")


def _check(opts: ClientOptions) -> None:
    if ":" not in opts.server:
        raise ValueError(f"--server must be HOST:PORT, got {opts.server!r}")
    if opts.nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {opts.nproc}")
    for flag, path in (
        ("--tls-ca", opts.tls_ca),
        ("--auth-key", opts.auth_key),
        ("--signing-key", opts.signing_key),
    ):
        if path is not None and not path.exists():
            raise ValueError(f"{flag} {path}: file not found")
    if opts.auth_key is not None and not Path(f"{opts.auth_key}.pub").exists():
        raise ValueError(
            f"--auth-key {opts.auth_key}: its public key {opts.auth_key}.pub is missing"
        )
    if opts.auth_key is not None and opts.tls_ca is None:
        raise ValueError("--auth-key needs --tls-ca: node authentication runs over TLS")
    if opts.data is not None:
        check_data(opts.data)


_SAMPLE_BYTES = 1 << 14
"""How much of each --data file is read to check it is text (never the whole file)."""


def check_data(url: str) -> int:
    """Check ``--data`` before anything starts: it matches files (path, glob or fsspec URL, as
    :func:`fedtrain.data.sources.expand_sources` reads it) and their first bytes are UTF-8
    text (jsonl: a first line with a 'text' field), not all empty; or it is a directory made
    by ``fedtrain data prepare`` whose shards are all there, at their sizes. Returns the file
    (shard) count; ValueError (one line) otherwise."""
    import fsspec

    from fedtrain.data.shards import ShardError, TokenShards, is_prepared

    if is_prepared(url):
        try:
            return len(TokenShards.open(url, verify=False).index["shards"])
        except ShardError as e:
            raise ValueError(f"--data {url!r}: {e}") from None

    from fedtrain.data.sources import expand_sources

    try:
        # A directory: every file of a supported format under it.
        paths = [f.url for f in expand_sources([url])] if Path(url).is_dir() else url
        files = fsspec.open_files(paths, mode="rb")
    except (OSError, ValueError, ImportError) as e:
        raise ValueError(f"--data {url!r}: cannot open: {e}") from None
    if not files:
        raise ValueError(f"--data {url!r}: no files match")
    empty = True
    for of in files:
        try:
            with of as f:
                head = f.read(_SAMPLE_BYTES + 1)
        except FileNotFoundError:
            raise ValueError(f"--data {url!r}: no such file ({of.path})") from None
        except OSError as e:
            raise ValueError(f"--data {url!r}: cannot read {of.path}: {e}") from None
        if of.path.endswith((".gz", ".zst", ".parquet")):
            empty = empty and not head
            continue  # compressed / columnar: its records are checked as they are prepared
        try:
            text = _sample_text(of.path, head[:_SAMPLE_BYTES], len(head) <= _SAMPLE_BYTES)
        except ValueError as e:
            raise ValueError(f"--data {url!r}: {e}") from None
        empty = empty and not text.strip()
    if empty:
        raise ValueError(f"--data {url!r}: no text found ({len(files)} file(s), all empty)")
    return len(files)


def _sample_text(path: str, head: bytes, complete: bool) -> str:
    """The decoded start of one --data file; ValueError when it is binary or bad jsonl."""
    import codecs

    if b"\0" in head:
        raise ValueError(f"{path} is not a text file (binary data)")
    try:
        # A sample cut mid-character is fine (the decoder keeps the partial tail back); an
        # invalid byte anywhere before the cut is not.
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=complete)
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    if path.endswith(".jsonl"):
        whole = text if complete else text[: text.rfind("\n") + 1]
        first = next((ln for ln in whole.splitlines() if ln.strip()), None)
        if first is not None:
            try:
                json.loads(first)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}: expected JSON lines with a 'text' field") from None
    return text


def _daemon_command(
    opts: ClientOptions, work: Path, sock: str, ready: Path, parent: int
) -> list[str]:
    """``torchrun`` command line of the silo's trainer daemon."""
    daemon = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(opts.nproc),
        "-m",
        "fedtrain.client.daemon_main",
        "--silo",
        opts.silo,
        "--work-dir",
        str(work),
        "--socket",
        sock,
        "--ready-file",
        str(ready),
        "--parent-pid",
        str(parent),
        "--threads",
        str(opts.threads),
    ]
    if opts.data:
        daemon += ["--data", opts.data]
    if opts.signing_key:
        daemon += ["--signing-key", str(opts.signing_key.resolve())]
    return daemon


def _wait_ready(children: Children, ready: Path, timeout_s: float = 180) -> None:
    """Wait until the daemon writes its ready file; RuntimeError with its log tail if it dies."""
    deadline = time.monotonic() + timeout_s
    while not ready.exists():
        if children.exited() or time.monotonic() > deadline:
            log = children.log_path("daemon")
            raise RuntimeError(
                f"the trainer daemon did not start: {failure_reason(children.log_dir.parent, log)}"
                f" (its log: {log})"
            )
        time.sleep(0.2)


def run_client(opts: ClientOptions) -> int:
    """Start the daemon and the SuperNode, watch them, stop them; return an exit code."""
    import os

    _check(opts)
    work = (opts.work_dir or Path(f"fedtrain-silo-{opts.silo}")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    sock = _socket_path(work)
    ready = work / "daemon.ready"
    ready.unlink(missing_ok=True)
    (work / ERROR_FILE).unlink(missing_ok=True)
    events = EventTail(work / EVENTS_FILE)
    children = Children(work / "logs")
    runtime_port = free_port()
    port_file = work / "supernode.port"
    if port_file.exists():
        # ClientApp processes of a SuperNode that died without cleaning up (Flower starts them
        # outside our process tree); they are the ones attached to its private runtime port.
        stop_flower_apps(port_file.read_text().strip())
    port_file.write_text(str(runtime_port))
    restore = install_stop_handlers()
    rc = 1
    watch: Watch | None = None
    try:
        children.start("daemon", _daemon_command(opts, work, sock, ready, os.getpid()))
        _wait_ready(children, ready)
        say(f"silo {opts.silo} trainer daemon ready ({opts.nproc} process(es)) on {sock}")
        node = supernode_command(
            opts.server, opts.silo, sock, runtime_port, opts.tls_ca, opts.auth_key
        )
        watch = Watch(
            children,
            node,
            server=opts.server,
            work_dir=work,
            runtime_port=runtime_port,
            tls=opts.tls_ca is not None,
            events=events,
            stay=opts.stay,
        )
        rc = watch.run()
    except Stop as e:
        say(f"{e} received, stopping")
        rc = 0
    finally:
        with contextlib.suppress(Stop):
            if watch is not None:
                watch.stop_supernode()
            _shutdown_daemon(children, sock)
        children.stop()
        stop_flower_apps(runtime_port)
        restore()
    return rc


def _shutdown_daemon(children: Children, sock: str, timeout_s: float = 20.0) -> None:
    """Ask the daemon to exit over its socket and wait for torchrun to end by itself (a
    SIGTERM to torchrun leaves its SignalException traceback in the daemon log)."""
    from fedtrain.protocol.localapi import LocalAPIError, request

    proc = children.procs.get("daemon")
    if proc is None or proc.poll() is not None:
        return
    try:
        request(sock, {"op": "shutdown"}, {}, timeout_s=10.0)
    except LocalAPIError:
        return  # busy or gone: the plain stop follows
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout_s)
