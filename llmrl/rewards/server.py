"""Rewards over HTTP, the server: any configured reward answers ``POST /score`` (the protocol of
``llmrl.rewards.remote``, whose ``RemoteReward`` is its client); ``python launch/serve_reward.py --config CONFIG``.
Only the standard library is used.
"""
from __future__ import annotations

import hmac
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from llmrl.errors import RewardCallFailed, RewardError
from llmrl.rewards.remote import MAX_BODY

MAX_CONNECTIONS = 64  # requests served at once; more get 503 at once instead of a thread each
CONNECTION_SECONDS = 300.0  # a connection's whole life (slow headers, a slow body, the scoring) is bounded by this
IDLE_SECONDS = 30.0  # a connection that sends nothing for this long is closed


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

        def do_GET(self):  # noqa: N802 (http.server's naming)
            if not self._authorised():
                return
            if self.path == "/health":
                self._send(200, {"ok": True})
            else:
                self._send(404, {"error": f"no route {self.path}: use POST /score or GET /health"})

        def do_POST(self):  # noqa: N802
            if not self._authorised():
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
            try:
                request = json.loads(self.rfile.read(length))
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
            try:
                result = reward(prompts, completions, **kwargs)
            except RewardCallFailed as e:  # raised or hung: may be passing, so the client retries 5xx
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
    """A thread per request, at most ``max_connections`` at once (more are answered 503 at once), each
    connection closed after ``connection_seconds`` whatever it is doing, and a listen queue of 128 so that a
    burst of connections waits instead of being reset."""

    request_queue_size = 128
    daemon_threads = True

    def __init__(self, address, handler, max_connections: int = MAX_CONNECTIONS,
                 connection_seconds: float = CONNECTION_SECONDS):
        super().__init__(address, handler)
        self.max_connections = max_connections
        self.slots = threading.BoundedSemaphore(max_connections)
        self.connection_seconds = connection_seconds

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            body = json.dumps({"error": f"more than {self.max_connections} connections at once: retry"}).encode()
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        # A watchdog shuts the socket down at the deadline: a blocked read then returns and the thread ends.
        watchdog = threading.Timer(self.connection_seconds, _shut, args=(request,))
        watchdog.daemon = True
        watchdog.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            watchdog.cancel()
            self.slots.release()

    def handle_error(self, request, client_address):
        pass  # a client that went away (reset, timed out, cut off by the watchdog): nothing to print


def _shut(sock) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def make_server(reward, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                max_connections: int = MAX_CONNECTIONS, connection_seconds: float = CONNECTION_SECONDS
                ) -> RewardServer:
    """A server for ``reward`` (a CombinedReward); port 0 picks a free port (``server.server_address``)."""
    return RewardServer((host, port), make_handler(reward, token), max_connections, connection_seconds)
