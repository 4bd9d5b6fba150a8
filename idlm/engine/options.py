"""Engine option values that command lines offer as choices, importable without torch (so `idlm --help`
and argument parsing stay fast)."""

# the engine's `attention` option: "auto" = the Triton paged kernel on CUDA where Triton is installed, else
# the gather + SDPA reference path; "triton" requires the kernel; "sdpa" always takes the reference path
ATTENTION_BACKENDS = ("auto", "triton", "sdpa")

# the engine's `lora_layout` option: how R-ISD's gated LoRA is folded into the projections (`Transformer.fuse_lora`;
# "auto": `choose_lora_layout`'s pick); the same names as `idlm.models.transformer.LORA_LAYOUTS` after "auto"
LORA_LAYOUT_CHOICES = ("auto", "pair", "select", "lowrank")
LORA_LAYOUT_HELP = ("R-ISD: how the gated LoRA is folded into the projections on CUDA — auto (lowrank where the GPU's "
                    "L2 holds a step's weights with it and not with select, else select), select (x·[W ; W + D]), "
                    "lowrank (W and the LoRA factors in one Triton kernel) or pair ([x, g·x]·[W | D])")

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
