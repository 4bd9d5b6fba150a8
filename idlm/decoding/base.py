"""The decoder interface: what one decode step of one request looks like, whatever the algorithm.

A decoder never runs the model. Per step it says which query block each request feeds
(`block`: tokens, which of them are MASK slots, the R-ISD LoRA gate, how attention sees the block),
and, given the logits of that block, decides which tokens are committed (with their raw logprobs when
the request asks: `StepResult.logprobs`), how many of the block's KV slots to keep (`advance`), and the
request's next state (`step`). The reference runner
(`idlm.decoding.reference`) and the batched engine both drive decoders through this interface, so the
algorithm is written once. The engine asks for a whole batch's blocks at once (`blocks`: host arrays,
row b = `block(states[b])`), which decoders on its hot path compute without a per-row QueryBlock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from idlm.decoding.sampling import SamplingParams


@dataclass
class QueryBlock:
    """One request's query block: tokens at positions P..P+Q-1, P = its kept KV length."""
    tokens: list[int]
    is_mask: list[bool]  # MASK slots (R-ISD replaces their input embedding by the adapter's)
    gate: list[bool] | None = None  # R-ISD LoRA gate: 1 only on MASK slots whose logits become drafts
    # attention inside the block: None = causal; else visible[t] = last block index query t may see
    visible: list[int] | None = None
    # a tree of query rows (ISD's rejection branches): token t sits at position P + offsets[t] (None: P + t)
    # and does not see the block's tokens hide[t][0] <= i < hide[t][1] (None: it sees all up to `visible`)
    offsets: list[int] | None = None
    hide: list[tuple[int, int]] | None = None


@dataclass
class BlockBatch:
    """The query blocks of a batch as host arrays, row b = `Decoder.block(states[b])`."""
    tokens: np.ndarray  # [B, Q] int64
    is_mask: np.ndarray  # [B, Q] bool
    gate: np.ndarray | None = None  # [B, Q] bool (R-ISD); None when no block has a gate
    visible: np.ndarray | None = None  # [B, Q] int64, causal rows = arange(Q); None when every block is causal
    offsets: np.ndarray | None = None  # [B, Q] int64 position offsets (None: arange(Q) in every row)
    hide: np.ndarray | None = None  # [B, Q, 2] int64 hidden block-index ranges (None: none)

    @classmethod
    def stack(cls, blocks: list[QueryBlock]) -> "BlockBatch":
        q = len(blocks[0].tokens)
        gate = visible = offsets = hide = None
        if any(b.gate is not None for b in blocks):
            gate = np.array([[False] * q if b.gate is None else b.gate for b in blocks], dtype=bool)
        if any(b.visible is not None for b in blocks):
            visible = np.array([list(range(q)) if b.visible is None else b.visible for b in blocks], dtype=np.int64)
        if any(b.offsets is not None for b in blocks):
            offsets = np.array([list(range(q)) if b.offsets is None else b.offsets for b in blocks], dtype=np.int64)
        if any(b.hide is not None for b in blocks):
            hide = np.array([[(0, 0)] * q if b.hide is None else b.hide for b in blocks], dtype=np.int64)
        return cls(np.array([b.tokens for b in blocks], dtype=np.int64),
                   np.array([b.is_mask for b in blocks], dtype=bool), gate, visible, offsets, hide)


@dataclass
class ParamsInputs:
    """What a fused step derives from its rows' SamplingParams alone (`Decoder.params_inputs`): host tensors
    for `compute`, its static options, and per-row values `finish` reads. Read-only: every step of an
    unchanged batch shares it (`Decoder.batch_params`)."""
    tensors: dict[str, torch.Tensor]
    static: dict
    sampled: bool  # some row samples (temperature > 0): the step draws random numbers
    rows: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(slots=True)
