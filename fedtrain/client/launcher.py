"""``fedtrain client --silo NAME --server HOST:PORT``: a silo's processes.

1. The trainer daemon: ``torchrun --standalone --nproc-per-node N -m fedtrain.client.daemon``
   (FSDP2 over N local processes; gloo on CPU), listening on a Unix socket in the work dir.
2. A ``flower-supernode`` connected to the coordinator, whose ``--node-config`` names the silo
   and the daemon's socket; its ClientApp (:mod:`fedtrain.client.app`) is the mailbox.

Both are watched: if one exits the other is stopped and the command fails with the tail of its
log. Ctrl-C stops both. The daemon's state lives in the work dir, so starting the command again
resumes where the silo was.
"""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fedtrain.runtime.children import (
    Children,
    Stop,
    free_port,
    install_stop_handlers,
    stop_processes_using,
    tail,
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
    :func:`fedtrain.data.corpus.read_text_documents` reads it) and their first bytes are UTF-8
    text (jsonl: a first line with a 'text' field), not all empty. Returns the file count;
    ValueError (one line) otherwise."""
    import fsspec

    try:
        files = fsspec.open_files(url, mode="rb")
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


_REFUSALS = (
    ("CERTIFICATE_VERIFY_FAILED", "TLS: the coordinator's certificate is not signed by --tls-ca"),
    (
        "Failed to activate SuperNode",
        "node authentication: this silo's --auth-key is not registered",
    ),
    ("code: 2004", "node authentication: this silo's --auth-key is not registered"),
    ("wrong version number", "TLS: the coordinator does not speak TLS (drop --tls-ca?)"),
)


def _refusal(log_tail: str) -> str | None:
    """Why the SuperNode was refused, when retrying cannot help."""
    for marker, reason in _REFUSALS:
        if marker in log_tail:
            return reason
    return None


_NEEDS_TLS = "TLS: the coordinator requires TLS (pass --tls-ca with its CA certificate)"
_PROBE_EVERY_S = 10.0
"""An insecure SuperNode not connected after this long: check whether the coordinator speaks
TLS (Flower's SuperNode retries a TLS server over plain HTTP forever, logging no reason)."""


def _speaks_tls(server: str, timeout_s: float = 5.0) -> bool | None:
    """Whether ``server`` (HOST:PORT) completes a TLS handshake; None when it is unreachable.

    The handshake verifies nothing: it only tells a TLS server from a plain one."""
    host, _, port = server.rpartition(":")
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s) as s:
            try:
                with ctx.wrap_socket(s):
                    return True
            except ssl.SSLError:
                return False
    except (OSError, ValueError):
        return None


def _logged_since(path: Path, offset: int, marker: str) -> bool:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return marker.encode() in f.read()
    except OSError:
        return False


def _stop_clientapps(port: str) -> None:
    stop_processes_using(f"--runtime-api-address 127.0.0.1:{port} ")


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
        "fedtrain.client.daemon",
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
            raise RuntimeError(
                "the trainer daemon did not start:\n" + tail(children.log_path("daemon"))
            )
        time.sleep(0.2)


def _supernode_command(opts: ClientOptions, sock: str, runtime_port: int) -> list[str]:
    """``flower-supernode`` command line: the silo's name and socket, TLS and node auth."""
    node = [
        "flower-supernode",
        "--superlink",
        opts.server,
        "--port",
        str(runtime_port),
        "--node-config",
        f'silo="{opts.silo}" socket="{sock}"',
    ]
    if opts.tls_ca is None:
        node.append("--insecure")
    else:
        node += ["--root-certificates", str(opts.tls_ca.resolve())]
    if opts.auth_key is not None:
        node += [
            "--auth-supernode-private-key",
            str(opts.auth_key.resolve()),
            "--auth-supernode-public-key",
            f"{opts.auth_key.resolve()}.pub",
        ]
    return node


