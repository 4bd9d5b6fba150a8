"""How many GPU kernels a compiled elementwise unit becomes, checked without a GPU.

Why: at batch 1 a decode step of a small model is bound by its number of kernel launches (each ~1.5 µs on
the H200), so a fused function that inductor writes in three kernels instead of one costs the step ~90 µs
at SmolLM2's 30 layers (docs/risd.md, session 27: the "select" layout's q/k/v). Inductor generates *Triton*
code for CPU tensors when `cpu_backend = "triton"`; the generated module's `call` names every kernel it
launches, before anything is compiled for a device (loading the kernels then fails: no Triton CPU backend,
which is not what is checked). A subprocess keeps the inductor settings away from the other tests.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="inductor's Triton code generation needs the triton package")

ROOT = Path(__file__).resolve().parent.parent

COUNT = r"""
import json, os, sys, tempfile
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp()
import torch
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "scripts")]
from triton_codegen_check import generated_kernels, triton_for_cpu
from idlm.decoding import rng
from idlm.layers.rotary import rotary_qkv
triton_for_cpu()

def kernels(fn, args):
    torch._dynamo.reset()
    return generated_kernels(fn, args, dynamic=True)[1]

torch.manual_seed(0)
B, T, hq, hkv, d = 1, 7, 9, 3, 64  # SmolLM2-135M's heads, an N = 4 step's 7 query rows
width = (hq + 2 * hkv) * d
cos, sin = torch.randn(B, T, 1, d, dtype=torch.bfloat16), torch.randn(B, T, 1, d, dtype=torch.bfloat16)
gate = torch.tensor([[1, 0, 1, 1, 0, 1, 1]], dtype=torch.bool)
qw, kw = torch.randn(d, dtype=torch.bfloat16), torch.randn(d, dtype=torch.bfloat16)
out = {}
for name, gated, norms in (("ar", False, False), ("select", True, False), ("ar_norms", False, True),
                           ("select_norms", True, True)):
    qkv = torch.randn(B, T, 2 * width if gated else width, dtype=torch.bfloat16)
    args = [qkv, gate if gated else None, cos, sin, hq, hkv, qw if norms else None, kw if norms else None, 1e-6]
    out[name] = kernels(rotary_qkv.__wrapped__, args)
# a sampled N = 4 step's uniforms: 7 per row (4 token draws, 3 acceptances), from the Philox words
out["uniforms"] = kernels(rng.uniforms.__wrapped__, [rng.seed_keys([1, 2]), torch.tensor([0, 5]), 0, 7])
# the greedy ISD step (N = 4, plain and with rejection branches): its argmax, then its packed output
from idlm.decoding.isd import greedy_isd_step
for br in (False, True):
    logits = torch.randn(2, 16 if br else 7, 512)
    out[f"greedy_isd_br{br}"] = kernels(greedy_isd_step.__wrapped__, [logits, torch.tensor([True, False]),
                                                                      torch.randint(0, 512, (2, 3)), None, br])
# a decode step's preamble: the embedding lookup (with R-ISD's MASK embedding), RoPE's cos / sin, the paged
# kernel's per-row metadata (with rejection branches' hidden ranges) — a 16-row block (N = 4 with branches)
from idlm.layers.paged_attention import kernel_rows
from idlm.layers.rotary import rope_cos_sin, rope_inv_freq
from idlm.models.transformer import embed_masked, embed_rows
ids, emb = torch.randint(0, 1000, (1, 16)), torch.randn(1000, 64, dtype=torch.bfloat16)
out["embed"] = kernels(embed_rows.__wrapped__, [ids, emb])
out["embed_masked"] = kernels(embed_masked.__wrapped__, [ids, emb, torch.randn(64), torch.rand(1, 16) > 0.5])
out["rope"] = kernels(rope_cos_sin.__wrapped__, [torch.randint(0, 500, (1, 16)), rope_inv_freq(64, 1e4),
                                                 torch.bfloat16])
