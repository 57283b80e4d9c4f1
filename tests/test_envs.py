"""Multi-turn episodes against environments: the Gymnasium API, token bookkeeping against a hand-built reference,
the chat rendering, bad environments, tools and the sandbox."""
import math

import gymnasium as gym
import pytest
import torch
from gymnasium import spaces

from llmrl import rl
from llmrl.config import EnvConfig, load_config
from llmrl.envs import make_env
from llmrl.envs.sandbox import Limits, SandboxError, run_python
from llmrl.envs.tools import ToolError, calculate
from llmrl.errors import ConfigError, EnvError
from llmrl.rollout.episodes import TurnRenderer, episode_stats, episodes_to_experience, play_episodes
from tests.helpers import REPO, make_trainer


class Echo(gym.Env):
    """Observation 'ab' at reset; every step answers 'c' with reward 0.5; terminates at the third step with 2.0."""

    def __init__(self, fail_at: str = "", obs_type: str = "text"):
        self.observation_space, self.action_space = spaces.Text(20), spaces.Text(20)
        self.fail_at, self.obs_type, self.t = fail_at, obs_type, 0

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        if self.fail_at == "reset":
            raise KeyError("no level file")
        self.t = 0
        return "ab", {}

    def step(self, action):
        self.t += 1
        if self.fail_at == "step":
            raise ZeroDivisionError("boom")
        if self.fail_at == "nan":
            return "c", math.nan, False, False, {}
        if self.fail_at == "obs":
            return [1, 2], 0.0, False, False, {}
        if self.fail_at == "never":
            return "c", 0.0, False, False, {}
        return "c", (2.0 if self.t == 3 else 0.5), self.t == 3, False, {}


def scripted(turns):
    """A sampler that returns the given token lists turn after turn (one per episode, same for all)."""
    calls = []

    def sample(contexts, max_new_tokens):
        calls.append([list(c) for c in contexts])
        return [list(turns[len(calls) - 1]) for _ in contexts]
    return sample, calls


def test_guess_number_follows_gymnasiums_api_and_needs_the_feedback():
    from gymnasium.utils.env_checker import check_env

    env = make_env("guess_number", {"low": 1, "high": 8})
    check_env(env, skip_render_check=True)
    obs, info = env.reset(seed=5)
    secret = info["secret"]
    assert obs == "?" and 1 <= secret <= 8
    assert env.reset(seed=5)[1]["secret"] == secret  # the seed fixes the episode
    low, high, turns = 1, 8, 0
    while True:  # binary search on the feedback finds it within 4 guesses
        guess = (low + high) // 2
        obs, reward, terminated, truncated, _ = env.step(str(guess))
        turns += 1
        if terminated:
            break
        low, high = (guess + 1, high) if obs == "+" else (low, guess - 1)
    assert reward == 1.0 and turns <= 4
    assert env.reset(options={"secret": 3})[1]["secret"] == 3
    assert env.step("x")[1:3] == (0.0, True)  # not a number: the episode ends


