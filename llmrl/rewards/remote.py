"""Rewards over HTTP, the client: ``RemoteReward`` scores completions with a server (``llmrl.rewards.server``
serves any configured reward that way).

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

from llmrl.errors import ConfigError

MAX_BODY = 64 * 1024 * 1024  # bytes of a request or an answer, both ways

class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A 3xx answer is an error: following it would send the request, and its bearer token, to another address."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # urllib then raises HTTPError with the 3xx code


_OPENER = urllib.request.build_opener(_NoRedirects)


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
            _OPENER.open(health, timeout=min(self.timeout or 10.0, 10.0)).close()
        except urllib.error.HTTPError:
            pass  # it answered
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            raise ConfigError(f"{self.key} = {self.url!r}: no server answers there ({getattr(e, 'reason', e)}): "
                              f"start it first (e.g. llmrl serve-reward) or fix the URL") from None

    def _post(self, request) -> bytes:
        """The answer's body, within ``timeout`` seconds in all: a server that answers slowly (a byte now and
        then, each within the socket timeout) is cut off too."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        with _OPENER.open(request, timeout=self.timeout) as response:
            chunks, size = [], 0
            while True:
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"the answer took more than {self.timeout:g} s")
                chunk = response.read1(65536) if hasattr(response, "read1") else response.read(65536)
                if not chunk:
                    return b"".join(chunks)
                size += len(chunk)
                if size > MAX_BODY:
                    raise RuntimeError(f"{self.url} answered with more than {MAX_BODY} bytes")
                chunks.append(chunk)

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
                answer = json.loads(self._post(request), parse_int=_parse_int)
                self.last_metrics = {"attempts": float(attempt + 1)}
                if not isinstance(answer, dict) or "scores" not in answer:
                    raise RuntimeError(f"{self.url} answered without a 'scores' list: {str(answer)[:200]}")
                return answer["scores"]
            except urllib.error.HTTPError as e:
                if 300 <= e.code < 400:
                    raise RuntimeError(f"{self.url} answered with a redirect (HTTP {e.code} to "
                                       f"{e.headers.get('Location')!r}): llmrl does not follow redirects, so that the "
                                       f"request and its token go to this address only; set the final address as "
                                       f"the reward's url") from None
                detail = e.read()[:300].decode(errors="replace")
                if e.code < 500:
                    raise RuntimeError(f"{self.url} refused the request: HTTP {e.code} {detail}") from None
                last_error = f"HTTP {e.code} {detail}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last_error = repr(getattr(e, "reason", e))
        raise RuntimeError(f"{self.url} did not answer after {self.retries + 1} attempts (last error: {last_error}); "
                           f"is the reward server running?")


def _parse_int(digits: str) -> int | float:
    """A JSON integer; past Python's 4300-digit limit for int() it is read as a float (so inf), which the scores'
    check then names, as it names 10**400, instead of a ValueError about sys.set_int_max_str_digits."""
    return int(digits) if len(digits) <= 4000 else float(digits)


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
