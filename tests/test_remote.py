"""Remote rewards: the client against a real server on a free loopback port, with token, retries, timeouts,
and the serve_reward command line."""
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from llmrl.config import ConfigError, RewardComponentConfig, RewardConfig
from llmrl.rewards.base import Component, CombinedReward, RewardError, build_reward
from llmrl.rewards.remote import RemoteReward
from llmrl.rewards.server import make_server

REPO = Path(__file__).resolve().parent.parent


class Served:
    """A reward server on 127.0.0.1 and a free port, for the duration of a with-block; ``kwargs`` go to
    ``make_server`` (token, max_connections, ...)."""

    def __init__(self, reward, **kwargs):
        self.server = make_server(reward, "127.0.0.1", 0, **kwargs)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_scores_and_dataset_columns_travel_over_http():
    with Served(build_reward(RewardConfig(function="exact_match"))) as served:
        client = RemoteReward(served.url)
        assert client(["abc>", "ab>"], ["cba", "ab"], answer=["cba", "ba"], completion_ids=[[1], [2]]) == [1.0, 0.0]
        health = json.loads(urllib.request.urlopen(served.url + "/health", timeout=5).read())
        assert health == {"ok": True}


def test_bearer_token_is_required_when_set(monkeypatch):
    with Served(build_reward(RewardConfig(function="exact_match")), token="s3cret") as served:
        with pytest.raises(RuntimeError, match="HTTP 401"):
            RemoteReward(served.url)(["a>"], ["a"], answer=["a"])
        monkeypatch.setenv("RM_TOKEN", "s3cret")
        assert RemoteReward(served.url, token_env="RM_TOKEN")(["a>"], ["a"], answer=["a"]) == [1.0]
    monkeypatch.delenv("RM_TOKEN")
    with pytest.raises(ConfigError, match="token_env = 'RM_TOKEN' is not set"):
        RemoteReward("http://127.0.0.1:1", token_env="RM_TOKEN")


def test_passing_server_errors_are_retried_with_backoff():
    calls = []

    def flaky(prompts, completions, **kw):
        calls.append(time.time())
        if len(calls) < 3:
            raise OSError("warming up")  # not a RewardError: the server answers 500, the client retries
        return [7.0] * len(completions)

    with Served(CombinedReward([Component("flaky", flaky)])) as served:
        client = RemoteReward(served.url, retries=3, backoff=0.05)
        assert client(["p"], ["c"]) == [7.0]
    assert len(calls) == 3 and client.last_metrics == {"attempts": 3.0}
    assert calls[2] - calls[1] >= 0.09  # the second wait doubles the first (0.05, then 0.1 s)


def test_bad_scores_are_not_retried_and_name_the_sample():
    calls = []

    def nan_reward(prompts, completions, **kw):
        calls.append(1)
        return [1.0, float("nan")]

    with Served(CombinedReward([Component("nan_reward", nan_reward)])) as served:
        with pytest.raises(RuntimeError, match=r"HTTP 422.*returned nan for sample 1"):
            RemoteReward(served.url, retries=3, backoff=0.01)(["p", "q"], ["a", "b"])
    assert len(calls) == 1


def test_unreachable_and_slow_servers_fail_clearly():
    # a closed port: connection refused on every attempt
    with pytest.raises(RuntimeError, match=r"did not answer after 3 attempts.*is the reward server running"):
        RemoteReward("http://127.0.0.1:9", retries=2, backoff=0.01)(["p"], ["c"])

    def slow(prompts, completions, **kw):
        time.sleep(2)
        return [0.0]

    with Served(CombinedReward([Component("slow", slow)])) as served:
        start = time.time()
        reward = build_reward(RewardConfig(components=[RewardComponentConfig(url=served.url, timeout=0.2, retries=1)]))
        with pytest.raises(RewardError, match=r"reward 'remote' raised RuntimeError.*did not answer after 2 attempts"):
            reward(["p"], ["c"])
        assert time.time() - start < 2


def test_a_url_without_a_server_is_refused_at_start_up():
    with Served(build_reward(RewardConfig(function="exact_match"))) as served:
        build_reward(RewardConfig(components=[RewardComponentConfig(url=served.url)]))  # up: accepted
        url = served.url
    with pytest.raises(ConfigError, match=rf"reward.components\[0\].url = '{url}/score': no server answers "
                                          r"there \(.*\): start it first"):
        build_reward(RewardConfig(components=[RewardComponentConfig(url=url)]))


def test_ppo_step_with_a_remote_reward(tiny_model_dir, tmp_path):
    from helpers import make_trainer, tiny_config

    with Served(build_reward(RewardConfig(function="exact_match"))) as served:
        cfg = tiny_config(tiny_model_dir, tmp_path / "run", "reward.function=",
                          f"reward.components=[{{url: '{served.url}', name: judge}}]")
        stats = make_trainer(cfg).train_step()
    assert 0.0 <= stats["reward/judge/mean"] <= 1.0 and stats["reward/judge/attempts"] == 1.0