def test_an_episode_equals_the_hand_built_reference(tiny_model_dir, tmp_path):
    """Two model turns, the environment's reply between them, a third turn: ids carried as sampled (not re-tokenised),
    the loss mask on the model's tokens, each step's reward on its turn's last token, log-probs equal to a plain
    per-token loop, GAE over the model's tokens only."""
    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        f"model.name_or_path={tiny_model_dir}", f"run.output_dir={tmp_path}", "env.name=tests/test_envs.py:Echo",
        "env.max_turns=3", "env.max_episode_tokens=20", "reward.function=", "run.device=cpu", "data.source=",
        "train.rollout_batch_size=2", "train.mini_batch_size=2", "train.micro_batch_size=2", "data.eval_size=2"])
    trainer = make_trainer(cfg)
    tok = trainer.tokenizer
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tok.eos_token_id
    # Turn 1: "d", "e" sampled as two tokens and the stop token; turn 2: "f" without a stop token; turn 3: "a", stop.
    turns = [enc("d") + enc("e") + [eos], enc("f"), enc("a") + [eos]]
    sample, calls = scripted(turns)
    envs = [Echo(), Echo()]
    episodes = play_episodes(envs, [(0, None), (1, None)], sample, tok, TurnRenderer(tok, cfg.env), cfg.env, 8, "echo")
    reply = enc("c")  # observation_format {observation}: the observation's own tokens
    expected = turns[0] + reply + turns[1] + reply + turns[2]
    ep = episodes[0]
    assert ep.prompt_ids == enc("ab")
    assert ep.ids == expected
    assert ep.action == [1, 1, 1, 0, 1, 0, 1, 1]
    assert ep.rewards == [(2, 0.5), (4, 0.5), (7, 2.0)] and ep.total_reward == 3.0
    assert ep.turns == 3 and ep.terminated and ep.reason == "terminated"
    # The model was given exactly the ids so far at each turn, never a re-tokenised text.
    assert calls[1][0] == enc("ab") + turns[0] + reply
    assert calls[2][0] == enc("ab") + turns[0] + reply + turns[1] + reply

    exp = episodes_to_experience(episodes, tok.pad_token_id, trainer.device)
    assert exp.response[0].tolist() == expected
    assert exp.loss_mask[0].tolist() == [1, 1, 1, 0, 1, 0, 1, 1]
    assert exp.step_rewards[0].tolist() == [0, 0, 0.5, 0, 0.5, 0, 0, 2.0]
    trainer.fill_logprobs(exp)
    model = trainer.policy.model
    full = ep.prompt_ids + ep.ids
    with torch.no_grad():
        for j, is_model in enumerate(ep.action):
            if is_model:
                logits = model(torch.tensor([full[:2 + j]])).logits[0, -1].float()
                assert exp.logprobs[0, j].item() == pytest.approx(torch.log_softmax(logits, -1)[full[2 + j]].item(),
                                                                  abs=1e-5)
                with model.disable_adapter():
                    ref = torch.log_softmax(model(torch.tensor([full[:2 + j]])).logits[0, -1].float(), -1)
                assert exp.ref_logprobs[0, j].item() == pytest.approx(ref[full[2 + j]].item(), abs=1e-5)

    # PPO: per-token rewards are -beta * KL on the model's tokens plus each step's reward on its token; GAE skips
    # the environment's tokens (compared with GAE run over the model's tokens pulled together).
    mask = exp.loss_mask
    values = torch.randn_like(mask)
    adv, ret = trainer.estimator.advantages(torch.tensor([3.0, 3.0]), exp.logprobs, exp.ref_logprobs, values, mask,
                                            0.1, torch.tensor([True, True]), step_rewards=exp.step_rewards)
    keep = mask[0].bool()
    kl = (exp.logprobs - exp.ref_logprobs)[0, keep]
    r = -0.1 * kl + exp.step_rewards[0, keep]
    g, lam = cfg.ppo.gamma, cfg.ppo.lam
    ref_adv, running = [], 0.0
    v = values[0, keep].tolist()
    for t in reversed(range(len(v))):
        running = r[t].item() + g * (v[t + 1] if t + 1 < len(v) else 0.0) - v[t] + g * lam * running
        ref_adv.append(running)
    assert adv[0, keep].tolist() == pytest.approx(ref_adv[::-1], abs=1e-5)
    assert (adv[0, ~keep] == 0).all() and (ret[0, ~keep] == 0).all()