starts, slots = torch.tensor([40]), torch.arange(40, 56)[None]
out["rows"] = kernels(kernel_rows.__wrapped__, [starts, slots, 0, 16, None, None])
out["rows_hide"] = kernels(kernel_rows.__wrapped__, [starts, slots, 0, 16, None, torch.zeros(1, 16, 2).long()])
# a chained step's inputs formed on the device (`advanced_inputs`), R-ISD N = 4 with branches: the arguments
# of a CPU engine's first chained step
sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
from tiny import tiny_transformer
from idlm.decoding.sampling import SamplingParams
from idlm.engine import model_runner
from idlm.engine.llm_engine import EngineConfig, LLMEngine
from idlm.layers.lora import LoRAAdapter, LoRAConfig
m = tiny_transformer(64, head_dim=16, mask_token_id=3)
lora = LoRAAdapter(m.config, LoRAConfig(rank=4)).init_weights(std=0.3, seed=0, zero_b=False)
seen, advanced = [], model_runner.advanced_inputs
model_runner.advanced_inputs = lambda *a: (seen.append(a), advanced(*a))[1]
eng = LLMEngine(m, None, EngineConfig(decoder="risd", stride=4, num_pages=64, page_size=4, branches=True), lora=lora)
eng.runner.use_graphs = True  # the graph path on CPU (eager stand-ins), so steps chain
eng.run([[5, 6, 7, 8]], SamplingParams(temperature=0.7, max_tokens=12, ignore_eos=True, seed=1))
model_runner.advanced_inputs = advanced
out["advanced_inputs"] = kernels(advanced.__wrapped__, list(seen[0]))
print(json.dumps(out))
"""


@functools.cache
def _counts() -> dict:
    """{case: kernel names} of the generation script, run once for the module's tests."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # generate, do not interpret
    res = subprocess.run([sys.executable, "-c", COUNT, str(ROOT)], capture_output=True, text=True, timeout=600,
                         env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_rotary_qkv_is_one_kernel_without_qk_norms_and_two_with():
    """q, k and v of a fused q/k/v matmul (AR's and the R-ISD "select" layout's) written by one kernel when
    the model has no q/k norms (SmolLM2, Llama), at most two with them (Qwen3; the CPU's Triton code keeps the
    norms' reduction apart, the H200's fused it: one kernel per layer, docs/risd.md session 27). The
    concatenation of q, k and v that this replaced measured three kernels per layer on the H200 for the
    select layout."""
    counts = _counts()
    assert [len(counts["ar"]), len(counts["select"])] == [1, 1], counts
    assert len(counts["ar_norms"]) <= 2 and len(counts["select_norms"]) <= 2, counts


def test_philox_uniforms_are_one_kernel():
    """`rng.uniforms` (every sampled step draws its uniforms with it, twice in an ISD step) picks each
    column's Philox word with a `where` instead of stacking the four words: one kernel (the stack took one
    per word plus the conversion, counted the same way), so inside a step it fuses with its consumer."""
    counts = _counts()
    assert len(counts["uniforms"]) == 1, counts


def test_decode_step_outputs_are_not_concatenated_kernel_by_kernel():
    """The greedy ISD step's packed output and a chained step's device-formed inputs are written by
    `cat_columns` (one expression) rather than `torch.cat`, whose lowering may give each input its own
    kernel: the greedy ISD step is its argmax reduction plus at most two kernels (5 with `torch.cat`, counted
    the same way; 6 launches on the H200, session 30's profile), and `advanced_inputs` is one kernel (7 with
    `torch.cat` for R-ISD, 12 with branches)."""
    counts = _counts()
    assert len(counts["greedy_isd_brFalse"]) <= 3 and len(counts["greedy_isd_brTrue"]) <= 3, counts
    assert len(counts["advanced_inputs"]) == 1, counts


def test_a_decode_steps_preamble_is_a_kernel_per_piece():
    """The step's embedding lookup (R-ISD: with the MASK embedding's `where`), RoPE's cos / sin and the paged
    kernel's per-row metadata compile to one kernel each (the hidden ranges of rejection branches one more).
    Eager, the same preamble was ~11 launches a step on the H200 (session 30's idlm-tiny-ar profile and session
    33's SmolLM2-shape one: index_select — 8 µs for a 16-row block —, where, a float product, cat, cos, sin,
    two casts, arange, add, compare, masked fill), in AR and every ISD step alike."""
    counts = _counts()
    assert [len(counts[k]) for k in ("embed", "embed_masked", "rope", "rows")] == [1, 1, 1, 1], counts
    assert len(counts["rows_hide"]) <= 2, counts