def test_serve_reward_command_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MY_TOKEN": "abc"}
    proc = subprocess.Popen([sys.executable, str(REPO / "launch" / "serve_reward.py"), "--config",
                             str(REPO / "configs" / "tiny.yaml"), "--port", "0", "--token-env", "MY_TOKEN"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    try:
        line = proc.stdout.readline()
        assert "serving reward 'exact_match' on http://127.0.0.1:" in line and "bearer token required" in line
        url = line.split(" on ")[1].split()[0]
        request = urllib.request.Request(url, method="POST", data=json.dumps(
            {"prompts": ["ab>"], "completions": ["ba"], "kwargs": {"answer": ["ba"]}}).encode(),
            headers={"Authorization": "Bearer abc", "Content-Type": "application/json"})
        assert json.loads(urllib.request.urlopen(request, timeout=10).read()) == {"scores": [1.0]}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_the_client_does_not_follow_a_redirect_nor_send_its_token_elsewhere(monkeypatch):
    """A 302 to another port: following it re-sent the bearer token there and trusted that server's scores."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen = []

    class Elsewhere(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            seen.append(self.headers.get("Authorization"))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"scores": [99.0]}')

        def log_message(self, *a):
            pass

    other = ThreadingHTTPServer(("127.0.0.1", 0), Elsewhere)
    target = f"http://127.0.0.1:{other.server_address[1]}/score"

    class Redirect(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.send_response(302)
            self.send_header("Location", target)
            self.end_headers()

        do_GET = do_POST

        def log_message(self, *a):
            pass

    redirecting = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    for server in (other, redirecting):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("RM_TOKEN", "s3cret")
        client = RemoteReward(f"http://127.0.0.1:{redirecting.server_address[1]}", token_env="RM_TOKEN", retries=0)
        with pytest.raises(RuntimeError, match=r"answered with a redirect \(HTTP 302 to '.*/score'\): llmrl does not "
                                               r"follow redirects"):
            client(["p"], ["c"])
        assert seen == []  # nothing, and no token, reached the other address
    finally:
        for server in (other, redirecting):
            server.shutdown()
            server.server_close()


def test_a_server_that_answers_a_byte_at_a_time_cannot_hold_the_client():
    """Headers, then one byte every 0.4 s: each read is within the socket timeout, the whole answer is not."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    stop = threading.Event()

    def drip():
        while not stop.is_set():
            try:
                listener.settimeout(0.2)
                conn, _ = listener.accept()
            except OSError:
                continue
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
            try:
                while not stop.is_set():
                    conn.sendall(b" ")
                    time.sleep(0.4)
            except OSError:
                pass
            conn.close()

    threading.Thread(target=drip, daemon=True).start()
    client = RemoteReward(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=1.0, retries=1, backoff=0.01)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"did not answer after 2 attempts .*more than 1 s"):
        client(["p"], ["c"])
    assert time.monotonic() - started < 6  # 2 attempts of about 1 s (+ one socket read) each, not forever
    stop.set()
    listener.close()


def test_stalled_connections_are_capped_and_closed():
    import socket

    def handlers():
        return sum("process_request_thread" in t.name for t in threading.enumerate())

    reward = build_reward(RewardConfig(function="exact_match"))
    server = make_server(reward, "127.0.0.1", 0, token="s3cret", max_connections=4, connection_seconds=1.5,
                         max_waiting=4)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        stalled = []
        for _ in range(10):  # unfinished headers without a token: each held a thread (of 102) for 30 s and more
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\n")
            stalled.append(s)
        time.sleep(0.5)
        assert handlers() == 4
        # over the cap of connections still sending headers: the oldest were closed to make way for newer ones
        answered = [s for s in stalled if _read(s, 0.2) == b""]
        assert answered == stalled[:6]
        time.sleep(1.5)  # past the connection deadline: the 4 stalled ones were cut off
        assert all(_read(s, 2) == b"" for s in stalled if s not in answered)
        assert handlers() == 0
        client = RemoteReward(f"http://127.0.0.1:{port}", retries=0)
        client.token = "s3cret"
        assert client(["a>"], ["a"], answer=["a"]) == [1.0]
        client.token = "s3cre"  # compared with hmac.compare_digest, whatever the lengths
        with pytest.raises(RuntimeError, match="HTTP 401"):
            client(["a>"], ["a"], answer=["a"])
    finally:
        server.shutdown()
        server.server_close()


def _read(sock, timeout: float) -> bytes:
    """What the server sent on ``sock`` (b"" when it closed it), or b"?" when nothing came in time."""
    sock.settimeout(timeout)
    try:
        return sock.recv(200)
    except ConnectionError:
        return b""
    except OSError:
        return b"?"


def test_two_hundred_concurrent_requests_all_get_their_own_scores():
    """The listen queue is 128 (the default 5 reset 89-103 of 200 concurrent requests here)."""
    from concurrent.futures import ThreadPoolExecutor

    def echo(prompts, completions, **kwargs):
        return [float(c) for c in completions]

    reward = CombinedReward([Component("echo", echo)])
    with Served(reward) as served:
        client = RemoteReward(served.url, timeout=30, retries=0)
        with ThreadPoolExecutor(max_workers=200) as pool:
            results = list(pool.map(lambda i: client(["p"], [str(i)]), range(200)))
    assert results == [[float(i)] for i in range(200)]


@pytest.mark.parametrize("headers,body,status,message", [
    ({"Content-Length": "abc"}, b"", 400, "Content-Length 'abc' is not a number of bytes"),
    ({}, b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
    ({}, json.dumps({"prompts": ["p"], "completions": ["c"], "kwargs": [1, 2]}).encode(), 400,
     "kwargs must be a JSON object"),
    ({}, b"[1, 2]", 400, "the body must be a JSON object"),
])
def test_malformed_requests_get_a_4xx_with_a_plain_message(headers, body, status, message):
    with Served(build_reward(RewardConfig(function="exact_match"))) as served:
        request = urllib.request.Request(served.url + "/score", data=body, method="POST",
                                         headers={"Content-Type": "application/json", **headers})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=10)
        assert e.value.code == status
        answer = json.loads(e.value.read())["error"]
        assert message in answer and " at 0x" not in answer
