"""Rewards over HTTP: a client (``RemoteReward``) and a server for any configured reward (``serve``).

Protocol: ``POST /score`` with JSON ``{"prompts": [...], "completions": [...], "kwargs": {...}}`` answers
``{"scores": [float | null, ...]}``; ``GET /health`` answers ``{"ok": true}``. With a token, requests must
carry ``Authorization: Bearer TOKEN``. Only the standard library is used.
"""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from llmrl.config import ConfigError

MAX_BODY = 64 * 1024 * 1024


class RemoteReward:
    """A reward callable that POSTs to ``url``; retries with exponential backoff on connection errors,
    timeouts and 5xx answers; 4xx answers are final (the request itself is wrong)."""

    def __init__(self, url: str, timeout: float | None = 60.0, retries: int = 3, token_env: str | None = None,
                 backoff: float = 0.5, key: str = "reward.url"):
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"{key} = {url!r} must start with http:// or https://")
        self.url = url.rstrip("/") + ("" if url.rstrip("/").endswith("/score") else "/score")
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.token = None
        if token_env:
            self.token = os.environ.get(token_env)
            if not self.token:
                raise ConfigError(f"{key}: token_env = {token_env!r} is not set in the environment: export it")
        self.last_metrics: dict[str, float] = {}
        self.key = key

    def check_reachable(self) -> None:
        """At start-up: a server answers at the URL (``GET /health``; any HTTP answer will do)."""
        health = self.url[: -len("/score")] + "/health"
        try:
            urllib.request.urlopen(health, timeout=min(self.timeout or 10.0, 10.0)).close()
        except urllib.error.HTTPError:
            pass  # it answered
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            raise ConfigError(f"{self.key} = {self.url!r}: no server answers there ({getattr(e, 'reason', e)}): "
                              f"start it first (e.g. llmrl serve-reward) or fix the URL") from None

    def __call__(self, prompts: list[str], completions: list[str], **kwargs) -> list:
        body = json.dumps({"prompts": prompts, "completions": completions, "kwargs": jsonable(kwargs)}).encode()
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        last_error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    answer = json.loads(response.read())
                self.last_metrics = {"attempts": float(attempt + 1)}
                if not isinstance(answer, dict) or "scores" not in answer:
                    raise RuntimeError(f"{self.url} answered without a 'scores' list: {str(answer)[:200]}")
                return answer["scores"]
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode(errors="replace")
                if e.code < 500:
                    raise RuntimeError(f"{self.url} refused the request: HTTP {e.code} {detail}") from None
                last_error = f"HTTP {e.code} {detail}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last_error = repr(getattr(e, "reason", e))
        raise RuntimeError(f"{self.url} did not answer after {self.retries + 1} attempts (last error: {last_error}); "
                           f"is the reward server running?")


def jsonable(kwargs: dict) -> dict:
    """The dataset columns that JSON can carry (others stay local)."""
    out = {}
    for k, v in kwargs.items():
        try:
            json.dumps(v)
        except TypeError:
            continue
        out[k] = v
    return out


def make_handler(reward, token: str | None):
    from llmrl.rewards import RewardCallFailed, RewardError

    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorised(self) -> bool:
            if token is None or self.headers.get("Authorization") == f"Bearer {token}":
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
            length = int(self.headers.get("Content-Length", 0))
            if length > MAX_BODY:
                self._send(413, {"error": f"body of {length} bytes is over {MAX_BODY}"})
                return
            try:
                request = json.loads(self.rfile.read(length))
                prompts, completions = request["prompts"], request["completions"]
                kwargs = request.get("kwargs") or {}
                if not isinstance(prompts, list) or not isinstance(completions, list) or len(prompts) != len(completions):
                    raise ValueError("prompts and completions must be lists of the same length")
            except (ValueError, KeyError, TypeError) as e:
                self._send(400, {"error": f"bad request: {e}"})
                return
            try:
                result = reward(prompts, completions, **kwargs)
            except RewardCallFailed as e:  # raised or hung: may be passing, so the client retries 5xx
                self._send(503, {"error": str(e)})
                return
            except RewardError as e:  # a bad returned value: retrying would not help
                self._send(422, {"error": str(e)})
                return
            except Exception as e:
                self._send(500, {"error": repr(e)})
                return
            self._send(200, {"scores": [s if ok else None for s, ok in zip(result.scores, result.valid)]})

        def log_message(self, format, *args):  # keep the console for the one-line start message
            pass

    return Handler


def make_server(reward, host: str = "127.0.0.1", port: int = 0, token: str | None = None) -> ThreadingHTTPServer:
    """A server for ``reward`` (a CombinedReward); port 0 picks a free port (``server.server_address``)."""
    return ThreadingHTTPServer((host, port), make_handler(reward, token))


def main(argv: list[str] | None = None) -> int:
    from llmrl.console import config_parser, run_cli

    parser = config_parser("Serve a config's reward over HTTP (POST /score, GET /health).",
                           "a PPO config; its reward section is served")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    parser.add_argument("--token-env", default=None, help="environment variable holding the bearer token to require")
    args = parser.parse_intermixed_args(argv)

    def body():
        from llmrl.config import load_config
        from llmrl.rewards import build_reward

        cfg = load_config(args.config, args.overrides)
        token = None
        if args.token_env:
            token = os.environ.get(args.token_env)
            if not token:
                raise ConfigError(f"--token-env {args.token_env!r} is not set in the environment: export it")
        reward = build_reward(cfg.reward)
        server = make_server(reward, args.host, args.port, token)
        host, port = server.server_address[:2]
        print(f"serving reward {reward.name!r} on http://{host}:{port}/score"
              f"{' (bearer token required)' if token else ''}", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()

    return run_cli(body)
