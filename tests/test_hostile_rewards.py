"""Hostile values from rewards and environments, and hostile requests to the reward server (issue 26, rows 8 and 9):
every case is one line naming the reward (or env), the value and the fix, under both reward.on_error modes, and
the server blames the request when the request is wrong, answers a short body at once and lets no idle
connection lock out a client with the token."""
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from helpers import assert_one_line, launch_ppo, training_rows
from test_remote import Served

from llmrl.config import RewardComponentConfig, RewardConfig
from llmrl.envs.base import checked_step
from llmrl.errors import EnvError
from llmrl.rewards.base import CombinedReward, Component, RewardError, build_reward, check_scores

COMPLETIONS = ["abc", "cba"]

# value in sample 0 -> what the message must say about it
BAD_VALUES = [
    (10**400, "returned 1000000000000000000000000000000000000000... (401 digits) for sample 0: it is too large"),
    (-10**5000, "returned an integer of about 5001 digits for sample 0: it is too large"),  # past str()'s limit too
    (Decimal("sNaN"), "returned Decimal('sNaN') (Decimal) for sample 0: it is not a number (ValueError"),
    (float("nan"), "returned nan for sample 0: scores must be finite"),  # as it was: the others now behave like it
]


@pytest.mark.parametrize("value,says", BAD_VALUES, ids=["10**400", "-10**5000", "sNaN", "nan"])
def test_a_value_that_is_no_finite_float_is_one_line_or_skipped_like_nan(value, says):
    with pytest.raises(RewardError) as e:
        check_scores([value, 1.0], "huge", COMPLETIONS)
    assert str(e.value).startswith("reward 'huge' ") and says in str(e.value) and "\n" not in str(e.value)
    assert len(str(e.value)) < 400
    invalid = []
    assert check_scores([value, 1.0], "huge", COMPLETIONS, invalid) == [None, 1.0] and invalid == [0]
    # in a run under on_error: skip the sample is dropped from training and counted, as NaN is
    result = CombinedReward([Component("huge", lambda prompts, completions, **kw: [value, 1.0])], "skip")(
        ["p", "q"], COMPLETIONS)
    assert result.valid == [False, True] and result.metrics["reward/huge/invalid"] == 1.0


@pytest.mark.parametrize("scores,says", [
    (np.ones((2, 2)), "returned a 2-D ndarray of shape (2, 2)"),
    (np.ones((2, 1)), "returned a 2-D ndarray of shape (2, 1)"),
    (np.array(1.0), "returned a 0-D ndarray of shape () (array(1.))"),
    (torch.tensor(1.0), "returned a 0-D Tensor of shape () (tensor(1.))"),
])
@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_a_wrong_shaped_array_is_one_line_in_both_modes_like_a_wrong_count(scores, says, mode):
    with pytest.raises(RewardError) as e:
        check_scores(scores, "shaped", COMPLETIONS, None if mode == "raise" else [])
    message = str(e.value)
    assert message.startswith("reward 'shaped' ") and says in message and "return a list (or 1-D array) of 2 scores" \
        in message and "\n" not in message
    # CombinedReward treats it as it treats a wrong count: raised, or under skip the whole batch dropped and counted
    combined = CombinedReward([Component("shaped", lambda prompts, completions, **kw: scores)], mode)
    if mode == "raise":
        with pytest.raises(RewardError, match="returned a .-D"):
            combined(["p", "q"], COMPLETIONS)
    else:
        result = combined(["p", "q"], COMPLETIONS)
        assert result.valid == [False, False] and result.metrics["reward/shaped/errors"] == 1.0


@pytest.mark.parametrize("scores", [np.array([0.5, 2.0]), torch.tensor([0.5, 2.0]),
                                    [np.float32(0.5), torch.tensor(2.0)]])
def test_one_dimensional_arrays_and_tensors_of_the_right_length_are_still_accepted(scores):
    assert check_scores(scores, "arr", COMPLETIONS) == [0.5, 2.0]
    assert check_scores(scores, "arr", COMPLETIONS, []) == [0.5, 2.0]


class HugeStep:
    """An environment whose first step rewards 10**400 (no float holds it)."""

    def reset(self, seed=None, options=None):
        return "ab", {}

    def step(self, action):
        return "c", 10**400, True, False, {}


def test_an_environments_reward_too_large_for_a_float_is_one_line():
    with pytest.raises(EnvError) as e:
        checked_step(HugeStep(), "huge", 7, 1, "x")
    message = str(e.value)
    assert message.startswith("env 'huge', episode seed 7, turn 1: step returned reward 100000000") and \
        "(401 digits): it must be a finite number" in message and "\n" not in message and len(message) < 300