def test_observations_are_user_turns_of_the_chat_template(chat_model_dir):
    """With a chat template the episode's tokens are what the template renders for the whole conversation."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_model_dir)
    renderer = TurnRenderer(tok, EnvConfig(name="x"))
    assert renderer.chat
    first = renderer.first("What is 2 + 3?")
    action = tok("5", add_special_tokens=False)["input_ids"]
    # The model's turn ended without the stop token (this template closes a turn with a newline, not EOS).
    reply = renderer.reply("Correct.", model_ended=False)
    conversation = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"},
                    {"role": "user", "content": "Correct."}]
    rendered = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert tok.decode(first + action + reply) == rendered
    with pytest.raises(ConfigError, match="no chat template"):
        TurnRenderer(_no_template(tok), EnvConfig(name="x", chat="on"))


def _no_template(tok):
    import copy

    plain = copy.copy(tok)
    plain.chat_template = None
    return plain


@pytest.mark.parametrize("fail_at, says", [
    ("reset", "reset raised KeyError"), ("step", "turn 1: step raised ZeroDivisionError: boom"),
    ("nan", "turn 1: step returned reward nan: it must be a finite number"),
    ("obs", "turn 1: step returned a list observation"),
])
def test_a_bad_environment_is_one_line_naming_it_the_episode_and_the_turn(tiny_model_dir, fail_at, says):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = EnvConfig(name="echo", max_turns=3, max_episode_tokens=20)
    sample, _ = scripted([[tok.eos_token_id]] * 3)
    with pytest.raises(EnvError) as e:
        play_episodes([Echo(fail_at)], [(7, None)], sample, tok, TurnRenderer(tok, cfg), cfg, 4, "echo")
    assert str(e.value).startswith("env 'echo', episode seed 7") and says in str(e.value)
    assert "\n" not in str(e.value)
    # reward.on_error: skip: the episode is dropped (not trained on) and counted; the good one goes on
    sample, _ = scripted([[tok.eos_token_id]] * 3)
    episodes = play_episodes([Echo(fail_at), Echo()], [(7, None), (8, None)], sample, tok, TurnRenderer(tok, cfg),
                             cfg, 4, "echo", skip_errors=True)
    assert episodes[0].error and episodes[0].reason == "env_error" and episodes[1].error is None
    assert episode_stats(episodes)["env/skipped"] == 1.0
    exp = episodes_to_experience(episodes, tok.pad_token_id, "cpu")
    assert exp.response_mask.shape[0] == 2


def test_an_environment_that_never_ends_is_truncated_at_max_turns_or_the_token_budget(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    a = tok("a", add_special_tokens=False)["input_ids"]
    sample, _ = scripted([a + [tok.eos_token_id]] * 10)
    cfg = EnvConfig(name="echo", max_turns=4, max_episode_tokens=100)
    ep, = play_episodes([Echo("never")], [(0, None)], sample, tok, TurnRenderer(tok, cfg), cfg, 4, "echo")
    assert (ep.turns, ep.reason, ep.truncated, ep.terminated) == (4, "max_turns", True, False)
    cfg = EnvConfig(name="echo", max_turns=50, max_episode_tokens=7)  # 2 model + 1 env tokens per turn
    sample, _ = scripted([a + [tok.eos_token_id]] * 50)
    ep, = play_episodes([Echo("never")], [(0, None)], sample, tok, TurnRenderer(tok, cfg), cfg, 4, "echo")
    # the third turn had room for one token of its two: cut there, and the environment is not shown half a reply
    assert ep.reason == "token_budget" and len(ep.ids) == 7 and ep.turns == 3 and len(ep.rewards) == 2


def test_a_teachers_episodes_are_the_tokens_a_rollout_of_the_same_replies_gives(chat_model_dir):
    """The warm start trains on what rollouts will produce: the teacher's turns rendered through the chat template
    exactly as play_episodes renders sampled turns, the loss on the same tokens as the rollout's action mask."""
    import random

    from transformers import AutoTokenizer

    from llmrl.demo.warm_start import TEACHERS, teacher_episodes

    tok = AutoTokenizer.from_pretrained(chat_model_dir)
    cfg = EnvConfig(name="calculator", kwargs={"digits": 3}, max_turns=2, max_episode_tokens=200)
    renderer = TurnRenderer(tok, cfg)
    for accuracy, turns in ((1.0, 2), (0.0, 1)):  # the expert calls the tool; the other answers with an estimate
        env = make_env("calculator", cfg.kwargs)
        (segments,) = teacher_episodes(env, renderer, tok, TEACHERS["calculator"], 2, accuracy, random.Random(0), 1)
        replies = [ids for ids, trained in segments if trained]
        texts = [tok.decode(ids[:-1]) for ids in replies]
        assert len(replies) == turns and all(ids[-1] == tok.eos_token_id for ids in replies)
        if accuracy:
            assert texts == [f"calc: {env.question}", f"answer: {int(env.answer)}"], texts
        else:
            assert texts[0].startswith("answer: ") and texts[0] != f"answer: {int(env.answer)}", texts
        sample, _ = scripted(replies)
        seed = random.Random(0).randrange(2**31)  # the teacher's first draw
        ep, = play_episodes([make_env("calculator", cfg.kwargs)], [(seed, None)], sample, tok, renderer, cfg, 32,
                            "calculator")
        assert ep.prompt_ids + ep.ids == [t for ids, _ in segments for t in ids]
        assert [0] * len(ep.prompt_ids) + ep.action == [int(trained) for ids, trained in segments for _ in ids]
        assert ep.total_reward == accuracy


def test_the_warm_start_fine_tunes_a_pretrained_base_on_the_teachers_episodes(chat_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from transformers import AutoTokenizer

    from llmrl.demo.tiny import tiny_gpt2
    from llmrl.demo.warm_start import run_env_warm_start

    def config(base):
        return load_config(REPO / "configs" / "smollm2_calculator.yaml", [
            f"warm_start.base={base}", f"model.name_or_path={tmp_path / 'warm'}", "warm_start.steps=2",
            "warm_start.batch_size=2", "warm_start.lr=1e-2", "env.kwargs.digits=2"])
    with pytest.raises(ConfigError, match=r"teacher episode of env 'calculator' is \d+ tokens, longer than the "
                                          r"model's context of 128"):  # its byte-level BPE knows few words
        run_env_warm_start(config(chat_model_dir), progress=False)
    tok = AutoTokenizer.from_pretrained(chat_model_dir)
    tiny_gpt2(tok, n_layer=1, n_embd=32, n_head=2, n_positions=512, seed=0).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    assert run_env_warm_start(config(tmp_path / "base"), progress=False) == tmp_path / "warm"
    before = AutoModelForCausalLM.from_pretrained(tmp_path / "base").state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "warm").state_dict()
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    cfg = load_config(REPO / "configs" / "smollm2_calculator.yaml", ["warm_start.base=null", "env.name=python_tool"])
    with pytest.raises(ConfigError, match="warm_start builds a tiny model for env guess_number"):
        run_env_warm_start(cfg, progress=False)


