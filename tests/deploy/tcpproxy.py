"""A loopback TCP forwarder a test controls, to cut one silo's link without root or a firewall.

``TcpProxy(host, port)`` listens on ``127.0.0.1:<ephemeral>`` (``.port``) and forwards bytes
both ways to ``host:port``, one thread per direction per connection. ``cut()`` ends every
open connection at once (both ends see the stream end mid-message, then an RST) and resets each
new one at accept (RST) until ``restore()``; ``close()`` stops it. It counts connections,
refusals and bytes, and records when each cut began and ended.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass

__all__ = ["TcpProxy"]


def _linger0(sock: socket.socket) -> None:
    """Make close() send an RST instead of a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _abort(sock: socket.socket) -> None:
    """End a connection that pump threads use: shutdown wakes them (a bare close() from another
    thread does not interrupt their recv); their close() then sends the RST."""
    _linger0(sock)
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _reset(sock: socket.socket) -> None:
    """Reset a connection no thread uses."""
    _linger0(sock)
    sock.close()


@dataclass(eq=False)
class _Pair:
    client: socket.socket
    upstream: socket.socket
    done: int = 0
    """Pump threads finished (the second one closes both sockets)."""


class TcpProxy:
    """Forward ``127.0.0.1:.port`` to ``target_host:target_port``; see the module docstring."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._srv.bind(("127.0.0.1", 0))
        self._srv.listen(64)
        self._srv.settimeout(0.2)
        self.port: int = self._srv.getsockname()[1]
        self._lock = threading.Lock()
        self._open: set[_Pair] = set()
        self._cut = False
        self._closed = False
        self.connections = 0
        """Connections forwarded."""
        self.refused = 0
        """Connections reset at accept while cut."""
        self.aborted = 0
        """Open connections a cut aborted."""
        self.bytes_up = 0
        """Bytes from the clients to the target."""
        self.bytes_down = 0
        """Bytes from the target to the clients."""
        self.cuts: list[list[float | None]] = []
        """[cut, restored] monotonic times of each cut (restored None while cut)."""
        self._thread = threading.Thread(target=self._accept, name="tcpproxy", daemon=True)
        self._thread.start()

    @property
    def is_cut(self) -> bool:
        return self._cut

    def cut(self) -> None:
        """Abort every open connection and reset every new one until :meth:`restore`."""
        with self._lock:
            if not self._cut:
                self._cut = True
                self.cuts.append([time.monotonic(), None])
            doomed, self._open = self._open, set()
            self.aborted += len(doomed)
        for pair in doomed:
            _abort(pair.client)
            _abort(pair.upstream)

    def restore(self) -> None:
        """Forward new connections again."""
        with self._lock:
            if self._cut:
                self._cut = False
                self.cuts[-1][1] = time.monotonic()

    def close(self) -> None:
        """Stop accepting, abort every connection, wait for the accept thread."""
        self._closed = True
        self.cut()
        self._thread.join(5)
        with contextlib.suppress(OSError):
            self._srv.close()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ threads
    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._cut or self._closed:
                self.refused += 1
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(client)
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            pair = _Pair(client, upstream)
            with self._lock:
                cut = self._cut
                if not cut:
                    self._open.add(pair)
                    self.connections += 1
            if cut:  # cut while connecting upstream
                _reset(client)
                _reset(upstream)
                continue
            for src, dst, up in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(
                    target=self._pump, args=(pair, src, dst, up), name="tcpproxy", daemon=True
                ).start()

    def _pump(self, pair: _Pair, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                with self._lock:
                    if up:
                        self.bytes_up += len(data)
                    else:
                        self.bytes_down += len(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):  # pass the end of the stream on
            dst.shutdown(socket.SHUT_WR)
        with self._lock:
            pair.done += 1
            last = pair.done == 2
            if last:
                self._open.discard(pair)
        if last:
            pair.client.close()
            pair.upstream.close()
