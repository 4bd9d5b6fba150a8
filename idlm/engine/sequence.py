"""One request inside the engine: its tokens, KV progress, decoder state and output.

KV bookkeeping in one list: `kv_tokens` are the tokens whose KV belongs in the cache (the prompt,
then each decode step's kept block tokens, `QueryBlock.tokens[:advance]`), and `num_computed` how many of
them have KV in the cache now. A request is *prefilling* while num_computed < len(kv_tokens): on
admission (prompt), and again after preemption, which frees its pages and resets num_computed to
0 (preemption by recompute: the decoder state and output are kept, so nothing is emitted twice).
Recompute is an ordinary causal prefill, so it reproduces the KV exactly for AR, ISD and R-ISD;
SDAR's committed blocks were written with block-bidirectional attention, so an SDAR request that is
preempted continues from causally recomputed KV (valid, but not bit-identical to an uninterrupted run).
Prompt logprobs (`output.prompt_logprobs`) are recorded once, as prefill chunks pass over the prompt;
a recompute skips what is recorded, and prefix-cache hits never cover positions still to be scored.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from idlm.decoding.output import GenerationOutput
from idlm.decoding.sampling import RequestRNG, SamplingParams
from idlm.decoding.stops import StopChecker


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    checker: StopChecker
    rng: RequestRNG  # its counter-based random stream (seed + draw number)
    arrival: float = field(default_factory=time.perf_counter)
    status: SeqStatus = SeqStatus.WAITING
    kv_tokens: list[int] = field(default_factory=list)
    num_computed: int = 0
    state: object | None = None  # the decoder's state; None until the first token is drawn
    output: GenerationOutput | None = None
    num_preemptions: int = 0
    first_token_time: float | None = None
    finish_time: float | None = None

    def __post_init__(self):
        if not self.kv_tokens:
            self.kv_tokens = list(self.prompt)
        if self.output is None:
            self.output = GenerationOutput(list(self.prompt))

    @property
    def prefilling(self) -> bool:
        return self.num_computed < len(self.kv_tokens)

    @property
    def max_prefix_hit(self) -> int | None:
        """At most this many leading tokens may come from the prefix cache (None: no limit). Prompt logprobs
        need the logits of every prompt position not yet scored: prompt token i is predicted by position
        i − 1, so with L entries recorded positions L−1.. must be computed (0 before any)."""
        if self.params.prompt_logprobs is None or len(self.output.prompt_logprobs) >= len(self.prompt):
            return None
        return max(0, len(self.output.prompt_logprobs) - 1)

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
