"""Synthetic tasks whose answers a program can check: arithmetic, Python expressions, copy, reverse.

Why: a held-out loss says little about whether a small model can *do* anything, and free-form
generations need a judge. These tasks have exactly one right answer that `check()` verifies, they
cost nothing to generate in any quantity, and they stress what parallel drafting finds hard: carries
in multi-digit arithmetic (every digit depends on the ones to its right), operator precedence, and
long exact copies (where drafted tokens should almost always be accepted).

A task is a dict {"kind", "prompt", "answer"}. Every kind has its own seeded `random.Random`
stream per (split, seed), so `make_split(n, seed)` is a pure function of its arguments, a longer
split extends a shorter one (the first k tasks of each kind are the same) and the train and eval
streams never share a generator. `solve()` recomputes the answer from the prompt alone (for "expr"
by `eval` in an empty namespace after an `ast` whitelist), so a stored eval file can be re-verified.
"""

from __future__ import annotations

import ast
import operator
import random
import re
import string
from typing import Callable

from idlm.errors import ConfigError

KINDS = ("add", "sub", "mul", "expr", "copy", "reverse")
EVAL_SEED = 1234  # the seed of the committed held-out tasks (idlm/data/eval/tasks.jsonl)

_INT_KINDS = frozenset({"add", "sub", "mul", "expr"})
_ARITH = {"add": "+", "sub": "-", "mul": "*"}
_ARITH_RE = re.compile(r"^What is (-?\d+) ([+*-]) (-?\d+)\?$")
_EXPR_RE = re.compile(r"^What is the value of the Python expression `([^`]+)`\?$")
_COPY_PREFIX = "Copy this text exactly:\n"
_REVERSE_PREFIXES = {
    "chars": "Reverse the characters of this text:\n",
    "words": "Reverse the order of the words in this text:\n",
}
_EXPR_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
             ast.Mod: operator.mod}
_EXPR_MAX_ABS = 100_000
_EXPR_MAX_CHARS = 200


# ---------------------------------------------------------------------------------------------
# safe evaluation of the expression tasks


def safe_eval(expr: str) -> int:
    """The int value of an expression of int literals, + - * // %, unary minus and parentheses.

    The expression is parsed and every node checked against a whitelist before `eval` runs it with
    no builtins, so nothing but integer arithmetic can execute. ValueError on anything else
    (including division by zero).
    """
    if not isinstance(expr, str) or len(expr) > _EXPR_MAX_CHARS:
        raise ValueError(f"not an expression string of at most {_EXPR_MAX_CHARS} characters: {expr!r}")
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not a Python expression: {expr!r}") from e
    for node in ast.walk(tree):
        ok = isinstance(node, (ast.Expression, ast.BinOp, ast.UnaryOp, ast.USub, *_EXPR_OPS)) or (
            isinstance(node, ast.Constant) and type(node.value) is int
        )
        if not ok:
            raise ValueError(f"{type(node).__name__} is not allowed in an arithmetic expression: {expr!r}")
    try:
        value = eval(compile(tree, "<expr>", "eval"), {"__builtins__": {}}, {})
    except ZeroDivisionError as e:
        raise ValueError(f"division by zero in {expr!r}") from e
    return int(value)


def _random_expr(rng: random.Random, depth: int) -> ast.expr:
    """A random expression tree; leaves are ints 0..50, inner nodes one of the five operators."""
    if depth == 0 or rng.random() < 0.25:
        return ast.Constant(rng.randint(0, 50))
    op = rng.choice(list(_EXPR_OPS))
    return ast.BinOp(_random_expr(rng, depth - 1), op(), _random_expr(rng, depth - 1))


# ---------------------------------------------------------------------------------------------
# generators: one function per kind, each drawing only from the rng it is given


def _digits(rng: random.Random, lo: int, hi: int) -> int:
    """A random int with lo..hi digits (uniform over the digit count, then over the value)."""
    n = rng.randint(lo, hi)
    return rng.randint(10 ** (n - 1) if n > 1 else 0, 10**n - 1)


def _arith(kind: str, rng: random.Random) -> dict:
    a, b = (_digits(rng, 2, 4), _digits(rng, 1, 3)) if kind == "mul" else (_digits(rng, 2, 6), _digits(rng, 2, 6))
    value = {"add": a + b, "sub": a - b, "mul": a * b}[kind]
    return {"kind": kind, "prompt": f"What is {a} {_ARITH[kind]} {b}?", "answer": str(value)}


def _expr(rng: random.Random) -> dict:
    while True:  # rejection sampling: a real operator at the top, no division by zero, a modest value
        tree = _random_expr(rng, rng.randint(1, 3))
        if not isinstance(tree, ast.BinOp):
            continue
        expr = ast.unparse(tree)  # minimal parentheses, Python's own precedence
        try:
            value = safe_eval(expr)
        except ValueError:
            continue
        if abs(value) <= _EXPR_MAX_ABS:
            return {"kind": "expr", "prompt": f"What is the value of the Python expression `{expr}`?",
                    "answer": str(value)}


