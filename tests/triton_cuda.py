"""Triton's CUDA front end run on a machine without a GPU: a Triton kernel's IR built for an sm_90 target, in a
fresh process (the tests run Triton in interpreter mode, which its CUDA back end cannot be imported next to).

Why: a kernel can pass every interpreter test and still fail the GPU's first compile step (the paged kernel's
prefetching loop did, on the H200 only); building the IR here catches that before a device run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# defines `ttir(fn, signature, constexprs, optimize=False)` -> the IR's text (after the TTIR passes when
# `optimize`) and `report(variants)` (each variant's IR built, one JSON line of results), or prints
# {"skip": why} and exits when this Triton has no CUDA back end
PRELUDE = r"""
import itertools, json, os, sys
os.environ.pop("TRITON_INTERPRET", None)
try:
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource
except ImportError as e:
    print(json.dumps({"skip": str(e)}))
    sys.exit(0)

target = GPUTarget("cuda", 90, 32)
backend = CUDABackend(target)
options = backend.parse_options({})

def ttir(fn, signature, constexprs, optimize=False):
    ctx = ir.context()
    ir.load_dialects(ctx)
    backend.load_dialects(ctx)
    names = fn.arg_names
    src = ASTSource(fn=fn, signature={n: "constexpr" if n in constexprs else signature.get(n, "i32") for n in names},
                    constexprs={(names.index(k),): v for k, v in constexprs.items()})
    mod = src.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(), ctx)
    return str(backend.make_ttir(mod, {}, options, 90) if optimize else mod)

def report(variants):
    # variants: (name, build) pairs; build() -> True when the variant's IR is as wanted, else what to show. Prints
    # {name: "ok" or what build returned or raised} as the script's JSON line
    out = {}
    for name, build in variants:
        try:
            got = build()
            out[name] = "ok" if got is True else str(got)[-800:]
        except Exception as e:
            out[name] = f"{type(e).__name__}: {e}"[-800:]
    print(json.dumps(out))
"""


def run_ttir_script(body: str) -> dict:
    """PRELUDE + body (which prints one JSON line last) in a fresh process from the repository root -> that JSON;
    the test is skipped where Triton has no CUDA front end."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", PRELUDE + body], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parent.parent, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(f"no Triton CUDA front end here: {result['skip']}")
    return result
