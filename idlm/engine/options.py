"""Engine option values that command lines offer as choices, importable without torch (so `idlm --help`
and argument parsing stay fast)."""

# the engine's `attention` option: "auto" = the Triton paged kernel on CUDA where Triton is installed, else
# the gather + SDPA reference path; "triton" requires the kernel; "sdpa" always takes the reference path
ATTENTION_BACKENDS = ("auto", "triton", "sdpa")

EXACT_HELP = ("exact mode: every token's logits bit-identical whatever the batch, query block and prefill chunk "
              "(greedy ISD / R-ISD then equal AR in bf16 too); slower; needs the Triton kernels (docs/exact.md)")
