"""The silo's ``flower-supernode``: its command line, and the loop that keeps it connected.

The loop (:class:`Watch`) starts the SuperNode and, every half second:

- prints ``connected`` once the SuperNode has a node id, and each event the daemon recorded
  (:mod:`fedtrain.client.events`); ``finished`` ends it with 0 once the reply is on its way,
  ``refused`` (this silo is not in the run) with 3;
- retries, with backoff, a refused node activation (Flower ``code: 2004``): the coordinator may
  not have registered the key yet, or this silo's previous SuperNode, killed without
  deactivating, still counts as online (up to 2 x 30 s of heartbeats). It gives up after
  :data:`ACTIVATION_RETRY_S` (env ``FEDTRAIN_ACTIVATION_RETRY_S``) with exit 3;
- restarts the SuperNode when the coordinator answers HTTP 401 (a SuperLink that no longer
  knows this node: a new server run); a new SuperNode activates by its key again;
- reconnects when the SuperNode gave up on a coordinator that went away.

Each attempt reads the SuperNode's log only from where that attempt began.
"""

from __future__ import annotations

import os
import socket
import ssl
import sys
import time
from pathlib import Path

from fedtrain.client.events import EventTail, describe, failure_reason
from fedtrain.runtime.children import Children, stop_flower_apps
from fedtrain.runtime.files import file_size, read_since

__all__ = [
    "ACTIVATION_RETRY_S",
    "Watch",
    "activation_retry_s",
    "refusal",
    "supernode_command",
]

ACTIVATION_RETRY_S = 150.0
"""How long a refused node activation is retried (default of ``FEDTRAIN_ACTIVATION_RETRY_S``)."""
_MAX_BACKOFF_S = 15.0
_ACTIVATION = "node authentication: this silo's --auth-key is not registered"
_REFUSALS = (
    ("CERTIFICATE_VERIFY_FAILED", "TLS: the coordinator's certificate is not signed by --tls-ca"),
    ("Failed to activate SuperNode", _ACTIVATION),
    ("code: 2004", _ACTIVATION),
    ("wrong version number", "TLS: the coordinator does not speak TLS (drop --tls-ca?)"),
)
_UNAUTHORIZED = ("Invalid SuperNode authentication", "Invalid node ID", "401 Unauthorized")
_UNAUTHORIZED_REPEATS = 2
"""401 lines in one attempt's log before the SuperNode is restarted."""
_NEEDS_TLS = "TLS: the coordinator requires TLS (pass --tls-ca with its CA certificate)"
_PROBE_EVERY_S = 10.0
_UNREACHABLE_AFTER_S = 30.0
"""Say that the coordinator cannot be reached once not connected for this long (then every
minute): a coordinator not up yet and a wrong ``--server`` look the same from here."""
"""An insecure SuperNode not connected after this long: check whether the coordinator speaks
TLS (Flower's SuperNode retries a TLS server over plain HTTP forever, logging no reason)."""
_WINDOW = 1 << 14
"""How much of an attempt's log is kept to look for markers (its most recent part)."""
_REPLY_GRACE_S = 30.0
"""After ``finished``: how long the SuperNode gets to send the daemon's last reply."""


def activation_retry_s() -> float:
    """:data:`ACTIVATION_RETRY_S`, or ``FEDTRAIN_ACTIVATION_RETRY_S`` when set."""
    raw = os.environ.get("FEDTRAIN_ACTIVATION_RETRY_S")
    if not raw:
        return ACTIVATION_RETRY_S
    try:
        return max(0.0, float(raw))
    except ValueError:
        raise ValueError(f"FEDTRAIN_ACTIVATION_RETRY_S={raw!r}: expected seconds") from None


def refusal(log_text: str) -> str | None:
    """Why the SuperNode was refused, from its log (None: no refusal there)."""
    for marker, reason in _REFUSALS:
        if marker in log_text:
            return reason
    return None


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