def _random_text(rng: random.Random) -> tuple[str, str]:
    """('words', a list of 3..10 short lowercase words) or ('chars', a 5..30 character string)."""
    if rng.random() < 0.5:
        words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 7))) for _ in range(rng.randint(3, 10))]
        return "words", " ".join(words)
    alphabet = string.ascii_letters + string.digits
    return "chars", "".join(rng.choices(alphabet, k=rng.randint(5, 30)))


def _copy(rng: random.Random) -> dict:
    _, text = _random_text(rng)
    return {"kind": "copy", "prompt": _COPY_PREFIX + text, "answer": text}


def _reverse(rng: random.Random) -> dict:
    mode, text = _random_text(rng)
    answer = " ".join(reversed(text.split(" "))) if mode == "words" else text[::-1]
    return {"kind": "reverse", "prompt": _REVERSE_PREFIXES[mode] + text, "answer": answer}


_GENERATORS: dict[str, Callable[[random.Random], dict]] = {
    "add": lambda rng: _arith("add", rng),
    "sub": lambda rng: _arith("sub", rng),
    "mul": lambda rng: _arith("mul", rng),
    "expr": _expr,
    "copy": _copy,
    "reverse": _reverse,
}


def make_rng(kind: str, seed: int, split: str = "train") -> random.Random:
    """The generator of one kind's task stream (str seeds hash with sha512: same on every machine)."""
    return random.Random(f"idlm-synthetic/{split}/{seed}/{kind}")


def make_tasks(kind: str, n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """The first n tasks of one kind's stream."""
    if kind not in _GENERATORS:
        raise ConfigError(f"unknown task kind {kind!r}; expected one of {KINDS}")
    if type(n) is not int or n < 0:
        raise ConfigError(f"number of tasks must be a non-negative int, got {n!r}")
    rng = make_rng(kind, seed, split)
    return [_GENERATORS[kind](rng) for _ in range(n)]


def make_split(n: int, seed: int = 0, split: str = "train", kinds: tuple[str, ...] = KINDS) -> list[dict]:
    """n tasks, kinds interleaved round-robin; task i is the (i // len(kinds))-th of its kind's stream."""
    if type(n) is not int or n < 0:
        raise ConfigError(f"number of tasks must be a non-negative int, got {n!r}")
    if not kinds:
        raise ConfigError("kinds must not be empty")
    per_kind = {k: make_tasks(k, -(-n // len(kinds)), seed, split) for k in kinds}
    return [per_kind[kinds[i % len(kinds)]][i // len(kinds)] for i in range(n)]


def eval_tasks(n_per_kind: int = 100, seed: int = EVAL_SEED) -> list[dict]:
    """Held-out tasks: n_per_kind of every kind from the 'eval' streams (never used for training)."""
    return make_split(n_per_kind * len(KINDS), seed, split="eval")


# ---------------------------------------------------------------------------------------------
# checking


def solve(task: dict) -> str:
    """The answer recomputed from the prompt alone (ValueError if the prompt is not a task's)."""
    kind, prompt = task.get("kind"), task.get("prompt")
    if not isinstance(prompt, str):
        raise ValueError(f"task without a prompt string: {task!r}")
    if kind in _ARITH:
        m = _ARITH_RE.match(prompt)
        if not m or m.group(2) != _ARITH[kind]:
            raise ValueError(f"not a {kind} prompt: {prompt!r}")
        a, b = int(m.group(1)), int(m.group(3))
        return str({"add": a + b, "sub": a - b, "mul": a * b}[kind])
    if kind == "expr":
        m = _EXPR_RE.match(prompt)
        if not m:
            raise ValueError(f"not an expr prompt: {prompt!r}")
        return str(safe_eval(m.group(1)))
    if kind == "copy" and prompt.startswith(_COPY_PREFIX):
        return prompt[len(_COPY_PREFIX) :]
    if kind == "reverse":
        for mode, prefix in _REVERSE_PREFIXES.items():
            if prompt.startswith(prefix):
                text = prompt[len(prefix) :]
                return " ".join(reversed(text.split(" "))) if mode == "words" else text[::-1]
    raise ValueError(f"not a task of a known kind: {task!r}")


def _as_int(text: str) -> int | None:
    try:
        return int(text.strip())
    except ValueError:
        return None


def check(task: dict, output_text: str) -> bool:
    """Whether a model's output answers the task: whitespace-stripped equality, integers compared as ints.

    For "expr" the reference value is recomputed from the prompt by `safe_eval`, not read from the
    stored answer.
    """
    if not isinstance(output_text, str):
        return False
    kind = task.get("kind")
    if kind in _INT_KINDS:
        got = _as_int(output_text)
        want = int(solve(task)) if kind == "expr" else _as_int(task["answer"])
        return got is not None and got == want
    return output_text.strip() == str(task["answer"]).strip()