def test_calculator():
    assert calculate("12 * (3 + 4) - 2 ** 3") == "76"
    assert calculate("7 / 2") == "3.5"
    for bad in ("__import__('os').system('true')", "1 / 0", "2 ** 1000", "x + 1", "1 +"):
        with pytest.raises(ToolError):
            calculate(bad)


def test_a_failing_tool_ends_the_episode_with_its_reason_not_the_run():
    env = make_env("calculator", {"digits": 2})
    obs, info = env.reset(seed=0)
    assert "calc:" in obs
    obs, reward, terminated, _, _ = env.step("calc: 6 * 7")
    assert obs == "= 42" and reward == 0.0 and not terminated
    obs, reward, terminated, _, info = env.step("calc: 1 / 0")
    assert terminated and reward == 0.0 and info["reason"].startswith("tool error: division by zero")
    env.reset(seed=0)
    assert env.step(f"answer: {int(info_answer(env))}")[1] == 1.0
    no_tool = make_env("calculator", {"digits": 2, "tool": False})
    assert "calc" not in no_tool.reset(seed=0)[0]
    assert no_tool.step("calc: 6 * 7")[2]  # without the tool a call is just a wrong answer

    py = make_env("python_tool", {"digits": 2, "wall_seconds": 2.0, "cpu_seconds": 1})
    py.reset(seed=0)
    assert py.step("python: print(6 * 7)")[0] == "= 42"
    for code, why in (("while True: pass", "CPU"), ("import time; time.sleep(60)", "timed out"),
                      ("raise ValueError('bad')", "ValueError: bad"), ("print('x' * 100000)", "printed")):
        py.reset(seed=0)
        _, reward, terminated, _, info = py.step(f"python: {code}")
        assert terminated and reward == 0.0 and why in info["reason"], info


def info_answer(env):
    return env.answer


def test_the_sandbox_limits_memory_isolated_or_not():
    # the isolation itself (namespaces, files, processes, network, output) is tested in test_sandbox.py
    for isolated in (True, False):
        with pytest.raises(SandboxError, match="MemoryError"):
            run_python("x = bytearray(2 * 1024**3)", Limits(memory_mb=256), isolated=isolated)
        assert run_python("print(sum(range(10)))", isolated=isolated) == "45\n"
    with pytest.raises(SandboxError, match="socket"):  # unisolated, the socket modules are removed at least
        run_python("import socket", isolated=False)


def test_environment_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="env.name = 'nope' must be a built-in environment"):
        make_env("nope", {})
    with pytest.raises(ConfigError, match="building it with env.kwargs"):
        make_env("guess_number", {"low": 5, "high": 1})
    (tmp_path / "e.py").write_text("class NotAnEnv:\n    pass\n")
    with pytest.raises(ConfigError, match="has no reset method"):
        make_env(f"{tmp_path}/e.py:NotAnEnv", {})
    with pytest.raises(ConfigError, match="reward.function is set with env.name"):
        load_config(REPO / "configs" / "guess_number.yaml", ["reward.function=exact_match"])
    with pytest.raises(ConfigError, match="env.max_turns is 0"):
        load_config(REPO / "configs" / "guess_number.yaml", ["env.max_turns=0"])


class Counter:
    """A TRL-style environment (GRPOTrainer's environment_factory): reset(), tool methods, get_reward()."""

    def reset(self):
        self.count = 0
        return "Count to 3 with the increment tool, then say done."

    def increment(self, by: int = 1) -> str:
        """Adds ``by`` to the count."""
        if by > 10:
            raise ValueError("too far")
        self.count += by
        return f"count is {self.count}"

    def get_reward(self) -> float:
        return float(self.count == 3)


def test_a_trl_style_environment_runs_as_a_gymnasium_one():
    env = make_env("tests/test_envs.py:Counter", {})
    obs, info = env.reset(seed=0, options={"prompt": "Hello."})
    assert obs == "Hello.\nCount to 3 with the increment tool, then say done." and info["tools"] == ["increment"]
    call = '<tool_call>{"name": "increment", "arguments": {"by": 2}}</tool_call>'
    assert env.step(call) == ("count is 2", 0.0, False, False, {"tool_call": "increment"})
    assert env.step('{"name": "increment"}')[0] == "count is 3"
    assert env.step("done")[1:3] == (1.0, True)  # no tool call: the episode ends, scored by get_reward
    env.reset()
    _, reward, terminated, _, info = env.step('{"name": "increment", "arguments": {"by": 50}}')
    assert terminated and reward == 0.0 and info["reason"] == "tool error: ValueError: too far"
    env.reset()
    assert env.step('{"name": "reset"}')[1:3] == (0.0, True)  # only tools are callable, not reset or get_reward
