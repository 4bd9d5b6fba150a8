"""The per-request output and the stop/commit logic shared by the reference runner and the engine.

Why it exists: `GenerationOutput` (what one request produced), `check_request` (which requests can run)
and `apply_result` (append one step's tokens, applying the stop rules) are used alike by the reference
decoding loop (`idlm.decoding.reference.generate`) and the batched engine (`idlm.engine`), which must
produce the same output request by request; keeping them here lets the engine import them without
depending on the reference loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from idlm.decoding.base import DecodeStats, StepResult
from idlm.decoding.sampling import SamplingParams
from idlm.decoding.stops import StopChecker
from idlm.errors import ConfigError


@dataclass
class GenerationOutput:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    token_probs: list[float] = field(default_factory=list)  # q(x) each token was drawn with (StepResult.probs)
    text: str | None = None  # decoded (special tokens skipped, cut at a stop string) when a tokenizer is given
    finish_reason: str | None = None  # "stop" (EOS / stop id / stop string), "length" (max_tokens), "abort", "error"
    stats: DecodeStats = field(default_factory=DecodeStats)
    timing: dict = field(default_factory=dict)
    error: str | None = None  # finish_reason "error": what failed inside the engine step (that request alone)
    # SamplingParams.logprobs = k (else empty): the raw logprob of each token (log_softmax of the logits
    # that predict it, before temperature/top-k/top-p) and its top-k (id, logprob) pairs, sorted descending
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # SamplingParams.prompt_logprobs = k (else empty): aligned with prompt_token_ids; the first is None
    prompt_logprobs: list[float | None] = field(default_factory=list)
    prompt_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)


def check_request(prompt: list[int], params: SamplingParams, context: int, vocab_size: int) -> None:
    """Reject requests that cannot run, naming the problem."""
    if not prompt:
        raise ConfigError("the prompt is empty: at least one token is needed")
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise ConfigError(f"prompt token id {bad[0]} is outside the vocabulary (size {vocab_size})")
    if len(prompt) + params.max_tokens > context:
        raise ConfigError(
            f"prompt of {len(prompt)} tokens + max_tokens {params.max_tokens} exceeds the model's "
            f"context of {context} tokens"
        )


def apply_result(out: GenerationOutput, checker: StopChecker, res: StepResult, from_decode: bool) -> bool:
    """Append one step's emitted tokens (with their q and, if asked, logprobs) to `out`, applying the stop
    rules token by token (tokens after a stop are dropped); True once the request is finished. Shared by
    the reference runner and the engine."""
    n = checker.accept(res.emitted)  # tokens kept: all, or up to the one that finished the request
    out.token_ids += res.emitted[:n]
    out.token_probs += res.probs[:n] if res.probs is not None else [float("nan")] * n
    if res.logprobs is not None:
        out.logprobs += res.logprobs[:n]
        out.top_logprobs += res.top_logprobs[:n] if res.top_logprobs is not None else [[] for _ in range(n)]
    if from_decode:
        out.stats.committed += n
    if checker.finish_reason is not None:
        out.finish_reason = checker.finish_reason
        return True
    return False
