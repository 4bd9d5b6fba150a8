"""Inductor's Triton code generation for the sampled decode steps, checked on a machine without a GPU.

Why it exists: the sampled ISD step failed to compile on the H200 at SmolLM2's and Qwen3's vocabularies
(torch 2.11: "list indices must be integers or slices, not NoneType" in inductor's scheduler), every
attempt of `cuda_fused`, so it ran eagerly at 2-3x the cost; the CPU's inductor (C++ code) compiles the
same function, so no CPU test saw it. Inductor can generate *Triton* code for CPU tensors
(`cpu_backend = "triton"`), and the failure is in that generation, before anything is compiled for a
device. This script runs it for the step at given shapes in the torch it is started with, and reports
whether generation succeeds ("codegen ok": the kernels' source was written; loading them then needs a
Triton CPU backend, which is not installed and is not what is checked).

    python -m venv /tmp/v211 && /tmp/v211/bin/pip install torch==2.11.0 numpy   (the GPU machine's torch)
    /tmp/v211/bin/python scripts/triton_codegen_check.py [--vocab 49152,151936] [--stride 4] [--k-row]
        [--truncate 0|1|K]                                  (--stride 1: the sampled AR step)

Prints a JSON line per case, a summary last; exit status 1 when a case fails. What it found and fixed:
docs/sampling.md ("The sampled step ran eagerly at long vocabularies").

`--count` also lists the kernels each case's generated code launches (a decode step at batch 1 is bound by
their number). The CPU lowers every `torch.cat` / `torch.stack` as one kernel per input, where CUDA chooses
between that and one pointwise kernel; `--cat-lowering FILE` takes that choice from the `cat` lowering of
another torch's `torch/_inductor/lowering.py` (e.g. 2.11's, the GPU machine's, unzipped from its wheel:
`pip download --no-deps torch==2.11.0` and `unzip <wheel> torch/_inductor/lowering.py`), its CPU-only
branch off, so the count is what that torch does on a GPU (docs/risd.md, session 27: 24 -> 13 kernels
for the sampled ISD step).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def triton_for_cpu() -> None:
    """Inductor generates Triton kernels for CPU tensors; the backend hash (which asks Triton for an active
    driver, and there is none without a GPU) is replaced by a constant: it only names cache entries."""
    import torch._inductor.config as inductor_config
    import torch.utils._triton as triton_utils

    inductor_config.cpu_backend = "triton"
    triton_utils.triton_hash_with_backend = lambda: "codegen-check"


def cuda_cat_lowering(path: str | None) -> None:
    """Lower `aten.cat` as inductor does for CUDA tensors: the `cat` lowering of this torch, or of the
    `lowering.py` at `path`, with its CPU-only branch (always one kernel per input) turned off."""
    import inspect
    import typing

    import torch._inductor.lowering as lowering

    target = inspect.unwrap(lowering.lowerings[torch.ops.aten.cat.default])
    text = open(path).read() if path else inspect.getsource(target)
    text = text[text.index("def cat(inputs, dim=0):"):]
    end = text.find("\n@register_lowering")
    text = text[: end if end > 0 else len(text)]
    cpu = 'cpu_device = inputs[0].get_device().type == "cpu"'
    if cpu not in text:
        raise SystemExit(f"{path or 'this torch'}: no CPU branch to turn off in the cat lowering")
    namespace = dict(vars(lowering))
    lowering.Union, lowering.Optional = typing.Union, typing.Optional  # older sources' annotations
    exec(compile(text.replace(cpu, "cpu_device = False"), lowering.__file__, "exec"), namespace)
    target.__code__ = namespace["cat"].__code__  # the registered lowering calls this function object


def launched_kernels(since: set[str]) -> tuple[list[str], set[str]]:
    """Kernels launched by the `call` of the modules inductor wrote to its cache after `since` (file names)."""
    import glob

    from torch._inductor.runtime.cache_dir_utils import cache_dir

    files = set(glob.glob(os.path.join(cache_dir(), "**", "*.py"), recursive=True))
    names = []
    for f in sorted(files - since):
        src = open(f).read()
        if "def call(" in src:
            names += re.findall(r"(\w+)\.run\(", src.split("def call(")[1])
    return names, files


def generated_kernels(fn, args, dynamic: bool = False) -> tuple[bool, list[str]]:
    """Compile `fn(*args)` for CPU tensors as Triton code -> (whether it ran, the kernels its generated code
    launches: read from the modules new in inductor's cache, so start from a fresh $TORCHINDUCTOR_CACHE_DIR);
    a generation error propagates (Triton then having no CPU backend to build for is not one)."""
    before = launched_kernels(set())[1]
    try:
        torch.compile(fn, dynamic=dynamic)(*args)
        ran = True
    except Exception as e:  # noqa: BLE001 — only the missing CPU backend is expected
        msg = str(e)
        if "compatible backends" not in msg and "active drivers" not in msg:
            raise
        ran = False
    return ran, launched_kernels(before)[0]


def step_args(vocab: int, stride: int, k_row: bool, truncate):
    from idlm.decoding import rng

    B, n = 2, stride
    k = n - 1
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(B, 2 * n - 1, vocab, generator=g), torch.tensor([True, False]),
            torch.randint(0, vocab, (B, k), generator=g), torch.full((B,), 0.7), torch.zeros(B, dtype=torch.long),
            torch.full((B,), 0.95 if truncate else 1.0), torch.zeros(B, dtype=torch.bool),
            torch.zeros(B, dtype=torch.bool), torch.ones(B), rng.seed_keys([1, 2]), torch.arange(B),
            torch.softmax(torch.randn(B, k, vocab, generator=g), -1), truncate]
    args.append(torch.tensor([k - 1, k]) if k_row else None)
    args.append(torch.tensor([0.5, 0.7]))  # draft_temperature (the engine always passes it)
    return args


def ar_args(vocab: int, truncate):
    from idlm.decoding import rng

    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 1, vocab, generator=g), torch.full((2,), 0.7), torch.zeros(2, dtype=torch.long),
            torch.full((2,), 0.95 if truncate else 1.0), rng.seed_keys([1, 2]), torch.arange(2), truncate]


def check(vocab: int, stride: int, k_row: bool, truncate, count: bool = False) -> dict:
    from idlm.decoding.ar import sampled_ar_step
    from idlm.decoding.isd import sampled_isd_step

    torch._dynamo.reset()
    case = {"vocab": vocab, "stride": stride, "k_row": k_row, "truncate": truncate}
    fn, args = ((sampled_ar_step, ar_args(vocab, truncate)) if stride == 1
                else (sampled_isd_step, step_args(vocab, stride, k_row, truncate)))
    try:
        ran, kernels = generated_kernels(fn.__wrapped__, args)
    except Exception as e:  # noqa: BLE001 — the generation's error is the result
        return {**case, "ok": False, "error": str(e).splitlines()[0][:300]}
    out = {**case, "ok": True, "ran": ran}
    if count:
        out["kernels"], out["num_kernels"] = kernels, len(kernels)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", default="49152,151936")
    ap.add_argument("--stride", type=int, default=4)
    ap.add_argument("--k-row", action="store_true", help="the adaptive stride's per-row variant")
    ap.add_argument("--truncate", default="0", help="0: no top-k/top-p, 1: full sort, K: top-K selection")
    ap.add_argument("--count", action="store_true", help="list the kernels each case's generated code launches")
    ap.add_argument("--cat-lowering", default=None, metavar="LOWERING_PY",
                    help="with --count: lower cat as CUDA does, with this torch/_inductor/lowering.py's cat "
                         "(default: this torch's)")
    args = ap.parse_args()
    truncate = {"0": False, "1": True}.get(args.truncate) if args.truncate in ("0", "1") else int(args.truncate)
    triton_for_cpu()
    if args.count:  # a fresh cache: a kernel is counted by the generated module the compile writes there
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="codegen-count-")
        cuda_cat_lowering(args.cat_lowering)
    results = []
    for v in (int(x) for x in args.vocab.split(",")):
        results.append(check(v, args.stride, args.k_row, truncate, args.count))
        print(json.dumps(results[-1]), flush=True)
    ok = all(r["ok"] for r in results)
    print(json.dumps({"summary": True, "torch": torch.__version__, "ok": ok}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