class StepResult:
    emitted: list[int]  # tokens committed this step, in order (the runner applies stop rules)
    advance: int  # block KV slots kept, from the start of the block
    # q(x) of each emitted token under the distribution it was drawn from (a draft's q̃, p̃, or the
    # correction's residual): the "generation" side of the introspective acceptance rate α (SPEC §7)
    probs: list[float] | None = None
    # raw logprob of each emitted token (log_softmax of the logits that predict it, before temperature/top-k/
    # top-p) and its top-k (id, logprob) alternatives; set only for requests with SamplingParams.logprobs
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass
class DecodeStats:
    """Per-request (or, summed, per-run) counters of SPEC §7."""
    forwards: int = 0  # decode forwards (prefill excluded)
    committed: int = 0  # tokens committed by decode forwards (the first token comes from prefill)
    verified_per_position: list[int] = field(default_factory=list)  # drafts tested, by draft index
    accepted_per_position: list[int] = field(default_factory=list)
    rounds: dict[str, int] = field(default_factory=lambda: {"verify_accepted": 0, "verify_rejected": 0, "cold": 0})
    guessed: int = 0  # rejections whose correction was a guessed one (ISD's `guesses`): the next round's drafts
    # came from its guessed group

    def record_verify(self, k: int, n_accepted: int) -> None:
        """A verify round over k drafts whose first n_accepted were accepted."""
        if len(self.verified_per_position) < k:
            pad = k - len(self.verified_per_position)
            self.verified_per_position += [0] * pad
            self.accepted_per_position += [0] * pad
        for j in range(min(n_accepted + 1, k)):
            self.verified_per_position[j] += 1
        for j in range(n_accepted):
            self.accepted_per_position[j] += 1
        self.rounds["verify_accepted" if n_accepted == k else "verify_rejected"] += 1

    @property
    def tpf(self) -> float:
        return self.committed / self.forwards if self.forwards else 0.0

    @property
    def acceptance(self) -> float | None:
        v = sum(self.verified_per_position)
        return sum(self.accepted_per_position) / v if v else None

    @property
    def acceptance_per_position(self) -> list[float]:
        """Accepted / verified drafts at each draft index (conditional: index j is verified only when
        0..j−1 were accepted), rounded to 4 digits."""
        return [round(a / max(1, v), 4) for a, v in zip(self.accepted_per_position, self.verified_per_position)]

    @classmethod
    def total(cls, stats) -> "DecodeStats":
        """The merge of many requests' stats (e.g. `[o.stats for o in outputs]`)."""
        out = cls()
        for s in stats:
            out = out.merge(s)
        return out

    def merge(self, other: "DecodeStats") -> "DecodeStats":
        out = DecodeStats(self.forwards + other.forwards, self.committed + other.committed)
        k = max(len(self.verified_per_position), len(other.verified_per_position))

        def add(a: list[int], b: list[int]) -> list[int]:
            return [x + y for x, y in zip(a + [0] * (k - len(a)), b + [0] * (k - len(b)))]

        out.verified_per_position = add(self.verified_per_position, other.verified_per_position)
        out.accepted_per_position = add(self.accepted_per_position, other.accepted_per_position)
        out.rounds = {r: self.rounds.get(r, 0) + other.rounds.get(r, 0) for r in {**self.rounds, **other.rounds}}
        out.guessed = self.guessed + other.guessed
        return out

    def to_dict(self) -> dict:
        total = max(1, sum(self.rounds.values()))
        return {"forwards": self.forwards, "committed": self.committed, "tpf": round(self.tpf, 4),
                "acceptance": None if self.acceptance is None else round(self.acceptance, 4),
                "verified_per_position": self.verified_per_position,
                "accepted_per_position": self.accepted_per_position,
                "rounds": dict(self.rounds), "guessed": self.guessed,
                "round_mix": {r: round(n / total, 4) for r, n in self.rounds.items()}}


def to_device(tensors: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in tensors.items()}


