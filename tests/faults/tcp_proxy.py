"""A loopback TCP proxy that can go down and come back on the same port: an endpoint outage, honestly.

Stopping moto itself would lose its in-memory buckets, so the outage is played at the address the client
talks to. `stop()` closes the listener (new connections are refused) and resets every open connection
(SO_LINGER 0, so the peer reads ECONNRESET, not a clean end of stream); `start()` listens again on the same
port. `cut_at(method, prefix, n, nbytes)` arms a stop in the middle of the traffic: once the n-th request
of that method under the path prefix is seen, the proxy goes down `nbytes` further on (bytes passed either
way: that request's body, its response or the next ones), wherever that falls.
"""

import contextlib
import re
import socket
import struct
import threading
import time

_REQUEST = re.compile(rb"(GET|PUT|POST|HEAD|DELETE) (/\S*) HTTP/1\.1\r\n")


class TcpProxy:
    def __init__(self, upstream_port: int, port: int = 0):
        self.upstream = ("127.0.0.1", upstream_port)
        self.port = port
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._seen = 0  # requests matching the armed prefix
        self._armed: tuple[str, int, int] | None = None  # ("METHOD /prefix", n-th request, bytes after it)
        self._budget: int | None = None  # bytes left before the armed stop fires
        self.cut = threading.Event()  # set when an armed stop has fired
        self.requests: list[str] = []  # "METHOD /path" of every request seen, for the test's report

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Listen (again) on the same port; SO_REUSEADDR lets it rebind while old sockets linger."""
        if self.up:
            return
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        self.port = sock.getsockname()[1]
        with self._lock:
            self._listener = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def stop(self) -> None:
        """Refuse new connections and reset the open ones."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
            self._armed = self._budget = None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked on it
            listener.close()
        for conn in conns:
            _reset(conn)

    def restart_after(self, seconds: float, within: float = 300) -> threading.Thread:
        """Start again `seconds` after the armed stop fires, if it fires `within` seconds (join to wait)."""

        def later() -> None:
            if self.cut.wait(timeout=within):
                time.sleep(seconds)
                self.start()

        thread = threading.Thread(target=later, daemon=True)
        thread.start()
        return thread

    def cut_at(self, method: str, prefix: str, nth: int, nbytes: int) -> None:
        """Go down `nbytes` into the exchange of the nth `method` request (1-based, from now) under `prefix`."""
        with self._lock:
            self._seen = 0
            self._armed = (f"{method} {prefix}", nth, nbytes)
            self._budget = None
            self.cut.clear()

    @property
    def up(self) -> bool:
        return self._listener is not None

    # ---- the pumps

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # stopped
            try:
                server = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                if self._listener is not listener:  # stopped while connecting
                    _reset(client)
                    _reset(server)
                    return
                self._conns |= {client, server}
            done = threading.Semaphore(0)
            for src, dst, requests in ((client, server, True), (server, client, False)):
                args = (src, dst, requests, done)
                threading.Thread(target=self._pump, args=args, daemon=True).start()
            threading.Thread(target=self._close_when_done, args=(client, server, done), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, requests: bool, done) -> None:
        try:
            try:  # the upstream socket keeps create_connection's timeout otherwise
                src.settimeout(None)
            except OSError:  # stop() closed it before this thread ran
                return
            while True:
                try:
                    data = src.recv(65536)
                except OSError:
                    return
                if not data:
                    break
                if requests:
                    self._count_requests(data)
                if not self._forward(dst, data):
                    return
            with self._lock:
                live = dst in self._conns  # not reset by stop(): pass the end of stream on
            if live:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
        finally:
            done.release()

    def _close_when_done(self, client: socket.socket, server: socket.socket, done) -> None:
        done.acquire()
        done.acquire()
        with self._lock:
            live = client in self._conns
            self._conns -= {client, server}
        if live:
            client.close()
            server.close()

    def _count_requests(self, data: bytes) -> None:
        for match in _REQUEST.finditer(data):
            request = f"{match.group(1).decode()} {match.group(2).decode(errors='replace')}"
            with self._lock:
                self.requests.append(request)
                if self._armed and self._budget is None and request.startswith(self._armed[0]):
                    self._seen += 1
                    if self._seen == self._armed[1]:
                        self._budget = self._armed[2]

    def _forward(self, dst: socket.socket, data: bytes) -> bool:
        """Send data on, or only its part before an armed cut and then stop; False once down."""
        with self._lock:
            budget = self._budget
            if budget is not None:
                self._budget = max(0, budget - len(data))
        if budget is not None and budget < len(data):
            with contextlib.suppress(OSError):
                dst.sendall(data[:budget])
            self.stop()
            self.cut.set()
            return False
        try:
            dst.sendall(data)
        except OSError:
            return False
        return True


def _reset(sock: socket.socket) -> None:
    """Close with an RST: the peer sees 'connection reset', as when a server host goes away.

    shutdown(SHUT_RD) first wakes a pump blocked in recv() on it (a bare close() from another thread
    would not, and the socket would stay open until it returned); it sends nothing to the peer.
    """
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)
    with contextlib.suppress(OSError):
        sock.close()
