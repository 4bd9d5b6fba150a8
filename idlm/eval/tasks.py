"""Accuracy on held-out tasks for any model + decoder (`idlm eval tasks`).

Synthetic tasks (arithmetic, Python expressions, copy, reverse: `idlm.data.synthetic`) are checked
exactly. Mined instruction pairs (signature + docstring → function) are scored by exact match and by
whether the output parses as Python defining the requested function (a tiny model rarely matches
exactly; parsing is the weaker, still checkable signal). Prompts go through the chat template.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from idlm.decoding.sampling import SamplingParams


COMMITTED_TASKS = Path(__file__).resolve().parent.parent / "data" / "eval" / "tasks.jsonl"


def load_jsonl(path: str | Path) -> list[dict]:
    from idlm.data import DataError
    from idlm.data.io import read_jsonl
    from idlm.errors import ConfigError

    try:
        rows = list(read_jsonl(path))
    except DataError as e:
        raise ConfigError(f"cannot read task file {path}: {e}") from None
    out = []
    for i, r in enumerate(rows, 1):
        if isinstance(r, dict) and "user" in r and "assistant" in r:  # mined instruction pairs (idlm.data)
            r = {"kind": "instruction", "prompt": r["user"], "answer": r["assistant"]}
        if not isinstance(r, dict) or "prompt" not in r or "answer" not in r:
            raise ConfigError(f"{path}:{i}: each line needs \"prompt\" and \"answer\" (or \"user\" and \"assistant\")")
        out.append(r)
    return out


def _strip_fence(text: str) -> str:
    t = text.strip()
    if t.startswith("```"):
        t = t.split("\n", 1)[1] if "\n" in t else ""
        t = t.rsplit("```", 1)[0]
    return t


def parses_as_function(text: str, answer: str) -> bool:
    """The output is valid Python defining a function of the answer's name."""
    try:
        funcs = (ast.FunctionDef, ast.AsyncFunctionDef)
        want = next(n.name for n in ast.walk(ast.parse(answer)) if isinstance(n, funcs))
        tree = ast.parse(_strip_fence(text))
    except (SyntaxError, StopIteration, ValueError):
        return False
    return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == want for n in ast.walk(tree))


def evaluate_tasks(model, tokenizer, decoder, tasks: list[dict], *, lora=None, batch_size: int = 64,
                   max_tokens: int | None = None, params: SamplingParams | None = None) -> dict:
    """Per-kind accuracy of greedy (by default) answers; instruction pairs also report `parses`."""
    from idlm.data.synthetic import check
    from idlm.decoding.reference import generate  # (on use: the data commands import this module for its
    from idlm.decoding.sampling import SamplingParams  # paths, and `idlm --help` should not load torch)

    eos = sorted(set(tokenizer.eos_token_ids) | set(model.config.eos_token_ids))
    by_kind: dict[str, list[float]] = {}
    parses: list[float] = []
    forwards = committed = 0
    for start in range(0, len(tasks), batch_size):
        chunk = tasks[start: start + batch_size]
        prompts = [tokenizer.encode_chat([{"role": "user", "content": t["prompt"]}]) for t in chunk]
        plist = []
        for t in chunk:
            n = max_tokens or min(512, len(tokenizer.encode(str(t["answer"]))) + 16)
            plist.append(params or SamplingParams(temperature=0.0, max_tokens=n))
        outs = generate(model, decoder, prompts, plist, lora=lora, eos_token_ids=eos, tokenizer=tokenizer)
        for t, o in zip(chunk, outs):
            kind = t.get("kind", "instruction")
            if kind == "instruction":
                ok = _strip_fence(o.text).strip() == str(t["answer"]).strip()
                parses.append(float(parses_as_function(o.text, str(t["answer"]))))
            else:
                ok = check(t, o.text)
            by_kind.setdefault(kind, []).append(float(ok))
            forwards += o.stats.forwards
            committed += o.stats.committed
    acc = {k: sum(v) / len(v) for k, v in sorted(by_kind.items())}
    res = {"accuracy": acc, "n": {k: len(v) for k, v in sorted(by_kind.items())},
           "mean_accuracy": sum(acc.values()) / max(len(acc), 1), "tpf": committed / max(forwards, 1)}
    if parses:
        res["instruction_parses"] = sum(parses) / len(parses)
    return res