class Decoder:
    """Base class. `query_len` tokens per request per decode step.

    A *fused* decoder (AR, ISD, R-ISD) splits `step` into three parts so the engine can run the
    middle one on the device inside its CUDA graph, with one host sync per step:
      `step_inputs`  host: per-row tensors besides the logits, incl. each sampled row's Philox key and
                     draw number (`RequestRNG`: the step's random numbers are drawn in `compute`)
      `compute`      device, pure and capturable: logits -> one packed float32 result per row
      `finish`       host: the packed rows (one copy to a numpy array) -> StepResults, next states, stats
    `step` composes them; the reference runner and the engine thus share every line of the algorithm.
    """
    name: str = "decoder"
    query_len: int = 1
    stride: int = 1  # the stride N (AR: 1; ISD / R-ISD set theirs, SDAR reports its block size)
    needs_mask_token: bool = False
    uses_lora: bool = False
    fused: bool = False
    _params_memo: tuple | None = None  # (params list, its ParamsInputs): `batch_params`

    def start(self, logits: torch.Tensor, params: list[SamplingParams],
              rngs: list) -> tuple[list, list[StepResult]]:  # rngs: each row's `RequestRNG`
        """After prefill: last-prompt-token logits [B, V] -> (states, what is emitted now; advance 0)."""
        raise NotImplementedError

    def block(self, state) -> QueryBlock:
        raise NotImplementedError

    def blocks(self, states: list) -> BlockBatch:
        """Every state's `block`, as arrays (what the engine feeds the model runner). Decoders whose
        blocks follow a simple pattern override it to build the arrays without per-row Blocks."""
        return BlockBatch.stack([self.block(s) for s in states])

    def params_inputs(self, params: list[SamplingParams]) -> ParamsInputs:
        """The part of `step_inputs` that depends on the params alone (fused decoders)."""
        raise NotImplementedError

    def batch_params(self, params: list[SamplingParams]) -> ParamsInputs:
        """`params_inputs(params)`, memoized on the list object: the engine hands its decoders the same
        params list for as long as its decode batch is unchanged (and a new list when it changes), so
        steady steps skip this per-row work. Other callers pass fresh lists and simply recompute."""
        memo = self._params_memo
        if memo is None or memo[0] is not params:
            memo = self._params_memo = (params, self.params_inputs(params))
        return memo[1]

    def step_inputs(self, states: list, params: list[SamplingParams], rngs: list,
                    vocab_size: int, device) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, static options) for `compute`; the static options pick a code path (and a CUDA graph).
        Small per-row tensors are built on the host (kept distributions stay on `device`): callers move them
        (`to_device`) or pack them into one transfer (the engine). `rngs`: each row's `RequestRNG`."""
        raise NotImplementedError

    def compute(self, logits: torch.Tensor, tensors: dict[str, torch.Tensor],
                **static) -> tuple[torch.Tensor, torch.Tensor | None]:
        """logits [B, Q, V] -> (packed [B, F] float32, an extra device tensor the next step needs, or None)."""
        raise NotImplementedError

    def finish(self, states: list, packed: np.ndarray, extra: torch.Tensor | None,
               params: list[SamplingParams], stats: list[DecodeStats]) -> list[StepResult]:
        """packed: `compute`'s result on the host, float32 [B, F]. Read it by columns (`.tolist()` of the
        ones needed: Python ints and floats, never numpy scalars, go into the results)."""
        raise NotImplementedError

    # Overlapped steps (`LLMEngine`, `EngineConfig.overlap`): the engine may launch the next step before this
    # one's results reach the host, its block formed on the device from this step's packed output.
    max_advance: int = 1  # the most KV positions one step commits (AR 1, ISD N)

    def next_inputs(self, packed: torch.Tensor, inputs: dict[str, torch.Tensor]
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """On the device: a step's packed output [B, F] and its inputs (the runner's names: "tokens",
        "is_mask", "gate", "dec."-prefixed decoder tensors; [B, ...]) -> (advance [B] int64: the positions the
        step commits, {name: the next step's value}) for the inputs that follow from the output. What `finish`
        then `blocks` and `step_inputs` give on the host, for a batch of unchanged rows, every row at the
        step's stride, no logprobs. (The runner moves each row's draw number on by one and hands a sampled step
        the last step's q̃ output itself.) A decoder that does not override it is never overlapped."""
        raise NotImplementedError(f"decoder {self.name!r} cannot form its next inputs on the device")

    def step(self, states: list, logits: torch.Tensor, params: list[SamplingParams],
             rngs: list, stats: list[DecodeStats]) -> list[StepResult]:
        """logits [B, Q, V] of the blocks `block(state)` -> results; updates states and stats in place."""
        if not self.fused:
            raise NotImplementedError
        tensors, static = self.step_inputs(states, params, rngs, logits.shape[-1], logits.device)
        packed, extra = self.compute(logits, to_device(tensors, logits.device), **static)
        return self.finish(states, packed.cpu().numpy(), extra, params, stats)
