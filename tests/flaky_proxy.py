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
        # A cut armed by ``cut_when_answered``: (bytes, seconds until the endpoint is back or None).
        self._armed: tuple[int, float | None] | None = None
        self._done = threading.Event()
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

    def cut_when_answered(self, nbytes: int, *, back_after_s: float | None = None) -> threading.Event:
        """Cuts the endpoint from the forwarding thread itself as soon as ``nbytes`` went through,
        before it forwards anything more, and restores it ``back_after_s`` later (None: never).
        A cut made by a thread watching ``answered`` could come after a fast read had ended.

        Returns:
            An event set once the cut is done, and the endpoint back where it comes back.
        """
        self._done = threading.Event()
        with self._lock:
            self._armed = (nbytes, back_after_s)
        return self._done

    def _cut_armed(self, back_after_s: float | None) -> None:
        self.cut()
        if back_after_s is None:
            self._done.set()
            return

        def restore_later() -> None:
            time.sleep(back_after_s)
            self.restore()
            self._done.set()

        threading.Thread(target=restore_later, name="flaky-proxy-restore", daemon=True).start()

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
                        armed = self._armed
                        if armed is not None and self.answered >= armed[0]:
                            self._armed = None
                        else:
                            armed = None
                    if armed is not None:  # this thread cuts before it forwards another byte
                        self._cut_armed(back_after_s=armed[1])
                        break
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
