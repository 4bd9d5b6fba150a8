"""The serving engine's configuration: every option of `LLMEngine`, checked when it is made.

Why a file of its own: `idlm serve`, `idlm.LLM`, the benchmarks and the tests all build an `EngineConfig`;
its options (decoder and stride, the adaptive stride's bounds, rejection branches and guesses, the KV pool,
batching limits, CUDA graphs, attention backend, fused projections and the LoRA layout, exact mode,
overlapped steps) and their validation are read far more often than the engine loop that uses them. A bad
value is refused by `__post_init__` with a `ConfigError` naming the option.
"""

from __future__ import annotations

import warnings
from dataclasses import InitVar, dataclass

from idlm.decoding.stride_policy import MAX_STRIDE, StepCostModel
from idlm.engine.options import ATTENTION_BACKENDS
from idlm.errors import ConfigError
from idlm.models.transformer import LORA_LAYOUTS


@dataclass
class EngineConfig:
    decoder: str = "isd"  # ar | isd | risd | sdar
    stride: int | str = 4  # N (ISD/R-ISD), block size (SDAR); "auto" (ISD/R-ISD): the adaptive stride
    auto_max_stride: int = 8  # the largest N "auto" may pick
    auto_interval: int = 8  # decode steps between two choices of "auto"
    # "auto": each row of a step runs its own N <= the step's (`row_strides`: the N its drafts commit most
    # tokens with; the block is padded to the step's 2N−1 slots). False: every row the step's N
    auto_per_row: bool = True
    # (base s, per row s, per query token s) of a decode step (`StepCostModel`); None with "auto": measured
    # at start-up on this device and cached (`idlm.engine.calibrate`)
    step_cost: tuple[float, float, float] | None = None
    # "auto": at most every this many decode steps, the best-rated stride whose step time at the batch's bucket
    # was measured but has expired runs one interval, to be measured afresh (`stride_to_refresh`); 0: never
    auto_refresh: int = 256
    # "auto": an ISD stride replaces the plain AR step only if rated more than this fraction faster
    # (`choose_stride`'s ar_margin: ISD's rate rests on estimated acceptances); 0: the plain argmax
    auto_ar_margin: float = 0.1
    threshold: float = 0.9  # SDAR confidence threshold
    # [(max decode batch, N), ...] ascending; the first entry whose bound >= the batch size gives N.
    # None: always `stride`. Example: [(8, 4), (32, 3), (1_000_000, 2)]. For ISD / R-ISD, N = 1 means plain
    # AR steps (exact: `ISDPlainStep`), e.g. [(32, 4), (1_000_000, 1)] where big batches make ISD lose.
    stride_schedule: list[tuple[int, int]] | None = None
    # ISD / R-ISD rejection branches (`idlm.decoding.isd`, "Rejection branches"): each step also drafts, for
    # every draft that may be rejected, the next drafts from its correction on, so no round starts cold; the
    # query block grows from 2N−1 to N² tokens (with "auto", the policy prices N²-token steps and cold-free TPF)
    branches: bool = False
    # with branches and a fixed stride or a schedule: the largest decode batch whose steps draft them; larger
    # batches run the plain 2N−1 layout of the same stride (exact either way: the choice depends on the batch
    # size only, and the two layouts' states are the same; "auto" weighs the batch itself). None: every batch.
    # At C = 64 on the H200 SmolLM2's N² = 16-token rows cost more than their extra tokens gain (docs/risd.md
    # "Session 22"); at C <= 16 they paid or tied
    branches_max_batch: int | None = None
    # with branches and a fixed stride or a schedule: G guessed corrections per draft (`idlm.decoding.isd`,
    # "Guessed corrections"): each step also drafts after the drafter's G next-best tokens at every draft, so
    # a correction that equals one is followed by drafts that saw it; 2N−1 + (1+G)·(N−1)² query tokens a step
    guesses: int = 0
    # with guesses: the rows of each guessed group — its guess row and W − 1 MASK rows, at most N − 1 (None);
    # after a right guess the drafts past W come from the branch's MASK rows (blind to the correction). W = 1:
    # 2N−1 + (N−1)² + G·(N−1) query tokens a step (N = 4, G = 1: 19 instead of 25)
    guess_rows: int | None = None
    page_size: int = 16  # KV-cache page: token slots per page
    num_pages: int | None = None  # KV-cache pages; None: from free GPU memory (CPU: up to 1 GiB)
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    # while requests are decoding, admit waiting ones only when this many seats are free (or every waiting
    # request fits): an eager prefill forward has a fixed host cost (~50 ms for a 30-layer model on the
    # H200's host), so admitting one request per step as seats free up made prefill the bottleneck of a
    # saturated engine. None = max(1, max_num_seqs // 16); 1 = admit at once (lowest time to first token).
    admit_batch: int | None = None
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    gpu_memory_utilization: float = 0.85
    enable_prefix_caching: bool = True
    cuda_graphs: bool = True
    # decode-step attention: "auto" = the Triton paged kernel on CUDA where Triton is installed, else the
    # gather + SDPA reference path; "triton" requires the kernel; "sdpa" always takes the reference path
    attention: str = "auto"
    # one q/k/v and one gate/up matmul per layer (weight copies), and R-ISD's LoRA folded into the projections
    # (Transformer.fuse_lora); None = auto: on CUDA when the copies are <= 1 GiB
    fuse_projections: bool | None = None
    # how q/k/v and gate/up carry a fused R-ISD LoRA (`Transformer.fuse_lora`): "pair" ([x, g·x] times [W | D])
    # or "select" (x times [W ; W + D], each row's half picked in the kernel after the matmul: on the H200 its
    # SmolLM2-shaped step's CUDA graph takes 3.5% less GPU time than "pair", docs/risd.md session 25), or
    # "lowrank" (W and the low-rank factors in one Triton kernel per projection, W read once), or "auto" (the
    # default): "lowrank" on a GPU whose L2 holds a step's weights with it and not with "select"
    # (`choose_lora_layout`: idlm-tiny-ar's step 1.175× AR's against 1.255×, session 39), else "select"
    lora_layout: str = "auto"
    # exact mode (issue 16): every token row's logits bit-identical whatever the batch, the query block and
    # the prefill chunk (batch-invariant matmuls, fixed-tile attention), so greedy ISD / R-ISD equal greedy
    # AR in bf16 too; slower. Needs the Triton kernels (CUDA, or TRITON_INTERPRET=1 on CPU)
    exact: bool = False
    # overlapped decode steps (where decode steps replay CUDA graphs): while the device runs a step, the host
    # launches the next one — its block formed on the device from the step's output (`Decoder.next_inputs`)
    # — and only then reads the step's results and applies them, so the host's per-step work (scheduling,
    # finish, commits, stop checks) runs beside the device instead of between its steps. Taken for a stable
    # batch of steps without logprobs (greedy or sampled: the same tokens, a seeded request's too; with
    # "auto", the steps between two choices); everything else runs synchronously. False: never
    overlap: bool = True
    # deprecated aliases of page_size / num_pages (one release): accepted as keyword arguments only, never
    # stored (so `asdict` and `dataclasses.replace` see only the new names); read page_size / num_pages
    block_size: InitVar[int | None] = None
    num_blocks: InitVar[int | None] = None

    def __post_init__(self, block_size=None, num_blocks=None):
        self._resolve_alias("block_size", block_size, "page_size", 16)
        self._resolve_alias("num_blocks", num_blocks, "num_pages", None)

        def positive(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"invalid engine option {name}={v!r}: must be a positive integer")

        if self.stride != "auto":
            positive("stride")
        for name in ("page_size", "max_num_seqs", "max_num_batched_tokens", "auto_interval"):
            positive(name)
        positive("auto_max_stride")
        if not isinstance(self.auto_refresh, int) or isinstance(self.auto_refresh, bool) or self.auto_refresh < 0:
            raise ConfigError(f"invalid engine option auto_refresh={self.auto_refresh!r}: must be an integer >= 0")
        if (isinstance(self.auto_ar_margin, bool) or not isinstance(self.auto_ar_margin, (int, float))
                or not 0.0 <= self.auto_ar_margin <= 1.0):
            raise ConfigError(f"invalid engine option auto_ar_margin={self.auto_ar_margin!r}: must be a number "
                              "in [0, 1]")
        if not isinstance(self.overlap, bool):
            raise ConfigError(f"invalid engine option overlap={self.overlap!r}: must be True or False")
        if not isinstance(self.auto_per_row, bool):
            raise ConfigError(f"invalid engine option auto_per_row={self.auto_per_row!r}: must be True or False")
        if self.auto_max_stride > MAX_STRIDE:
            raise ConfigError(f"invalid engine option auto_max_stride={self.auto_max_stride}: at most {MAX_STRIDE}")
        if self.stride == "auto" and self.decoder not in ("isd", "risd"):
            raise ConfigError(f"stride 'auto' is for the isd and risd decoders, not {self.decoder!r}")
        if self.stride == "auto" and self.stride_schedule is not None:
            raise ConfigError("give stride 'auto' or a stride_schedule, not both")
        if self.stride_schedule is not None and self.decoder not in ("isd", "risd"):
            raise ConfigError(f"stride_schedule is for the isd and risd decoders (their N = 1 is a plain AR step), "
                              f"not {self.decoder!r}")
        if not isinstance(self.branches, bool):
            raise ConfigError(f"invalid engine option branches={self.branches!r}: must be True or False")
        if self.branches and self.decoder not in ("isd", "risd"):
            raise ConfigError(f"branches (rejection branches) are for the isd and risd decoders, not {self.decoder!r}")
        if self.branches_max_batch is not None:
            positive("branches_max_batch")
            if not self.branches:
                raise ConfigError("branches_max_batch needs branches=True")
        if isinstance(self.guesses, bool) or not isinstance(self.guesses, int) or not 0 <= self.guesses <= 8:
            raise ConfigError(f"invalid engine option guesses={self.guesses!r}: the guessed corrections per draft, "
                              "an integer in 0..8")
        if self.guesses and not self.branches:
            raise ConfigError("guesses (guessed corrections) need branches=True: they are more rows of the "
                              "rejection branches' tree")
        if self.guess_rows is not None and (isinstance(self.guess_rows, bool) or not isinstance(self.guess_rows, int)
                                            or self.guess_rows < 1):
            raise ConfigError(f"invalid engine option guess_rows={self.guess_rows!r}: the rows of a guessed group, "
                              "an integer >= 1 (None: N − 1)")
        if self.guess_rows is not None and not self.guesses:
            raise ConfigError("guess_rows is the size of the guessed groups: it needs guesses > 0")
        if self.guesses and self.stride == "auto":
            raise ConfigError("guesses are for a fixed stride or a stride_schedule: the adaptive stride's policy "
                              "does not price guessed corrections yet")
        if self.branches_max_batch is not None and self.stride == "auto":
            raise ConfigError("branches_max_batch is for a fixed stride or a stride_schedule: with stride 'auto' "
                              "the policy prices the branches' N²-token steps at every batch itself")
        if self.step_cost is not None:
            try:
                self.step_cost = tuple(float(x) for x in self.step_cost)
                StepCostModel(*self.step_cost)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"invalid engine option step_cost={self.step_cost!r}: need (base, per_row, "
                                  f"per_token) seconds >= 0 ({e})") from None
        if self.lora_layout not in ("auto", *LORA_LAYOUTS):
            raise ConfigError(f"invalid engine option lora_layout={self.lora_layout!r}: must be one of "
                              f"{['auto', *LORA_LAYOUTS]}")
        if self.num_pages is not None:
            positive("num_pages")
        if self.admit_batch is None:
            self.admit_batch = max(1, self.max_num_seqs // 16)
        positive("admit_batch")
        if self.max_model_len is not None:
            positive("max_model_len")
        if self.attention not in ATTENTION_BACKENDS:
            raise ConfigError(f"invalid engine option attention={self.attention!r}: choose one of {ATTENTION_BACKENDS}")
        if self.exact and self.attention == "sdpa":
            raise ConfigError("exact mode runs attention through the Triton kernel's exact variant: "
                              "it cannot be combined with attention='sdpa'")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"invalid engine option gpu_memory_utilization={self.gpu_memory_utilization!r}: "
                              "must be in (0, 1]")
        if self.stride_schedule is not None:
            sched = [tuple(e) for e in self.stride_schedule]
            if not sched or any(len(e) != 2 or e[0] < 1 or e[1] < 1 for e in sched) or \
                    [e[0] for e in sched] != sorted(e[0] for e in sched):
                raise ConfigError(f"invalid stride_schedule {self.stride_schedule!r}: need ascending "
                                  "(max batch size, stride) pairs of positive integers")
            self.stride_schedule = sched

    def _resolve_alias(self, old: str, value, new: str, default) -> None:
        """A deprecated keyword `old` given as `value`: warn and set `new` (a conflicting `new` is an error)."""
        if value is None:
            return
        warnings.warn(f"EngineConfig option {old} is deprecated, use {new}", DeprecationWarning, stacklevel=4)
        current = getattr(self, new)
        if current != default and current != value:
            raise ConfigError(f"engine options {old}={value!r} (deprecated alias of {new}) and {new}={current!r} "
                              "conflict: give only " + new)
        setattr(self, new, value)

    @property
    def strides(self) -> list[int]:
        """Every stride this configuration may run."""
        if self.stride == "auto":
            return list(range(1, self.auto_max_stride + 1))
        return sorted({self.stride} | {n for _, n in self.stride_schedule or ()})

    def stride_for(self, batch_size: int) -> int:
        if self.stride == "auto":
            raise ValueError("stride 'auto' is chosen by the engine (LLMEngine._choose_stride)")
        if self.stride_schedule is None:
            return self.stride
        for bound, n in self.stride_schedule:
            if batch_size <= bound:
                return n
        return self.stride_schedule[-1][1]