def _reachable(server: str, timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to ``server`` (HOST:PORT) opens."""
    host, _, port = server.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def supernode_command(
    server: str,
    silo: str,
    sock: str,
    runtime_port: int,
    tls_ca: Path | None,
    auth_key: Path | None,
) -> list[str]:
    """``flower-supernode`` command line: the silo's name and socket, TLS and node auth."""
    node = [
        "flower-supernode",
        "--superlink",
        server,
        "--port",
        str(runtime_port),
        "--node-config",
        f'silo="{silo}" socket="{sock}"',
    ]
    if tls_ca is None:
        node.append("--insecure")
    else:
        node += ["--root-certificates", str(tls_ca.resolve())]
    if auth_key is not None:
        node += [
            "--auth-supernode-private-key",
            str(auth_key.resolve()),
            "--auth-supernode-public-key",
            f"{auth_key.resolve()}.pub",
        ]
    return node


def say(message: str, err: bool = False) -> None:
    """One line for the silo operator."""
    print(f"fedtrain client: {message}", file=sys.stderr if err else sys.stdout, flush=True)


def _refused(reason: str) -> int:
    say(f"the coordinator refused this silo: {reason}", err=True)
    return 3


class Watch:
    """Keeps one silo's SuperNode connected and reports what happens; see the module docstring."""

    def __init__(
        self,
        children: Children,
        node: list[str],
        *,
        server: str,
        work_dir: Path,
        runtime_port: int,
        tls: bool,
        events: EventTail,
        stay: bool = False,
    ) -> None:
        self.children = children
        self.node = node
        self.server = server
        self.work_dir = work_dir
        self.env = {"FLWR_HOME": str(work_dir / "flwr")}
        self.runtime_port = runtime_port
        self.log = children.log_path("supernode")
        self.events = events
        self.stay = stay
        """Keep serving after a run ends (the next run reaches the same daemon)."""
        self.retry_s = activation_retry_s()
        self.tls_known = tls
        self.attempt_at = 0.0
        self.offset = 0
        self.chunk_at = 0
        """Where this pass of the watch loop started reading the SuperNode's log."""
        self.text = ""
        """The current attempt's log (its last :data:`_WINDOW` characters)."""
        self.connected = False
        self.first_refused: float | None = None
        self.backoff = 1.0

    def start(self) -> None:
        """Start (or restart) the SuperNode; its log is read from here on."""
        self.offset = file_size(self.log)
        self.text = ""
        self.attempt_at = time.monotonic()
        self.connected = False
        self.children.start("supernode", self.node, self.env)

    def _restart(self, why: str, what: str = "restarting the SuperNode") -> None:
        self.stop_supernode()
        say(f"{why}; {what} in {self.backoff:.0f}s")
        time.sleep(self.backoff)
        self.backoff = min(self.backoff * 2, 30.0)
        self.start()

    def stop_supernode(self) -> None:
        """Stop the SuperNode (and its ClientApps), leaving the daemon running."""
        proc = self.children.procs.get("supernode")
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except Exception:
                proc.kill()
                proc.wait()
        stop_flower_apps(str(self.runtime_port))

    def run(self) -> int:
        """Watch until the run ends (0), the silo is refused (3) or a child fails (1)."""
        self.start()
        say(f"connecting to {self.server}")
        next_probe = time.monotonic() + _PROBE_EVERY_S
        next_reach = time.monotonic() + _UNREACHABLE_AFTER_S
        while True:
            self.chunk_at = self.offset
            chunk = read_since(self.log, self.offset)
            self.offset += len(chunk)
            self.text = text = (self.text + chunk.decode(errors="replace"))[-_WINDOW:]
            if not self.connected and "SuperNode ID:" in text:
                self.connected = self.tls_known = True
                node_id = text.split("SuperNode ID:", 1)[1].split()[0]
                say(f"connected to the coordinator {self.server} (node {node_id})")
                self.first_refused = None
            rc = self._events()
            if rc is not None:
                return rc
            if not self.tls_known and time.monotonic() >= next_probe:
                next_probe = time.monotonic() + _PROBE_EVERY_S
                tls = _speaks_tls(self.server)
                self.tls_known = tls is not None
                if tls:
                    return _refused(_NEEDS_TLS)
            if not self.connected and time.monotonic() >= next_reach:
                next_reach = time.monotonic() + 60.0
                if not _reachable(self.server):
                    say(
                        f"cannot reach the coordinator at {self.server} (not started yet, or a "
                        "wrong --server?); still trying",
                        err=True,
                    )
            dead = self.children.exited()
            if dead is not None:
                rc = self._exited(*dead, text)
                if rc is not None:
                    return rc
                continue
            if sum(text.count(m) for m in _UNAUTHORIZED) >= _UNAUTHORIZED_REPEATS:
                self._restart(
                    "the coordinator does not know this silo's node (HTTP 401: a new server "
                    "run?); a new SuperNode activates by its key again"
                )
                continue
            if time.monotonic() - self.attempt_at > 60:
                self.backoff = 1.0
            time.sleep(0.5)

    def _events(self) -> int | None:
        """Print the daemon's new events; the exit code when one ends the watch."""
        for event in self.events.read():
            line = describe(event)
            if line is not None:
                say(line, err=event.get("event") == "refused")
            kind = event.get("event")
            if kind == "finished" and not self.stay:
                self._await_last_reply()
                return 0
            if kind == "refused" and not self.stay:
                return 3
        return None

    def _await_last_reply(self) -> None:
        """Let the SuperNode send the daemon's answer to ``finish`` before it is stopped.

        The answer may already be in what this pass read (the daemon records ``finished`` just
        before answering), so look from where the pass started: an earlier reply's line cannot
        be there, as Flower delivers the next message seconds after a reply at the earliest."""
        start = self.chunk_at
        deadline = time.monotonic() + _REPLY_GRACE_S
        while time.monotonic() < deadline and self.children.exited() is None:
            if b"Sent successfully" in read_since(self.log, start):
                return
            time.sleep(0.2)

    def _exited(self, name: str, code: int, text: str) -> int | None:
        """A child exited: the exit code to end with, or None after restarting the SuperNode."""
        if name != "supernode":
            log = self.children.log_path(name)
            say(f"the {name} exited with code {code}: {failure_reason(self.work_dir, log)}", True)
            say(f"(its log: {log})", err=True)
            return 1
        why = refusal(text) if code else None
        if why == _ACTIVATION:
            now = time.monotonic()
            if self.first_refused is None:
                self.first_refused = now
            if now - self.first_refused < self.retry_s:
                wait = min(self.backoff, _MAX_BACKOFF_S)
                say(
                    "the coordinator did not accept this silo's node key (not registered yet, "
                    "or this silo's previous SuperNode still counts as online); retrying in "
                    f"{wait:.0f}s, giving up {self.retry_s:.0f}s after the first refusal"
                )
                stop_flower_apps(str(self.runtime_port))
                time.sleep(wait)
                self.backoff = min(self.backoff * 2, _MAX_BACKOFF_S)
                self.start()
                return None
            say(f"node activation still refused after {self.retry_s:.0f}s; giving up", err=True)
        if why is not None:
            return _refused(why)
        if any(m in text for m in _UNAUTHORIZED):
            self._restart("the coordinator does not know this silo's node (HTTP 401)")
            return None
        # The SuperNode gives up when the coordinator goes away (a restart, the end of a
        # run); the daemon and its state stay, so just connect again.
        self._restart(f"lost the coordinator (supernode exit {code})", what="reconnecting")
        return None
