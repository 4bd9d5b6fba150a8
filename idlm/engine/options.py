"""Engine option values that command lines offer as choices, importable without torch (so `idlm --help`
and argument parsing stay fast)."""

# the engine's `attention` option: "auto" = the Triton paged kernel on CUDA where Triton is installed, else
# the gather + SDPA reference path; "triton" requires the kernel; "sdpa" always takes the reference path
ATTENTION_BACKENDS = ("auto", "triton", "sdpa")

EXACT_HELP = ("exact mode: every token's logits bit-identical whatever the batch, query block and prefill chunk "
              "(greedy ISD / R-ISD then equal AR in bf16 too); slower; needs the Triton kernels (docs/exact.md)")

OVERLAP_HELP = ("launch each decode step before the last one's results reach the host, where steps replay CUDA "
                "graphs (stable batches without logprobs; same tokens): --no-overlap waits for every step")


def default_stride(decoder: str, exact: bool = False, stride_schedule=None) -> int | str:
    """The engine's stride when none is given (`idlm serve`, `idlm.LLM`): "auto", the adaptive stride, for ISD
    and R-ISD (issue 13: it picks N per step from the measured step cost and acceptance, an AR step where
    drafting does not pay); a fixed 4 in exact mode (a seeded request's tokens would follow the timing-driven
    choice of N, and exact mode promises the same tokens on every run) and next to a stride schedule (the
    other way of choosing N); 4 for the other decoders (SDAR's block size; AR ignores it)."""
    if decoder in ("isd", "risd") and not exact and stride_schedule is None:
        return "auto"
    return 4
