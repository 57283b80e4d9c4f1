"""Tool use: arithmetic questions the model may answer with the help of a tool whose result it reads.

The model replies either ``calc: EXPRESSION`` (``python: CODE`` for the Python tool), and the environment answers
``= RESULT``, or ``answer: NUMBER``, which ends the episode: reward 1 when it is right (``tool_reward``, 0 by
default, shapes the start: a reward for a tool call that returned a result). A tool that raises,
runs too long or returns something that is not a short line of text ends the episode with reward 0 and the reason
in ``info["reason"]``; the run goes on. ``tool: false`` builds the same questions without the tool, to measure
what the tool adds.
"""
from __future__ import annotations

import ast
import operator
import re
import string

import gymnasium as gym
from gymnasium import spaces

from llmrl.envs.sandbox import INSTALL_HINT, Limits, SandboxError, isolation_problem, run_python
from llmrl.errors import ConfigError

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
       ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}

BINARY = {"+": operator.add, "-": operator.sub, "*": operator.mul}


class ToolError(RuntimeError):
    """The tool could not give a result; the message says why."""


def calculate(expression: str) -> str:
    """The value of an arithmetic expression of numbers, + - * / // % ** and parentheses; nothing else is run.

    >>> calculate("12 * (3 + 4)"), calculate("7 / 2")
    ('84', '3.5')
    """
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ToolError(f"not an arithmetic expression: {expression[:60]!r}") from None

    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = value(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and type(node.op) in OPS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ToolError(f"exponent {right} is too large")
            try:
                return OPS[type(node.op)](left, right)
            except (ZeroDivisionError, OverflowError) as e:
                raise ToolError(str(e)) from None
        raise ToolError(f"only numbers and + - * / // % ** are allowed, not {ast.dump(node)[:40]}")

    result = value(tree.body)
    if isinstance(result, float):
        result = round(result, 6)
        if result == int(result):
            result = int(result)
    return str(result)


class ToolArithmetic(gym.Env):
    """Questions ``a OP b`` on ``digits``-digit numbers (``options={"question": ..., "answer": ...}`` gives one);
    subclasses say which tool there is."""

    metadata = {"render_modes": []}
    tool_name = ""

    def __init__(self, digits: int = 3, ops: str = "*", tool: bool = True, max_result_chars: int = 200,
                 tool_reward: float = 0.0):
        if digits < 1 or not ops or set(ops) - set("+-*"):
            raise ValueError(f"digits ({digits}) must be >= 1 and ops ({ops!r}) drawn from + - *")
        self.digits, self.ops, self.tool, self.max_result_chars = digits, ops, tool, max_result_chars
        self.tool_reward = tool_reward  # for a tool call that returned a result: a shaping reward, 0 by default
        self.observation_space = spaces.Text(max_length=500, charset=string.printable)
        self.action_space = spaces.Text(max_length=500, charset=string.printable)
        self.answer: float | None = None
        self.question = ""

    def use_tool(self, argument: str) -> str:
        raise NotImplementedError

    def tool_call(self, question: str) -> str:
        """The reply that asks the tool for the value of ``question``."""
        raise NotImplementedError

    def tool_help(self, question: str) -> str:
        raise NotImplementedError

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        options = options or {}
        if "question" in options:
            question, self.answer = str(options["question"]), float(options["answer"])
        else:
            low, high = 10 ** (self.digits - 1), 10 ** self.digits
            a, b = (int(self.np_random.integers(low, high)) for _ in range(2))
            op = self.ops[int(self.np_random.integers(len(self.ops)))]
            question, self.answer = f"{a} {op} {b}", float(BINARY[op](a, b))
        self.question = question
        how = self.tool_help(question) if self.tool else ""
        return (f"{how}Reply 'answer: NUMBER' with your final answer. What is {question}?", {"answer": self.answer})

    def step(self, action: str):
        if self.answer is None:
            raise RuntimeError("step before reset")
        text = action.strip()
        prefix = f"{self.tool_name}:"
        at = text.lower().find(prefix)
        if self.tool and at >= 0 and "answer:" not in text[:at].lower():  # a call, wherever the reply puts it
            try:
                result = self.use_tool(text[at + len(prefix):].split("\n", 1)[0])
            except (ToolError, SandboxError) as e:
                return f"{self.tool_name} failed: {e}", 0.0, True, False, {"success": False,
                                                                          "reason": f"tool error: {e}"[:120]}
            if not isinstance(result, str) or len(result) > self.max_result_chars or "\x00" in result:
                return (f"{self.tool_name} returned something unusable", 0.0, True, False,
                        {"success": False, "reason": "tool returned garbage"})
            return f"= {result.strip()}", self.tool_reward, False, False, {"success": False, "tool_call": True}
        found = NUMBER.search(text.split("answer:", 1)[-1])
        if found is None:
            return "No number found.", 0.0, True, False, {"success": False, "reason": "no answer"}
        right = abs(float(found.group()) - self.answer) < 1e-6
        return ("Correct." if right else "Wrong."), float(right), True, False, {"success": right}


class CalculatorArithmetic(ToolArithmetic):
    tool_name = "calc"

    def tool_call(self, question: str) -> str:
        return f"calc: {question}"

    def tool_help(self, question: str) -> str:
        return f"To use the calculator, reply '{self.tool_call(question)}' and it replies with the value. "

    def use_tool(self, argument: str) -> str:
        return calculate(argument)


class PythonArithmetic(ToolArithmetic):
    """The tool runs Python in a sandbox (``llmrl.envs.sandbox``: bubblewrap namespaces, its own uid, limits) and
    returns what it printed. Without bubblewrap it refuses to start, unless ``unsafe_no_isolation`` is true."""

    tool_name = "python"

    def __init__(self, cpu_seconds: int = 2, memory_mb: int = 256, wall_seconds: float = 5.0, disk_mb: int = 16,
                 max_processes: int = 16, unsafe_no_isolation: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.limits = Limits(cpu_seconds, memory_mb, wall_seconds, disk_mb=disk_mb, max_processes=max_processes)
        self.isolated = not unsafe_no_isolation
        problem = isolation_problem() if self.isolated else None
        if problem:
            raise ConfigError(f"env python_tool runs model-written code in a bubblewrap sandbox, but {problem}: "
                              f"{INSTALL_HINT}; or set env.kwargs.unsafe_no_isolation: true to run it with rlimits "
                              f"only, NOT isolated (the code could read your files and signal your processes)")

    def tool_call(self, question: str) -> str:
        return f"python: print({question})"

    def tool_help(self, question: str) -> str:
        return f"You may run Python: reply '{self.tool_call(question)}' and it replies with what the code prints. "

    def use_tool(self, argument: str) -> str:
        return run_python(argument.strip(), self.limits, isolated=self.isolated)
