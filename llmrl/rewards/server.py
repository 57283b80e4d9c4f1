"""Rewards over HTTP, the server: any configured reward answers ``POST /score`` (the protocol of
``llmrl.rewards.remote``, whose ``RemoteReward`` is its client); ``python launch/serve_reward.py --config CONFIG``.
Only the standard library is used.
"""
from __future__ import annotations

import hmac
import json
import socket
import threading
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from llmrl.errors import RewardCallFailed, RewardError
from llmrl.rewards.remote import MAX_BODY

MAX_CONNECTIONS = 64  # authenticated requests served at once; more get 503 at once
WAITING_PER_SLOT = 4  # connections whose headers are not yet in (so not yet authenticated), per slot
CONNECTION_SECONDS = 300.0  # a connection's whole life (slow headers, a slow body, the scoring) is bounded by this
IDLE_SECONDS = 30.0  # a connection that sends nothing for this long is closed
# A body that stops short of its Content-Length is answered 400 once nothing more came for this long: a client
# that is still sending (bytes keep coming, each within this) is read to the end.
BODY_IDLE_SECONDS = 5.0


def make_handler(reward, token: str | None):
    class Handler(BaseHTTPRequestHandler):
        timeout = IDLE_SECONDS  # socket timeout: a connection that sends nothing is closed

        def _send(self, code: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorised(self) -> bool:
            given = self.headers.get("Authorization", "")
            if token is None or hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return True
            self._send(401, {"error": "missing or wrong bearer token"})
            return False

        def _admitted(self) -> bool:
            """After the token check: one of the server's slots, or 503 when all are busy (so connections that
            never authenticate hold none)."""
            if self.server.admit(self.request):
                return True
            self._send(503, {"error": f"more than {self.server.max_connections} requests at once: retry"})
            return False

        def _read_body(self, length: int) -> bytes | None:
            """The body, or None after answering 400 when it stops short of ``length`` bytes: nothing more for
            BODY_IDLE_SECONDS (not the 30 s idle timeout) or the client closed its side."""
            chunks, got = [], 0
            self.connection.settimeout(BODY_IDLE_SECONDS)
            try:
                while got < length:
                    chunk = self.rfile.read1(min(65536, length - got))
                    if not chunk:
                        break
                    chunks.append(chunk)
                    got += len(chunk)
            except TimeoutError:
                pass
            finally:
                self.connection.settimeout(IDLE_SECONDS)
            if got < length:
                self.close_connection = True
                self._send(400, {"error": f"bad request: the body has {got} bytes, fewer than its Content-Length of "
                                          f"{length} (nothing more came for {BODY_IDLE_SECONDS:g} s): send the whole "
                                          f"body, or the Content-Length of the body sent"})
                return None
            return b"".join(chunks)

        def _check_columns(self, completions: list, kwargs: dict) -> str | None:
            """What is wrong with the request's kwargs for this reward (its fault, not the reward's), or None."""
            for key, column in kwargs.items():
                if isinstance(column, list) and len(column) != len(completions):
                    return (f"kwargs.{key} has {len(column)} values for {len(completions)} completions: send one "
                            f"value per completion (kwargs are columns of the data)")
            missing = getattr(reward, "missing_arguments", lambda given: {})({"prompts", "completions", *kwargs})
            for name, names in missing.items():
                return (f"reward {name!r} requires kwargs {', '.join(map(repr, names))}, which the request lacks: "
                        f"send each as a list of one value per completion")
            return None

        def do_GET(self):  # noqa: N802 (http.server's naming)
            if not self._authorised() or not self._admitted():
                return
            if self.path == "/health":
                self._send(200, {"ok": True})
            else:
                self._send(404, {"error": f"no route {self.path}: use POST /score or GET /health"})

        def do_POST(self):  # noqa: N802
            if not self._authorised() or not self._admitted():
                return
            if self.path.rstrip("/") != "/score":
                self._send(404, {"error": f"no route {self.path}: use POST /score"})
                return
            raw_length = self.headers.get("Content-Length", "0")
            if not raw_length.isdigit():
                self._send(400, {"error": f"Content-Length {raw_length[:40]!r} is not a number of bytes"})
                return
            length = int(raw_length)
            if length > MAX_BODY:
                self._send(413, {"error": f"body of {length} bytes is over {MAX_BODY}"})
                return
            body = self._read_body(length)
            if body is None:
                return
            try:
                request = json.loads(body)
                if not isinstance(request, dict):
                    raise ValueError("the body must be a JSON object {prompts, completions, kwargs}")
                prompts, completions = request["prompts"], request["completions"]
                kwargs = request.get("kwargs") or {}
                if not isinstance(prompts, list) or not isinstance(completions, list) or len(prompts) != len(completions):
                    raise ValueError("prompts and completions must be lists of the same length")
                if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
                    raise ValueError("kwargs must be a JSON object of column name -> list of values")
            except RecursionError:
                self._send(400, {"error": "bad request: the JSON is nested too deeply"})
                return
            except (ValueError, KeyError, TypeError) as e:
                self._send(400, {"error": f"bad request: {str(e)[:300]}"})
                return
            problem = self._check_columns(completions, kwargs)
            if problem:  # the request's fault: retrying it would not help, and the reward is not to blame
                self._send(400, {"error": f"bad request: {problem}"})
                return
            try:
                result = reward(prompts, completions, **kwargs)
            except RewardCallFailed as e:  # raised or hung: may be passing, so the client retries 5xx
                key = e.__cause__.args[0] if isinstance(e.__cause__, KeyError) and e.__cause__.args else None
                if isinstance(key, str) and key not in kwargs:  # a reward reading kwargs["answer"] the request lacks
                    self._send(400, {"error": f"bad request: the reward reads kwargs {key[:80]!r}, which the request "
                                              f"lacks: send it as a list of one value per completion"})
                    return
                self._send(503, {"error": str(e)})
                return
            except RewardError as e:  # a bad returned value: retrying would not help
                self._send(422, {"error": str(e)})
                return
            except Exception as e:  # the message only: a repr could show object addresses
                self._send(500, {"error": f"the reward failed: {type(e).__name__}: {str(e)[:300]}"})
                return
            self._send(200, {"scores": [s if ok else None for s, ok in zip(result.scores, result.valid)]})

        def log_message(self, format, *args):  # keep the console for the one-line start message
            pass

    return Handler


class RewardServer(ThreadingHTTPServer):
    """A thread per connection; at most ``max_connections`` authenticated requests at once (more are answered 503
    at once); at most ``max_waiting`` connections still sending their headers, the oldest of them closed to make
    way for a new one (so that idle connections, which prove nothing, cannot lock out a client with the token);
    each connection closed after ``connection_seconds`` whatever it is doing; and a listen queue of 128 so that a
    burst of connections waits instead of being reset."""

    request_queue_size = 128
    daemon_threads = True

    def __init__(self, address, handler, max_connections: int = MAX_CONNECTIONS,
                 connection_seconds: float = CONNECTION_SECONDS, max_waiting: int | None = None):
        super().__init__(address, handler)
        self.max_connections = max_connections
        self.max_waiting = max_waiting or WAITING_PER_SLOT * max_connections
        self.slots = threading.BoundedSemaphore(max_connections)
        self.connection_seconds = connection_seconds
        self.lock = threading.Lock()
        self.waiting: OrderedDict = OrderedDict()  # sockets not yet authenticated, oldest first
        self.admitted: set = set()  # sockets holding a slot

    def process_request(self, request, client_address):
        with self.lock:
            if len(self.waiting) >= self.max_waiting:
                oldest, _ = self.waiting.popitem(last=False)
                _shut(oldest)  # its blocked read returns, its thread ends
            self.waiting[request] = None
        super().process_request(request, client_address)

    def admit(self, request) -> bool:
        """``request`` has authenticated: it takes a slot, if one is free."""
        with self.lock:
            self.waiting.pop(request, None)
            if not self.slots.acquire(blocking=False):
                return False
            self.admitted.add(request)
            return True

    def process_request_thread(self, request, client_address):
        # A watchdog shuts the socket down at the deadline: a blocked read then returns and the thread ends.
        watchdog = threading.Timer(self.connection_seconds, _shut, args=(request,))
        watchdog.daemon = True
        watchdog.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            watchdog.cancel()
            with self.lock:
                self.waiting.pop(request, None)
                if request in self.admitted:
                    self.admitted.discard(request)
                    self.slots.release()

    def handle_error(self, request, client_address):
        pass  # a client that went away (reset, timed out, cut off by the watchdog): nothing to print


def _shut(sock) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def make_server(reward, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                max_connections: int = MAX_CONNECTIONS, connection_seconds: float = CONNECTION_SECONDS,
                max_waiting: int | None = None) -> RewardServer:
    """A server for ``reward`` (a CombinedReward); port 0 picks a free port (``server.server_address``)."""
    return RewardServer((host, port), make_handler(reward, token), max_connections, connection_seconds, max_waiting)
