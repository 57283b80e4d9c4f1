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
from llmrl.remote import RemoteReward, make_server
from llmrl.rewards import Component, CombinedReward, RewardError, build_reward

REPO = Path(__file__).resolve().parent.parent


class Served:
    """A reward server on 127.0.0.1 and a free port, for the duration of a with-block."""

    def __init__(self, reward, token=None):
        self.server = make_server(reward, "127.0.0.1", 0, token)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

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
