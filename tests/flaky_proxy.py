"""A TCP proxy in front of a real server (the moto S3 server in the tests), through which an
endpoint can go away and come back at a chosen moment, as a dead or restarted server does.

Why a proxy rather than killing moto: moto keeps its buckets in its process's memory, so a killed
moto comes back empty, while a real S3 outage loses no data. Cutting the proxy gives clients
exactly what a dying server gives them (in-flight responses reset mid-body, new connections
refused) and the bytes are still there when the endpoint returns. The proxy also throttles the
server's answers, so that a load of a few MB is still in flight when the endpoint is cut.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

__all__ = ["FlakyProxy"]

_PIECE = 64 * 1024


class FlakyProxy:
    """Forwards 127.0.0.1:<port> to ``upstream`` ("host:port") until ``cut()``.

    Args:
        upstream: the real server, "127.0.0.1:1234".
        rate: bytes per second each connection's answers are throttled to (None: no limit).

    Attributes:
        endpoint: the URL clients use ("http://127.0.0.1:<port>"); the same after ``restore``.
        answered: bytes forwarded from the server to clients since start (or ``reset_count``).
    """

    def __init__(self, upstream: str, *, rate: float | None = None) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.rate = rate
        self.answered = 0
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._port = 0
        self.restore()
        self.endpoint = f"http://127.0.0.1:{self._port}"

    # -- control -------------------------------------------------------------------------------

    def cut(self) -> None:
        """The endpoint goes away: no new connections, and every open one is reset (RST)."""
        with self._lock:
            listener, self._listener = self._listener, None
            doomed, self._sockets = self._sockets, set()
        if listener is not None:
            listener.close()
        for sock in doomed:
            _reset(sock)

    def restore(self) -> None:
        """The endpoint comes back on the same port."""
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self._port))
        listener.listen(64)
        self._port = listener.getsockname()[1]
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), name="flaky-proxy-accept", daemon=True).start()

    def wait_answered(self, nbytes: int, timeout: float = 30.0) -> None:
        """Blocks until at least ``nbytes`` were forwarded to clients.

        Raises:
            TimeoutError: not within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while self.answered < nbytes:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.answered} of {nbytes} bytes went through the proxy")
            time.sleep(0.005)

    def reset_count(self) -> None:
        with self._lock:
            self.answered = 0

    def close(self) -> None:
        self.cut()

    # -- forwarding ----------------------------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut: the listener was closed
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                if self._listener is not listener:  # cut while this one was being accepted
                    _reset(client)
                    _reset(server)
                    return
                self._sockets.update((client, server))
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, answers: bool) -> None:
        started, sent = time.monotonic(), 0
        try:
            while True:
                data = src.recv(_PIECE)
                if not data:
                    break
                dst.sendall(data)
                if answers:
                    with self._lock:
                        self.answered += len(data)
                    sent += len(data)
                    if self.rate:
                        ahead = sent / self.rate - (time.monotonic() - started)
                        if ahead > 0:
                            time.sleep(ahead)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with self._lock:
                    self._sockets.discard(sock)
                _reset(sock)


def _reset(sock: socket.socket) -> None:
    """Closes as the kernel does for the sockets of a process that died (FIN, or RST when data
    is pending). shutdown() first: a close() alone would not wake a thread blocked in recv()."""
    for step in (
        lambda: sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)),
        lambda: sock.shutdown(socket.SHUT_RDWR),
        sock.close,
    ):
        try:
            step()
        except OSError:
            pass