# --- the reward server ------------------------------------------------------------------------------------------


def post(url, payload: dict, token=None):
    """(HTTP status, decoded JSON answer) of POST /score."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url + "/score", data=json.dumps(payload).encode(), method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def exact_match():
    return build_reward(RewardConfig(function="exact_match"))


def test_a_short_kwargs_column_is_the_requests_fault():
    """It was a 422 saying the reward returned 1 value for 2 completions."""
    with Served(exact_match()) as served:
        code, answer = post(served.url, {"prompts": ["a>", "b>"], "completions": ["a", "b"],
                                         "kwargs": {"answer": ["a"]}})
    assert code == 400, answer
    assert answer["error"].startswith("bad request: kwargs.answer has 1 values for 2 completions: send one value per "
                                      "completion"), answer


def test_missing_kwargs_are_a_4xx_naming_them_not_a_retryable_503():
    """It was a 503 ("the run stopped before using this batch"), which the client retried."""
    def reads_answer(prompts, completions, **kwargs):
        return [float(c == a) for c, a in zip(completions, kwargs["solution"])]

    with Served(exact_match()) as served:
        code, answer = post(served.url, {"prompts": ["a>"], "completions": ["a"]})
    assert code == 400 and "reward 'exact_match' requires kwargs 'answer', which the request lacks" in answer["error"]
    with Served(CombinedReward([Component("reads", reads_answer)])) as served:  # a **kwargs reader: found at the call
        code, answer = post(served.url, {"prompts": ["a>"], "completions": ["a"], "kwargs": {"answer": ["a"]}})
    assert code == 400 and "the reward reads kwargs 'solution', which the request lacks" in answer["error"]


def test_a_body_shorter_than_its_content_length_is_answered_400_at_once():
    """It was closed after the 30 s idle timeout, with no answer."""
    with Served(exact_match()) as served:
        with socket.create_connection(("127.0.0.1", served.port), timeout=20) as s:
            started = time.monotonic()
            s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n" + b'{"prompts"')
            answer = read_all(s, time.monotonic() + 15)
            elapsed = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.0 400"), answer[:200]
        assert b"the body has 10 bytes, fewer than its Content-Length of 1000" in answer
        assert elapsed < 10
        # a client that sends its body in pieces, each within the read deadline, is read to the end
        body = json.dumps({"prompts": ["a>"], "completions": ["a"], "kwargs": {"answer": ["a"]}}).encode()
        with socket.create_connection(("127.0.0.1", served.port), timeout=20) as s:
            s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:10])
            time.sleep(1.0)
            s.sendall(body[10:])
            answer = read_all(s, time.monotonic() + 15)
        assert answer.startswith(b"HTTP/1.0 200") and answer.endswith(b'{"scores": [1.0]}'), answer[:200]


def read_all(sock, deadline: float) -> bytes:
    """Everything the server sends on ``sock`` until it closes it or the deadline passes."""
    chunks = []
    while time.monotonic() < deadline:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("slots,waiting,idle", [(64, None, 70), (2, 4, 12)])
def test_idle_unauthenticated_connections_do_not_lock_out_a_client_with_the_token(slots, waiting, idle):
    """64 connections that sent nothing took the 64 slots before any token was checked: the next got 503."""
    with Served(exact_match(), token="s3cret", max_connections=slots,
                **({} if waiting is None else {"max_waiting": waiting})) as served:
        idlers = []
        try:
            for _ in range(idle):  # more than the slots (and, in the second case, than the waiting room)
                idlers.append(socket.create_connection(("127.0.0.1", served.port), timeout=5))
            time.sleep(0.5)
            started = time.monotonic()
            code, answer = post(served.url, {"prompts": ["a>"], "completions": ["a"], "kwargs": {"answer": ["a"]}},
                                token="s3cret")
            assert (code, answer) == (200, {"scores": [1.0]})
            assert time.monotonic() - started < 5
            code, answer = post(served.url, {"prompts": ["a>"], "completions": ["a"]})  # no token: still refused
            assert code == 401
        finally:
            for s in idlers:
                s.close()


def huge_number_server(digits: int):
    """A scorer that is not llmrl's: it answers every POST with one ``digits``-digit score."""
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            body = b'{"scores": [1' + b"0" * (digits - 1) + b"]}"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *a):
            pass

    return ThreadingHTTPServer(("127.0.0.1", 0), Handler)


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_a_401_digit_score_from_a_remote_scorer_is_the_same_one_line_as_a_local_one(mode):
    server = huge_number_server(401)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        remote = build_reward(RewardConfig(components=[RewardComponentConfig(url=url, name="judge", retries=0)],
                                           on_error=mode))
        local = CombinedReward([Component("judge", lambda prompts, completions, **kw: [10**400])], mode)
        if mode == "raise":
            with pytest.raises(RewardError) as from_remote:
                remote(["p"], ["c"])
            with pytest.raises(RewardError) as from_local:
                local(["p"], ["c"])
            assert str(from_remote.value) == str(from_local.value)
            assert "reward 'judge' returned 1000000000000000000000000000000000000000... (401 digits) for sample 0: " \
                   "it is too large for a float" in str(from_remote.value)
        else:
            for reward in (remote, local):
                result = reward(["p", "q"][:1], ["c"])
                assert result.valid == [False] and result.metrics["reward/judge/invalid"] == 1.0
    finally:
        server.shutdown()
        server.server_close()