def _refused(reason: str) -> int:
    """Report that the coordinator refused this silo; the exit code for it."""
    print(
        f"fedtrain client: the coordinator refused this silo: {reason}", file=sys.stderr, flush=True
    )
    return 3


def _watch_supernode(
    opts: ClientOptions, children: Children, node: list[str], work: Path, runtime_port: int
) -> int:
    """Start the SuperNode and keep it connected (reconnect with backoff when the coordinator
    goes away); return the exit code once it is refused or a child fails."""
    env = {"FLWR_HOME": str(work / "flwr")}
    node_log = children.log_path("supernode")
    node_log_start = node_log.stat().st_size if node_log.exists() else 0
    children.start("supernode", node, env)
    started = time.monotonic()
    print(f"fedtrain client: silo {opts.silo} connecting to {opts.server}", flush=True)
    backoff = 1.0
    # With --tls-ca a plain coordinator shows in the SuperNode's log ("wrong version
    # number"); without it, a TLS coordinator does not, so ask it directly.
    tls_known = opts.tls_ca is not None
    next_probe = time.monotonic() + _PROBE_EVERY_S
    while True:
        if not tls_known and time.monotonic() >= next_probe:
            next_probe = time.monotonic() + _PROBE_EVERY_S
            if _logged_since(node_log, node_log_start, "SuperNode ID"):
                tls_known = True  # connected: the coordinator speaks plain HTTP
            else:
                tls = _speaks_tls(opts.server)
                tls_known = tls is not None
                if tls:
                    return _refused(_NEEDS_TLS)
        dead = children.exited()
        if dead is not None:
            name, code = dead
            refusal = _refusal(tail(children.log_path("supernode"), 40)) if code else None
            if name == "supernode" and refusal is not None:
                return _refused(refusal)
            if name == "supernode":
                # The SuperNode gives up when the coordinator goes away (a restart, the end
                # of a run); the daemon and its state stay, so just connect again.
                print(
                    f"fedtrain client: lost the coordinator (supernode exit {code}); "
                    f"reconnecting in {backoff:.0f}s",
                    flush=True,
                )
                _stop_clientapps(str(runtime_port))
                time.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                started = time.monotonic()
                children.start("supernode", node, env)
                continue
            print(
                f"fedtrain client: {name} exited with code {code}:\n"
                + tail(children.log_path(name)),
                file=sys.stderr,
                flush=True,
            )
            return 1
        if time.monotonic() - started > 60:
            backoff = 1.0
        time.sleep(0.5)


def run_client(opts: ClientOptions) -> int:
    """Start the daemon and the SuperNode, watch them, stop them; return an exit code."""
    import os

    _check(opts)
    work = (opts.work_dir or Path(f"fedtrain-silo-{opts.silo}")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    sock = _socket_path(work)
    ready = work / "daemon.ready"
    ready.unlink(missing_ok=True)
    children = Children(work / "logs")
    runtime_port = free_port()
    port_file = work / "supernode.port"
    if port_file.exists():
        # ClientApp processes of a SuperNode that died without cleaning up (Flower starts them
        # outside our process tree); they are the ones attached to its private runtime port.
        _stop_clientapps(port_file.read_text().strip())
    port_file.write_text(str(runtime_port))
    restore = install_stop_handlers()
    rc = 1
    try:
        children.start("daemon", _daemon_command(opts, work, sock, ready, os.getpid()))
        _wait_ready(children, ready)
        print(
            f"fedtrain client: silo {opts.silo} trainer daemon ready "
            f"({opts.nproc} process(es)) on {sock}",
            flush=True,
        )
        node = _supernode_command(opts, sock, runtime_port)
        rc = _watch_supernode(opts, children, node, work, runtime_port)
    except Stop as e:
        print(f"fedtrain client: {e} received, stopping", flush=True)
        rc = 0
    finally:
        children.stop()
        _stop_clientapps(str(runtime_port))
        restore()
    return rc