def test_a_score_past_pythons_4300_digit_limit_from_a_remote_scorer_is_named_not_a_valueerror():
    """json.loads raised ValueError ("use sys.set_int_max_str_digits()"), reported as the scorer raising."""
    server = huge_number_server(5000)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        reward = build_reward(RewardConfig(components=[RewardComponentConfig(url=url, name="judge", retries=0)]))
        with pytest.raises(RewardError, match=r"^reward 'judge' returned inf for sample 0: scores must be finite"):
            reward(["p"], ["c"])
    finally:
        server.shutdown()
        server.server_close()


def test_the_server_answers_a_reward_of_10_to_the_400_with_one_line_not_a_500():
    with Served(CombinedReward([Component("huge", lambda prompts, completions, **kw: [10**400])])) as served:
        code, answer = post(served.url, {"prompts": ["p"], "completions": ["c"]})
    assert code == 422 and answer["error"].startswith("reward 'huge' returned 1000000000000000000000000000000000000000"
                                                      "... (401 digits) for sample 0: it is too large for a float")


# --- through the command line ----------------------------------------------------------------------------------

SMALL = ["run.progress=false", "train.rollout_batch_size=8", "train.mini_batch_size=4", "train.micro_batch_size=4",
         "train.epochs=1", "data.eval_size=8", "run.eval_every=0", "run.device=cpu", "run.threads=1",
         "run.save_every=0"]


REWARDS = """
import numpy as np

def huge(prompts, completions, **kwargs):
    return [10**400] + [0.5] * (len(completions) - 1)

def nan(prompts, completions, **kwargs):
    return [float("nan")] + [0.5] * (len(completions) - 1)

def square(prompts, completions, **kwargs):
    return np.ones((len(completions), len(completions)))
"""


@pytest.mark.slow
def test_a_reward_of_10_to_the_400_through_the_command_line(tiny_model_dir, tmp_path):
    (tmp_path / "rw.py").write_text(REWARDS)

    def run(name, *args):
        return launch_ppo([*SMALL, f"model.name_or_path={tiny_model_dir}", f"run.output_dir={tmp_path / name}",
                           f"reward.function={tmp_path / 'rw.py'}:{name}", "train.total_steps=1", *args], ranks=0)

    assert_one_line(run("huge"), "reward 'huge' returned 1000000000000000000000000000000000000000... (401 digits) "
                                 "for sample 0: it is too large for a float")
    assert_one_line(run("square"), "reward 'square' returned a 2-D ndarray of shape (8, 8)")
    # under skip, the sample is dropped and counted and the run goes on, exactly as for NaN
    for name in ("huge", "nan"):
        out = run(name, "reward.on_error=skip")
        assert out.returncode == 0, out.stderr[-3000:]
        row, = training_rows(tmp_path / name)
        assert row[f"reward/{name}/invalid"] == 1.0 and row["reward/skipped"] >= 1.0, row


ENV = """
class HugeStep:
    def reset(self, seed=None, options=None):
        return "ab", {}

    def step(self, action):
        return "c", 10**400, True, False, {}
"""


@pytest.mark.slow
def test_an_environments_reward_of_10_to_the_400_through_the_command_line(tiny_model_dir, tmp_path):
    (tmp_path / "env.py").write_text(ENV)
    out = launch_ppo([*SMALL, f"model.name_or_path={tiny_model_dir}", f"run.output_dir={tmp_path / 'run'}",
                      f"env.name={tmp_path / 'env.py'}:HugeStep", "env.max_turns=2", "env.max_episode_tokens=20",
                      "reward.function=", "data.source=", "train.total_steps=1"], ranks=0)
    assert_one_line(out, "episode seed", "turn 1: step returned reward 1000000000000000000000000000000000000000... "
                         "(401 digits): it must be a finite number")
